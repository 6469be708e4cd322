"""ONNX Runtime session: execution provider choice (CUDA / CPU), threads, inputs and outputs.

Providers are always passed explicitly: onnxruntime-gpu lists TensorRT and CUDA
first even on a machine with no GPU, and ORT silently falls back to the CPU when
a CUDA session cannot start; we check what the session really got.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from embfast import ortops

DEVICES = ("cpu", "cuda", "auto")


class DeviceError(RuntimeError):
    """The requested device cannot be used (no GPU, or no onnxruntime-gpu)."""


def default_threads() -> int:
    """Intra-op threads when none are given: ``EMBFAST_THREADS`` or the cores this process may use."""
    env = os.environ.get("EMBFAST_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def resolve_precision(precision: str, device: str) -> str:
    """A model's precision for ``device``: "auto" -> fp16 where CUDA runs, else fp32; fp16 on the CPU is a
    ValueError (fp16 on a CPU is slower than fp32, not faster). Shared by every model kind."""
    if precision == "auto":
        return "fp16" if device in ("cuda", "auto") and cuda_available() else "fp32"
    if precision == "fp16" and device == "cpu":
        raise ValueError("precision='fp16' needs device='cuda' (fp16 on a CPU is slower than fp32, not faster); "
                         "use precision='fp32' or 'int8' on the CPU")
    return precision


def cuda_available() -> bool:
    """True when this onnxruntime build has the CUDA provider (it may still fail to start without a GPU)."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


_cuda_libraries_loaded = False


