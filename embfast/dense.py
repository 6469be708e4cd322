"""sentence-transformers ``Dense`` layers after pooling, run in NumPy.

A Dense module computes ``activation(x @ W.T + b)`` on the pooled sentence
embedding (EmbeddingGemma: 768 -> 3072 -> 768, no bias, identity). Pooling
runs in our kernels, outside the ONNX graph, so the layers that follow it run
here too: the exported transformer graph stays exactly what optimum produced
(the optimizer, int8 quantization and fp16 variants all work on it unchanged),
and the heads are a few small matrix products per batch (well under 1% of the
encode time).

At export the weights are read from each ``N_Dense/`` folder
(``model.safetensors`` or ``pytorch_model.bin``) and stored as float32 in one
``dense.npz`` next to ``model.onnx``, so running needs neither torch nor the
source folder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DENSE_FILE = "dense.npz"


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to float32 accuracy (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7), NumPy only."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow: exp only ever sees -|x|."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0, e) / (1.0 + e)


def activate(x: np.ndarray, name: str) -> np.ndarray:
    """Apply the activation ``name`` (identity | tanh | relu | sigmoid | gelu | silu) to a float array."""
    if name == "identity":
        return x
    if name == "tanh":
        return np.tanh(x)
    if name == "relu":
        return np.maximum(x, 0)
    if name == "sigmoid":
        return _sigmoid(x)
    if name == "silu":
        return x * _sigmoid(x)
    if name == "gelu":  # torch.nn.GELU's default: the exact erf form
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    raise ValueError(f"activation must be one of identity, tanh, relu, sigmoid, gelu, silu, got {name!r}")


def _load_state(layer_dir: Path) -> dict[str, np.ndarray]:
    if (layer_dir / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        return load_file(str(layer_dir / "model.safetensors"))
    if (layer_dir / "pytorch_model.bin").is_file():
        import torch

        state = torch.load(layer_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise FileNotFoundError(f"{layer_dir} has no model.safetensors or pytorch_model.bin")


def export_dense(src: Path, layers: Sequence[dict], out_dir: Path) -> None:
    """Read the Dense weights of ``src`` (per :attr:`ModelConfig.dense`) into ``out_dir/dense.npz``.

    Raises:
        ValueError: a weight is missing or its shape disagrees with the layer's config.json.
    """
    arrays: dict[str, np.ndarray] = {}
    for i, layer in enumerate(layers):
        layer_dir = src / layer["path"]
        state = _load_state(layer_dir)
        weight = state.get("linear.weight")
        expected = (layer["out_features"], layer["in_features"])
        if weight is None or tuple(weight.shape) != expected:
            raise ValueError(f"{layer_dir}: linear.weight must have shape {expected}, got "
                             f"{None if weight is None else tuple(weight.shape)}")
        arrays[f"{i}.weight"] = np.ascontiguousarray(weight, dtype=np.float32)
        if layer["bias"]:
            bias = state.get("linear.bias")
            if bias is None or tuple(bias.shape) != (layer["out_features"],):
                raise ValueError(f"{layer_dir}: linear.bias must have shape ({layer['out_features']},), got "
                                 f"{None if bias is None else tuple(bias.shape)}")
            arrays[f"{i}.bias"] = np.asarray(bias, dtype=np.float32)
    np.savez(out_dir / DENSE_FILE, **arrays)


class DenseStack:
    """The Dense layers of an exported model, applied in order to pooled vectors.

    Args:
        folder: the exported folder holding ``dense.npz``.
        layers: the layer settings (:attr:`ModelConfig.dense`).
    """

    def __init__(self, folder: str | Path, layers: Sequence[dict]):
        self.layers = list(layers)
        self.weights: list[tuple[np.ndarray, np.ndarray | None]] = []
        if not self.layers:
            return
        path = Path(folder) / DENSE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the model has Dense layers; export it again")
        with np.load(path) as data:
            for i, layer in enumerate(self.layers):
                w = data[f"{i}.weight"]
                b = data[f"{i}.bias"] if layer["bias"] else None
                # x @ W.T with W.T kept contiguous: one BLAS sgemm per layer
                self.weights.append((np.ascontiguousarray(w.T), b))

    def __bool__(self) -> bool:
        return bool(self.layers)

    @property
    def out_features(self) -> int | None:
        return self.layers[-1]["out_features"] if self.layers else None

    def __call__(self, pooled: np.ndarray) -> np.ndarray:
        """(n, in_features) float32 -> (n, out_features) float32; returns ``pooled`` itself with no layers."""
        x = np.asarray(pooled, dtype=np.float32)
        for layer, (wt, b) in zip(self.layers, self.weights, strict=True):
            if x.shape[-1] != wt.shape[0]:
                raise ValueError(f"Dense {layer['path']}: input must have {wt.shape[0]} columns, got {x.shape[-1]}")
            x = x @ wt
            if b is not None:
                x = x + b
            x = activate(x, layer["activation"]).astype(np.float32, copy=False)
        return x
