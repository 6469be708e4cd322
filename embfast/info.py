"""Build and runtime facts: what the native core was built with and what ONNX Runtime offers."""

from __future__ import annotations

import platform


def build_info() -> dict:
    """A dict with at least: native, version, onnxruntime, providers, isa, openmp.

    ``native`` is True when the compiled core (embfast._core) loaded; ``isa`` is
    the SIMD path the kernels run ("avx2+fma" or "generic"); ``ortops`` whether the int8 operator library
    loaded and ``ortops_isa`` its path ("avx512vnni", "avx2", "generic" or "none").
    """
    import numpy as np
    import onnxruntime as ort

    from embfast import __version__, kernels, ortops

    info = {"version": __version__, **kernels.build_info()}
    info["ortops"] = ortops.available()  # the int8 operator library (embfast.ortops)
    info["ortops_isa"] = ortops.isa() if info["ortops"] else "none"
    info.update({
        "numba": kernels.HAS_NUMBA,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    })
    return info