def load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries from the nvidia-* pip packages, once, before a CUDA session starts.

    onnxruntime-gpu links against libcudart/libcublas/libcudnn but does not find them inside
    site-packages by itself (``import torch`` first would also do). ``onnxruntime.preload_dlls``
    (ORT >= 1.21) loads them; missing ones are left to the system loader, whose failure then
    surfaces as :class:`DeviceError` when the session starts.
    """
    global _cuda_libraries_loaded
    if _cuda_libraries_loaded or not cuda_available():
        return
    _cuda_libraries_loaded = True
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # pragma: no cover - best effort; the session start reports what is missing
            pass


# ORT's CPU SkipLayerNormalization kernel is 5x slower than the Add + LayerNormalization it replaces
# (3.0 vs 0.5 ns per element for (32, 25, 384), benchmarks/bench_ort_ops.py): CPU sessions keep them apart.
CPU_DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]


def _disabled_optimizers(providers: list) -> list[str]:
    """ORT graph optimizers to skip: the CPU-only list when the session runs on the CPU provider alone."""
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    return CPU_DISABLED_OPTIMIZERS if names == ["CPUExecutionProvider"] else []


TOKEN_OUTPUT_NAMES = ("last_hidden_state", "token_embeddings")
_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)")


def find_token_output(outputs, output_name: str | None = None, *, where: str = "model") -> str:
    """The name of the token-embedding output (batch, seq_len, hidden) among a graph's outputs.

    Exports name it ``last_hidden_state`` or ``token_embeddings``; other graphs
    (e.g. one whose outputs are ``onnx::Shape_422`` and ``461``) get the first
    3-D floating-point output. A given ``output_name`` must exist and be 3-D.

    Args:
        outputs: the graph's outputs: objects with ``name``, ``type`` (``"tensor(float)"``...)
            and ``shape`` (a list; ``None`` when unknown), as ``InferenceSession.get_outputs()`` returns.
        output_name: the output to use, or None to detect it.
        where: the model's path, for error messages.

    Raises:
        ValueError: the named output is missing or not 3-D, or no output looks like token embeddings.
    """
    outputs = list(outputs)
    names = [o.name for o in outputs]

    def rank(o) -> int | None:
        return len(o.shape) if isinstance(o.shape, (list, tuple)) else None

    if output_name is not None:
        match = [o for o in outputs if o.name == output_name]
        if not match:
            raise ValueError(f"{where}: output {output_name!r} not found; outputs are {names}")
        if rank(match[0]) not in (3, None) or match[0].type not in _FLOAT_TYPES:
            raise ValueError(f"{where}: output {output_name!r} must be the token embeddings, a 3-D float tensor "
                             f"(batch, seq_len, hidden), got {match[0].type} of rank {rank(match[0])}")
        return output_name
    candidates = [o for o in outputs if rank(o) == 3 and o.type in _FLOAT_TYPES]
    for preferred in TOKEN_OUTPUT_NAMES:
        if any(o.name == preferred for o in candidates):
            return preferred
    if candidates:
        return candidates[0].name
    raise ValueError(f"{where}: no output looks like token embeddings (a 3-D float tensor) among {names}; "
                     "name the right one with output_name=")


class OnnxSession:
    """One ONNX Runtime session; ``run`` is safe to call from many threads at once.

    Args:
        path: the .onnx file.
        device: "cpu", "cuda" (error if CUDA cannot start) or "auto" (CUDA if it starts, else CPU).
        threads: intra-op threads for the CPU provider (default :func:`default_threads`).
        output_name: the token-embedding output; default: detected (:func:`find_token_output`).
        allow_spinning: let idle ORT threads spin (faster on dedicated cores,
            worse when the cores are shared); default from ``EMBFAST_ORT_SPIN`` (on) on the CPU, off
            when the CUDA provider is asked for.
        token_output: the output is token embeddings (checked to be 3-D); False for a graph that
            already pools (its ``output_name`` must then be given).
    """

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None,
                 output_name: str | None = None, allow_spinning: bool | None = None, token_output: bool = True):
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        self.path = Path(path)
        self._options = {"device": device, "output_name": output_name, "allow_spinning": allow_spinning,
                         "token_output": token_output}
        self.threads = default_threads() if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        wants_cuda = device in ("cuda", "auto") and cuda_available()
        if allow_spinning is None:  # on CUDA the CPU threads only run stray nodes: let them sleep
            allow_spinning = not wants_cuda and os.environ.get("EMBFAST_ORT_SPIN", "1") != "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        if ortops.available():  # graphs of the int8-rows variant use its operators (embfast.rowquant)
            ortops.register(opts)

        if device == "cuda" and not cuda_available():
            raise DeviceError("device='cuda' needs onnxruntime-gpu (pip uninstall onnxruntime && pip install "
                              f"onnxruntime-gpu); this onnxruntime {ort.__version__} has only "
                              f"{ort.get_available_providers()}")
        providers: list = ["CPUExecutionProvider"]
        if wants_cuda:
            load_cuda_libraries()
            providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers,
                                                disabled_optimizers=_disabled_optimizers(providers))
        except Exception as exc:  # ORT raises its own types; turn CUDA start failures into a clear error
            if device == "cuda":
                raise DeviceError(f"the CUDA provider failed to start: {exc}") from exc
            if device != "auto" or len(providers) == 1:
                raise
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=CPU_DISABLED_OPTIMIZERS)
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise DeviceError("device='cuda' but ONNX Runtime could not start the CUDA provider (no GPU or CUDA "
                              f"libraries missing); it fell back to {self.provider}")
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = self.session.get_outputs()
        if token_output:
            self.output_name = find_token_output(outputs, output_name, where=str(path))
        elif output_name in [o.name for o in outputs]:
            self.output_name = output_name
        else:
            raise ValueError(f"{path}: output {output_name!r} not found; outputs are {[o.name for o in outputs]}")

    def with_threads(self, threads: int) -> OnnxSession:
        """A second session over the same graph with ``threads`` intra-op threads (its own weights in memory)."""
        return OnnxSession(self.path, threads=threads, **{**self._options, "output_name": self.output_name})

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Run one batch; returns the token embeddings (batch, seq_len, hidden) float32."""
        feeds = {name: feeds[name] for name in self.input_names}
        out = self.session.run([self.output_name], feeds)[0]
        if out.dtype != np.float32:
            out = out.astype(np.float32)
        return out
