"""embfast: fast, exact text embeddings on ONNX Runtime with native pooling and top-k kernels.

>>> import embfast
>>> m = embfast.Embedder()                       # bundled all-MiniLM-L6-v2, CPU, fp32
>>> v = m.encode(["The cat sat on the mat"])     # (1, 384) float32
"""

from __future__ import annotations

from embfast.clustering import kmeans
from embfast.cross_encoder import CrossEncoder
from embfast.dynamic import DynamicBatcher, OverloadedError
from embfast.encoder import Embedder, EncodeInfo
from embfast.index import Index as Index
from embfast.info import build_info
from embfast.mining import community_detection, paraphrase_mining
from embfast.quantization import quantize_embeddings
from embfast.search import semantic_search, sparse_search
from embfast.session import DeviceError
from embfast.sparse_encoder import SparseEncoder
from embfast.tokenization import InputTooLongError

__version__ = "0.1.0"

__all__ = ["CrossEncoder", "DynamicBatcher", "OverloadedError", "SparseEncoder", "sparse_search",
           "DeviceError", "EncodeInfo", "Embedder", "InputTooLongError", "__version__", "build_info",
           "community_detection", "kmeans", "paraphrase_mining", "quantize_embeddings", "semantic_search"]
