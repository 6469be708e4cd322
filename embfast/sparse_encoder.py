"""The sparse encoder (SPLADE) facade: ``SparseEncoder.encode`` -> ``scipy.sparse.csr_array`` (n, vocab).

A SPLADE model is a masked-language model whose MLM logits are pooled into one weight per vocabulary
entry, mostly zero (Formal et al., "SPLADE v2", 2021, arXiv:2109.10086):
``w_j = max_i log(1 + relu(logit_ij))`` (or a sum over tokens ``i``; see :mod:`embfast.sparse_config`).
It is exported once with optimum's ``fill-mask`` task into the same cache as embedders, with the
pooling appended to the graph (:mod:`embfast.sparse_graph`), so only (batch, vocab) floats leave ONNX
Runtime, never the (batch, seq_len, vocab) logits; precision variants as for the Embedder
(:mod:`embfast.variants`).

One documented order, as sentence-transformers' ``SparseEncoder``: prompt -> tokenize (truncate at
max_seq_length, flagged) -> ONNX Runtime on length-sorted batches under a padded-token budget ->
SPLADE pooling in the graph -> ``max_active_dims`` (keep the largest weights of each row; ties to the
lower vocabulary id) -> CSR rows in input order.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from embfast.batching import plan_batches
from embfast.config import is_sparse_folder
from embfast.encoder import CPU_MAX_BATCH_TOKENS, PRECISIONS, EncodeInfo, as_text_list
from embfast.export import ModelKindError, ensure_exported, is_exported, load_manifest
from embfast.session import DEVICES, OnnxSession, resolve_precision
from embfast.sparse_config import SparseEncoderConfig, is_masked_lm
from embfast.sparse_graph import OUTPUT_NAME
from embfast.text import check_text
from embfast.tokenization import TextTokenizer

__all__ = ["SparseEncoder", "resolve_sparse", "to_csr", "keep_top_dims"]


def _csr_module():
    try:
        import scipy.sparse as sp
    except ImportError as exc:  # pragma: no cover - scipy is a dependency of the sparse extra
        raise ImportError("sparse vectors need scipy: pip install 'embfast[sparse]'") from exc
    return sp


def resolve_sparse(model: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None,
                   local_files_only: bool | None = None, token: str | bool | None = None) -> Path:
    """A ready-to-run exported SPLADE folder for ``model``: an embfast export of kind sparse-encoder, a
    sentence-transformers SparseEncoder folder, a plain ``*ForMaskedLM`` folder (exported once, cached), or a
    Hugging Face Hub id ``org/name`` (downloaded with huggingface_hub, then exported; :mod:`embfast.hub`;
    ``revision`` / ``cache_dir`` / ``local_files_only`` / ``token`` apply to it only).

    Raises:
        FileNotFoundError: no such path (:class:`embfast.hub.HubModelNotFoundError` for a repo not cached
        offline). ModelKindError: a model of another kind (an embedder, a cross-encoder). ValueError: neither an
        export nor a Hugging Face folder, or a Hub option given for a local folder.
    """
    if model is None:
        raise TypeError("model must be a sparse encoder folder (there is no bundled sparse encoder)")
    path = Path(model).expanduser()
    hub_opts = [n for n, v in (("revision", revision), ("cache_dir", cache_dir), ("token", token),
                               ("local_files_only", local_files_only)) if v is not None]
    if not path.exists():
        from embfast.hub import is_repo_id

        if is_repo_id(str(model)):
            from embfast.hub import resolve_hub

            folder = resolve_hub(str(model), kind="sparse-encoder", revision=revision, cache_dir=cache_dir,
                                 local_files_only=local_files_only, token=token)
            load_manifest(folder, "sparse-encoder")  # ModelKindError for a repo of another kind
            return folder
        raise FileNotFoundError(f"model not found: {path} (give a sentence-transformers SparseEncoder folder, a "
                                "*ForMaskedLM folder or a folder embfast exported from one)")
    if hub_opts:
        raise ValueError(f"{', '.join(hub_opts)} apply to a Hugging Face Hub id (org/name), not to the folder {path}")
    if is_exported(path):
        return path
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is neither an embfast export (manifest.json + model.onnx) nor a Hugging Face "
                         "model folder (config.json)")
    if is_sparse_folder(path) or (is_masked_lm(path) and not (path / "modules.json").is_file()):
        return ensure_exported(path, kind="sparse-encoder")
    from embfast.config import model_kind
    from embfast.export import _KIND_CLASSES, _KIND_NAMES

    kind = model_kind(path)
    raise ModelKindError(f"{path} is {_KIND_NAMES[kind]}, not a sparse encoder (a *ForMaskedLM model with SPLADE "
                         f"pooling); load it with {_KIND_CLASSES[kind]}")


def keep_top_dims(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, k: int):
    """CSR parts with at most ``k`` entries per row: the largest by absolute value, ties to the lower
    column (sentence-transformers' ``select_max_active_dims``; torch breaks ties arbitrarily).

    Args:
        indptr (n + 1,), indices (nnz,) ascending within each row, data (nnz,): a CSR matrix's arrays.

    Returns:
        (indptr, indices, data) of the kept entries, columns still ascending within each row.
    """
    counts = np.diff(indptr)
    if k < 1 or not (counts > k).any():
        return indptr, indices, data
    keep = np.ones(len(data), dtype=bool)
    for r in np.flatnonzero(counts > k).tolist():
        a, b = int(indptr[r]), int(indptr[r + 1])
        order = np.argsort(-np.abs(data[a:b]), kind="stable")  # stable: equal weights keep the lower column
        keep[a + order[k:]] = False
    new_counts = np.minimum(counts, k)
    return np.concatenate([[0], np.cumsum(new_counts)]).astype(indptr.dtype), indices[keep], data[keep]


def to_csr(dense: np.ndarray, max_active_dims: int | None = None):
    """(n, vocab) float32 rows -> ``scipy.sparse.csr_array`` of their non-zero entries (columns ascending),
    with at most ``max_active_dims`` per row (:func:`keep_top_dims`)."""
    sp = _csr_module()
    dense = np.asarray(dense, dtype=np.float32)
    rows, cols = np.nonzero(dense)
    data = dense[rows, cols]
    indptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=indptr[1:])
    indices = cols.astype(np.int32)
    if max_active_dims is not None:
        indptr, indices, data = keep_top_dims(indptr, indices, data, int(max_active_dims))
    return sp.csr_array((data, indices, indptr), shape=dense.shape)


def _check_max_active_dims(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"max_active_dims must be an int >= 1 or None, got {value!r}")
    return int(value)


class SparseEncoder:
    """A SPLADE sparse encoder on ONNX Runtime, with sentence-transformers' ``SparseEncoder`` vocabulary.

    Args:
        model: a sentence-transformers SparseEncoder folder (MLM transformer + SpladePooling), a plain
            ``*ForMaskedLM`` folder (max pooling, relu: sentence-transformers' defaults for it), or a
            folder embfast exported from one, or a Hugging Face Hub id (``"org/name"``, see :mod:`embfast.hub`).
            Exported to ONNX once, into ``$EMBFAST_HOME``.
        device: "cpu", "cuda" (error when CUDA cannot run) or "auto" (CUDA if it runs, else CPU).
        precision: "fp32" | "int8" (CPU; dynamic quantization, per-channel weights) | "fp16" (CUDA) |
            "auto" (default: fp16 on CUDA, fp32 on the CPU).
        threads: ONNX Runtime intra-op threads (default: the cores this process may use).
        max_seq_length: truncate inputs at this many tokens (special tokens included); at most the model's.
        max_active_dims: default cap on non-zeros per vector (None, default: the model's, else all).
        revision, cache_dir, local_files_only, token: for a Hugging Face Hub id (``"org/name"``): as
            :class:`embfast.Embedder` (defaults None: ``main``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``).

    Raises:
        FileNotFoundError: no such folder, or a Hub repo not cached offline.
        embfast.export.ModelKindError: an embedder or a cross-encoder.
        ModelConfigError: an unsupported sparse module, pooling or activation.

    One SparseEncoder may be called from many threads at once.
    """

    def __init__(self, model: str | Path, *, device: str = "cpu", precision: str = "auto",
                 threads: int | None = None, max_seq_length: int | None = None, max_active_dims: int | None = None,
                 revision: str | None = None, cache_dir: str | Path | None = None,
                 local_files_only: bool | None = None, token: str | bool | None = None):
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        t0 = time.perf_counter()
        self.model_dir = resolve_sparse(model, revision=revision, cache_dir=cache_dir,
                                        local_files_only=local_files_only, token=token)
        self.manifest = load_manifest(self.model_dir, "sparse-encoder")
        self.config = SparseEncoderConfig.from_dict(self.manifest["config"])
        self.precision = resolve_precision(precision, device)
        from embfast.variants import ensure_variant

        self.session = OnnxSession(ensure_variant(self.model_dir, self.precision), device=device, threads=threads,
                                   output_name=OUTPUT_NAME, token_output=False)
        self.device = self.session.device
        if self.precision == "fp16" and self.device != "cuda":
            raise ValueError("precision='fp16' runs on the CUDA provider only; on the CPU use 'fp32' or 'int8'")
        cfg = self.config
        if max_seq_length is not None:
            if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, (int, np.integer)) \
                    or not 1 <= max_seq_length <= cfg.max_seq_length:
                raise ValueError(f"max_seq_length must be an int in [1, {cfg.max_seq_length}], got {max_seq_length!r}")
            cfg.max_seq_length = int(max_seq_length)
        if max_active_dims is not None:
            cfg.max_active_dims = _check_max_active_dims(max_active_dims)
        self.tokenizer = TextTokenizer(self.model_dir / "tokenizer.json", cfg.max_seq_length,
                                       self.session.input_names, padding_side=cfg.padding_side,
                                       do_lower_case=cfg.do_lower_case)
        self.load_seconds = time.perf_counter() - t0

    # ---- properties ------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Columns of a sparse vector (the MLM vocabulary)."""
        return self.config.vocab_size

    dim = vocab_size

    @property
    def max_seq_length(self) -> int:
        return self.config.max_seq_length

    @property
    def max_active_dims(self) -> int | None:
        return self.config.max_active_dims

    @property
    def prompts(self) -> dict[str, str]:
        return dict(self.config.prompts)

    @property
    def name(self) -> str:
        return self.manifest.get("name") or Path(self.model_dir).name

    def __repr__(self) -> str:
        return (f"SparseEncoder({self.name!r}, vocab_size={self.vocab_size}, pooling={self.config.pooling!r}, "
                f"activation={self.config.activation!r}, device={self.device!r}, precision={self.precision!r})")

    # ---- encode ----------------------------------------------------------------
    def _prompt_text(self, prompt: str | None, prompt_name: str | None) -> str:
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if prompt is not None:
            check_text(prompt, "prompt")
            return prompt
        name = prompt_name if prompt_name is not None else self.config.default_prompt_name
        if name is None:
            return ""
        if name not in self.config.prompts:
            raise ValueError(f"prompt_name {name!r} is not one of this model's prompts: "
                             f"{sorted(self.config.prompts) or 'none'}")
        return self.config.prompts[name]

    def encode(self, sentences, batch_size: int = 32, *, max_active_dims: int | None = None,
               prompt: str | None = None, prompt_name: str | None = None, truncate: bool = True,
               show_progress_bar: bool = False, return_info: bool = False,
               max_batch_tokens: int | None | str = "auto"):
        """Encode texts into SPLADE vectors.

        Args:
            sentences: a str (one row) or a list of str (may be empty).
            batch_size: at most this many texts per ONNX Runtime call (default 32).
            max_active_dims: keep at most this many non-zeros per row, the largest (ties to the lower
                vocabulary id); default the encoder's (None: all).
            prompt / prompt_name: text prepended to every input, or the name of one of the model's prompts
                (``prompt`` wins; neither: the model's default prompt, if any).
            truncate: cut inputs longer than max_seq_length (True) or raise InputTooLongError (False).
            show_progress_bar: a tqdm bar over batches.
            return_info: also return an :class:`~embfast.EncodeInfo` (token counts, truncation flags).
            max_batch_tokens: cap on padded tokens (rows x longest row) per batch; None = count cap only;
                "auto" (default) = 1024 on the CPU (also bounds ONNX Runtime's (tokens, vocab) logits
                buffer: 1024 x 30,522 float32 = 125 MB), None on CUDA.

        Returns:
            ``scipy.sparse.csr_array`` of shape (n, vocab_size) float32, columns ascending within a row
            (a str gives shape (1, vocab_size)). With ``return_info``: (vectors, info).

        Raises:
            TypeError / ValueError: bad input (not str, invalid Unicode) or options. InputTooLongError.
        """
        t0 = time.perf_counter()
        texts, _ = as_text_list(sentences)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(truncate, bool):
            raise TypeError(f"truncate must be a bool, got {type(truncate).__name__}")
        k = _check_max_active_dims(max_active_dims) if max_active_dims is not None else self.max_active_dims
        prefix = self._prompt_text(prompt, prompt_name)
        if prefix:
            texts = [prefix + t for t in texts]
        if isinstance(max_batch_tokens, str):
            if max_batch_tokens != "auto":
                raise ValueError(f"max_batch_tokens must be an int >= 1, None or 'auto', got {max_batch_tokens!r}")
            max_batch_tokens = None if self.device == "cuda" else CPU_MAX_BATCH_TOKENS
        tok = self.tokenizer.tokenize(texts, truncate=truncate)
        batches = plan_batches(tok.lengths, batch_size, max_batch_tokens)
        if show_progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode", unit="batch")
        sp = _csr_module()
        pieces, order = [], []
        for rows in batches:
            pieces.append(self.postprocess(self.embed_token_ids(tok.ids, rows), max_active_dims=k))
            order.append(np.asarray(rows))
        if pieces:
            stacked = sp.vstack(pieces, format="csr")
            inverse = np.empty(len(texts), dtype=np.int64)
            inverse[np.concatenate(order)] = np.arange(len(texts))
            out = sp.csr_array(stacked[inverse])
        else:
            out = sp.csr_array((len(texts), self.vocab_size), dtype=np.float32)
        out.sort_indices()
        info = EncodeInfo(tok.lengths, tok.truncated, time.perf_counter() - t0)
        return (out, info) if return_info else out

    def encode_query(self, sentences, prompt_name: str | None = None, prompt: str | None = None, **kwargs):
        """:meth:`encode` for search queries: the model's "query" prompt unless a prompt is given."""
        if prompt_name is None and prompt is None and "query" in self.config.prompts:
            prompt_name = "query"
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_document(self, sentences, prompt_name: str | None = None, prompt: str | None = None, **kwargs):
        """:meth:`encode` for documents: the first of the model's "document", "passage", "corpus" prompts."""
        if prompt_name is None and prompt is None:
            prompt_name = next((n for n in ("document", "passage", "corpus") if n in self.config.prompts), None)
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    # ---- the two halves of encode, for batchers that merge many callers ---------------------------
    def embed_token_ids(self, ids: list[list[int]], rows, *, type_ids=None, prompt_length=None) -> np.ndarray:
        """Run one batch: pad ``ids[rows]``, run the graph (MLM + SPLADE pooling).

        The name is the batcher's protocol (:class:`~embfast.DynamicBatcher`); ``type_ids`` and
        ``prompt_length`` are accepted and unused. Returns (len(rows), vocab_size) float32. Thread-safe.
        """
        feeds = self.tokenizer.pad(ids, np.asarray(rows))
        return self.session.run(feeds)

    def postprocess(self, pooled: np.ndarray, *, max_active_dims: int | None = None):
        """(n, vocab_size) pooled rows -> ``csr_array`` with at most ``max_active_dims`` entries per row."""
        return to_csr(pooled, max_active_dims)

    def count_tokens(self, sentences) -> np.ndarray:
        """(n,) tokens each text feeds the model (after truncation, special tokens included)."""
        texts, _ = as_text_list(sentences)
        return self.tokenizer.count_tokens(texts)

    # ---- decode ------------------------------------------------------------------
    def decode(self, embeddings, top_k: int | None = None):
        """(token, weight) pairs of sparse vectors, best first (sentence-transformers' ``decode``).

        Args:
            embeddings: one row: a (1, vocab) / (vocab,) sparse array or matrix, or a 1-D dense array;
                several rows: an (n, vocab) sparse array (a list of lists comes back).
            top_k: at most this many pairs per row (None, default: every non-zero); >= 1.

        Returns:
            ``[(token, weight), ...]`` sorted by weight descending, ties by the lower vocabulary id; a list
            of those for an (n, vocab) input with n != 1.

        Raises:
            ValueError: top_k < 1, a width other than vocab_size. TypeError: not an array.
        """
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
        sp = _csr_module()
        if sp.issparse(embeddings):
            m = sp.csr_array(embeddings.reshape(1, -1) if embeddings.ndim == 1 else embeddings)
        elif isinstance(embeddings, np.ndarray) and embeddings.ndim in (1, 2):
            m = sp.csr_array(np.atleast_2d(embeddings).astype(np.float32))
        else:
            raise TypeError("embeddings must be a scipy sparse array or a numpy array, got "
                            f"{type(embeddings).__name__}")
        if m.shape[1] != self.vocab_size:
            raise ValueError(f"embeddings must have {self.vocab_size} columns (the vocabulary), got {m.shape[1]}")
        m.sum_duplicates()
        out = []
        for r in range(m.shape[0]):
            a, b = m.indptr[r], m.indptr[r + 1]
            cols, vals = m.indices[a:b], m.data[a:b]
            nz = vals != 0
            cols, vals = cols[nz], vals[nz]
            order = np.lexsort((cols, -vals.astype(np.float64)))[:top_k]
            tok = self.tokenizer.tokenizer
            out.append([(tok.id_to_token(int(c)), float(v)) for c, v in zip(cols[order], vals[order], strict=True)])
        return out[0] if m.shape[0] == 1 else out
