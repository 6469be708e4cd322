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


def cuda_available() -> bool:
    """True when this onnxruntime build has the CUDA provider (it may still fail to start without a GPU)."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxSession:
    """One ONNX Runtime session; ``run`` is safe to call from many threads at once.

    Args:
        path: the .onnx file.
        device: "cpu", "cuda" (error if CUDA cannot start) or "auto" (CUDA if it starts, else CPU).
        threads: intra-op threads for the CPU provider (default :func:`default_threads`).
        output_name: the token-embedding output; default: the first output.
        allow_spinning: let idle ORT threads spin (faster on dedicated cores,
            worse when the cores are shared); default from ``EMBFAST_ORT_SPIN`` (on).
    """

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None,
                 output_name: str | None = None, allow_spinning: bool | None = None):
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        self.threads = default_threads() if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if allow_spinning is None:
            allow_spinning = os.environ.get("EMBFAST_ORT_SPIN", "1") != "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")

        if device == "cuda" and not cuda_available():
            raise DeviceError("device='cuda' needs onnxruntime-gpu (pip uninstall onnxruntime && pip install "
                              f"onnxruntime-gpu); this onnxruntime {ort.__version__} has only "
                              f"{ort.get_available_providers()}")
        providers: list = ["CPUExecutionProvider"]
        if device in ("cuda", "auto") and cuda_available():
            providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own types; turn CUDA start failures into a clear error
            if device == "cuda":
                raise DeviceError(f"the CUDA provider failed to start: {exc}") from exc
            if device != "auto" or len(providers) == 1:
                raise
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise DeviceError("device='cuda' but ONNX Runtime could not start the CUDA provider (no GPU or CUDA "
                              f"libraries missing); it fell back to {self.provider}")
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if output_name is not None and output_name not in outputs:
            raise ValueError(f"{path}: output {output_name!r} not found; outputs are {outputs}")
        self.output_name = output_name or outputs[0]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Run one batch; returns the token embeddings (batch, seq_len, hidden) float32."""
        feeds = {name: feeds[name] for name in self.input_names}
        out = self.session.run([self.output_name], feeds)[0]
        if out.dtype != np.float32:
            out = out.astype(np.float32)
        return out
