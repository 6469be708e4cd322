"""The cross-encoder (reranker) facade: ``CrossEncoder.predict`` and ``CrossEncoder.rank``.

A cross-encoder reads a query and a passage together and gives one score (or
``num_labels`` logits) per pair. It is a Hugging Face ``*ForSequenceClassification``
folder, as sentence-transformers' ``CrossEncoder`` saves it (5.x or 4.x layout) or a
plain classifier. It is exported once with optimum's ``text-classification`` task
into the same cache as embedders (:mod:`embfast.export`), with the same precision
variants (:mod:`embfast.variants`: fp32 optimized, int8 per-channel dynamic
quantization on the CPU, fp16 on CUDA).

One documented order, as sentence-transformers: pair -> tokenize (the tokenizer's
own pair template, ``[CLS] q [SEP] p [SEP]`` / ``<s> q </s></s> p </s>``, segment ids
where the model takes them, longest-first truncation at ``max_seq_length``,
flagged) -> ONNX Runtime on length-sorted batches under a padded-token budget ->
logits (batch, num_labels) -> activation (the model's, or ``activation_fn``) ->
softmax if asked -> scores in input order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from embfast.batching import plan_batches
from embfast.config import CE_ACTIVATIONS, CrossEncoderConfig
from embfast.dense import activate
from embfast.encoder import CPU_MAX_BATCH_TOKENS, PRECISIONS, EncodeInfo
from embfast.export import load_manifest
from embfast.models import resolve
from embfast.session import DEVICES, OnnxSession, resolve_precision
from embfast.text import InvalidTextError, lone_surrogate, surrogate_reason
from embfast.tokenization import TextTokenizer

__all__ = ["CrossEncoder", "parse_pairs", "apply_activation"]

ACTIVATION_NAMES = tuple(n.lower() for n in CE_ACTIVATIONS)


def _is_seq(x) -> bool:
    return isinstance(x, (list, tuple))


def parse_pairs(inputs, name: str = "inputs") -> tuple[list, bool]:
    """Validate cross-encoder input, with sentence-transformers' rules for what is one input.

    - a ``str``: one single text (scored alone);
    - a list / tuple / 1-D string array of exactly two ``str``: one pair (query, passage);
    - a list / tuple / 2-D string array whose items are pairs (two ``str``) or single texts (``str``, or
      a list / tuple of one ``str``: a batch of single texts only is written ``[["a"], ["b"]]``, since
      ``["a", "b"]`` is one pair): a batch; ``[]`` is an empty batch.

    Returns:
        (items, single): items are ``str`` or ``(str, str)`` tuples; single says one input was given.

    Raises:
        TypeError: a non-str text, bytes, None, a dict, nested deeper than pairs.
        ValueError: a pair without exactly two texts; invalid Unicode (:class:`embfast.text.InvalidTextError`).
    """
    if isinstance(inputs, str):
        items, single = [inputs], True
    elif isinstance(inputs, np.ndarray):
        if inputs.dtype.kind not in "UO" or inputs.ndim not in (1, 2):
            raise TypeError(f"{name} must be a 1-D (one pair) or 2-D (pairs) array of str, got {inputs.dtype} "
                            f"shape {inputs.shape}")
        return parse_pairs(inputs.tolist() if inputs.ndim == 2 else tuple(inputs.tolist()), name)
    elif _is_seq(inputs):
        if inputs and not any(_is_seq(x) for x in inputs):  # one pair, as sentence-transformers reads it
            items, single = [tuple(inputs)], True
        else:
            items, single = list(inputs), False
    elif inputs is None or isinstance(inputs, (bytes, bytearray)):
        raise TypeError(f"{name} must be a pair of str, a str or a list of them, got "
                        f"{'None' if inputs is None else 'bytes; decode it first'}")
    else:
        raise TypeError(f"{name} must be a pair (query, passage) of str, a str or a list of them, got "
                        f"{type(inputs).__name__}")
    out: list = []
    for i, item in enumerate(items):
        where = name if single else f"{name}[{i}]"
        if isinstance(item, str):
            _check_text(item, where, i)
            out.append(item)
            continue
        if not _is_seq(item):
            raise TypeError(f"{where} must be a pair of str or a str, got {type(item).__name__}")
        if len(item) == 1 and isinstance(item[0], str):
            _check_text(item[0], f"{where}[0]", i)
            out.append(item[0])
            continue
        if len(item) != 2:
            raise ValueError(f"{where} must be a pair of exactly 2 texts (query, passage), got {len(item)}"
                             + ("; for several inputs pass a list of pairs" if single and len(item) > 2 else ""))
        for k, text in enumerate(item):
            if not isinstance(text, str):
                raise TypeError(f"{where}[{k}] must be a str, got {type(text).__name__}"
                                + ("; pairs hold two texts, not lists" if _is_seq(text) else ""))
            _check_text(text, f"{where}[{k}]", i)
        out.append((item[0], item[1]))
    return out, single


def _check_text(text: str, where: str, index: int) -> None:
    """InvalidTextError (a ValueError) naming ``where`` for a lone surrogate (:mod:`embfast.text`)."""
    pos = lone_surrogate(text)
    if pos >= 0:
        raise InvalidTextError(f"{where} has {surrogate_reason(text, pos)}; a str must be encodable as UTF-8",
                               index=index, position=pos, codepoint=ord(text[pos]))


def apply_activation(logits: np.ndarray, activation: str | Callable, apply_softmax: bool = False) -> np.ndarray:
    """Scores from logits (n, num_labels), as sentence-transformers' ``predict``: activation, then a softmax
    over each row if asked (also with one label, where every score becomes 1.0, as sentence-transformers
    does).

    Args:
        logits: (n, num_labels) float32.
        activation: identity | sigmoid | tanh | relu | gelu | silu, or a callable taking and returning an
            (n, num_labels) array.
    """
    scores = activation(logits) if callable(activation) else activate(logits, activation)
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != logits.shape:
        raise ValueError(f"activation_fn must keep the shape {logits.shape}, got {scores.shape}")
    if apply_softmax:
        z = scores - scores.max(axis=1, keepdims=True)
        e = np.exp(z)
        scores = e / e.sum(axis=1, keepdims=True)
    return scores


class CrossEncoder:
    """A cross-encoder (reranker) on ONNX Runtime, with sentence-transformers' ``predict`` and ``rank``.

    Args:
        model: a sentence-transformers CrossEncoder / Hugging Face ``*ForSequenceClassification`` folder
            (exported to ONNX once, into ``$EMBFAST_HOME``), a folder embfast exported from one, or a
            Hugging Face Hub id (``"org/name"``, see :mod:`embfast.hub`).
        device: "cpu", "cuda" (error when CUDA cannot run) or "auto" (CUDA if it runs, else CPU).
        precision: "fp32" | "int8" (CPU; dynamic quantization, per-channel weights) | "fp16" (CUDA) |
            "auto" (default: fp16 on CUDA, fp32 on the CPU).
        threads: ONNX Runtime intra-op threads (default: the cores this process may use).
        max_seq_length: truncate pairs at this many tokens (special tokens included); at most the
            model's own (default: the model's, see :class:`~embfast.config.CrossEncoderConfig`).
        max_length: the same limit under sentence-transformers' CrossEncoder name (give one of the two).
        revision, cache_dir, local_files_only, token: for a Hugging Face Hub id (``"org/name"``): as
            :class:`embfast.Embedder` (defaults None: ``main``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``).

    Raises:
        FileNotFoundError: no such folder, or a Hub repo not cached offline
        (:class:`embfast.hub.HubModelNotFoundError`). embfast.export.ModelKindError: an embedding model (use
        :class:`embfast.Embedder`). ModelConfigError: an unsupported activation or architecture.

    One CrossEncoder may be called from many threads at once.
    """

    def __init__(self, model: str | Path, *, device: str = "cpu", precision: str = "auto",
                 threads: int | None = None, max_seq_length: int | None = None, max_length: int | None = None,
                 revision: str | None = None, cache_dir: str | Path | None = None,
                 local_files_only: bool | None = None, token: str | bool | None = None):
        if max_length is not None:  # sentence-transformers' CrossEncoder name for the same limit
            if max_seq_length is not None and max_seq_length != max_length:
                raise ValueError(f"max_length ({max_length}) and max_seq_length ({max_seq_length}) name the same "
                                 "limit: give one")
            max_seq_length = max_length
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if model is None:
            raise TypeError("model must be a cross-encoder folder (there is no bundled cross-encoder)")
        t0 = time.perf_counter()
        self.model_dir = resolve(model, kind="cross-encoder", revision=revision, cache_dir=cache_dir,
                                 local_files_only=local_files_only, token=token)
        self.manifest = load_manifest(self.model_dir, "cross-encoder")
        self.config = CrossEncoderConfig.from_dict(self.manifest["config"])
        self.precision = resolve_precision(precision, device)
        from embfast.variants import ensure_variant

        self.session = OnnxSession(ensure_variant(self.model_dir, self.precision), device=device, threads=threads,
                                   output_name=self.manifest.get("output_name", "logits"), token_output=False)
        self.device = self.session.device
        if self.precision == "fp16" and self.device != "cuda":
            raise ValueError("precision='fp16' runs on the CUDA provider only; on the CPU use 'fp32' or 'int8'")
        cfg = self.config
        if max_seq_length is not None:
            if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, (int, np.integer)) \
                    or not 1 <= max_seq_length <= cfg.max_seq_length:
                raise ValueError(f"max_seq_length must be an int in [1, {cfg.max_seq_length}], got {max_seq_length!r}")
            cfg.max_seq_length = int(max_seq_length)
        self.tokenizer = TextTokenizer(self.model_dir / "tokenizer.json", cfg.max_seq_length,
                                       self.session.input_names, padding_side=cfg.padding_side,
                                       do_lower_case=cfg.do_lower_case)
        self.load_seconds = time.perf_counter() - t0

    # ---- properties ------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    @property
    def max_seq_length(self) -> int:
        return self.config.max_seq_length

    @property
    def name(self) -> str:
        return self.manifest.get("name") or Path(self.model_dir).name

    def __repr__(self) -> str:
        return (f"CrossEncoder({self.name!r}, num_labels={self.num_labels}, activation={self.config.activation!r}, "
                f"device={self.device!r}, precision={self.precision!r})")

    # ---- predict -----------------------------------------------------------------
    def _activation(self, activation_fn) -> str | Callable:
        if activation_fn is None:
            return self.config.activation
        if isinstance(activation_fn, str):
            name = activation_fn.rsplit(".", 1)[-1].lower()
            if name not in ACTIVATION_NAMES:
                raise ValueError(f"activation_fn must be one of {', '.join(ACTIVATION_NAMES)} or a callable, "
                                 f"got {activation_fn!r}")
            return name
        if callable(activation_fn):
            return activation_fn
        raise TypeError(f"activation_fn must be a str, a callable or None, got {type(activation_fn).__name__}")

    def predict(self, inputs, batch_size: int = 32, *, activation_fn: str | Callable | None = None,
                apply_softmax: bool = False, convert_to_numpy: bool = True, truncate: bool = True,
                return_info: bool = False, show_progress_bar: bool = False,
                max_batch_tokens: int | None | str = "auto"):
        """Score pairs (or single texts).

        Args:
            inputs: one pair ``(query, passage)`` (a list or tuple of two str), one str, or a list of
                pairs and / or str (may be empty). See :func:`parse_pairs`.
            batch_size: at most this many inputs per ONNX Runtime call (default 32).
            activation_fn: None (default: the model's, see :class:`~embfast.config.CrossEncoderConfig`),
                a name (identity | sigmoid | tanh | relu | gelu | silu, or a torch path ending in one),
                or a callable on the (n, num_labels) float32 logits.
            apply_softmax: softmax over the labels after the activation (default False).
            convert_to_numpy: False returns a list of per-input scores instead of one array.
            truncate: cut pairs longer than max_seq_length, one token at a time from the longer text
                (True, default), or raise :class:`~embfast.InputTooLongError` (False).
            return_info: also return an :class:`~embfast.EncodeInfo` (tokens per input, truncated flags).
            show_progress_bar: a tqdm bar over batches.
            max_batch_tokens: cap on padded tokens (rows x longest row) per batch; None = count cap only;
                "auto" (default) = 1024 on the CPU, None on CUDA.

        Returns:
            One label: (n,) float32, or a float for one input. ``num_labels`` > 1: (n, num_labels)
            float32, or (num_labels,) for one input. ``[]`` gives (0,) or (0, num_labels).
            With ``return_info``: (scores, info).

        Raises:
            TypeError / ValueError: bad input (see :func:`parse_pairs`) or options. InputTooLongError.
        """
        t0 = time.perf_counter()
        items, single = parse_pairs(inputs)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(truncate, bool):
            raise TypeError(f"truncate must be a bool, got {type(truncate).__name__}")
        activation = self._activation(activation_fn)
        if isinstance(max_batch_tokens, str):
            if max_batch_tokens != "auto":
                raise ValueError(f"max_batch_tokens must be an int >= 1, None or 'auto', got {max_batch_tokens!r}")
            max_batch_tokens = None if self.device == "cuda" else CPU_MAX_BATCH_TOKENS
        tok = self.tokenizer.tokenize(items, truncate=truncate)
        batches = plan_batches(tok.lengths, batch_size, max_batch_tokens)
        if show_progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="predict", unit="batch")
        logits = np.empty((len(items), self.num_labels), dtype=np.float32)
        for rows in batches:
            logits[rows] = self.embed_token_ids(tok.ids, rows, type_ids=tok.type_ids)
        scores = self.postprocess(logits, activation_fn=activation, apply_softmax=apply_softmax)
        info = EncodeInfo(tok.lengths, tok.truncated, time.perf_counter() - t0)
        result = self.format_scores(scores, single, convert_to_numpy)
        return (result, info) if return_info else result

    def rank(self, query: str, documents, top_k: int | None = None, *, return_documents: bool = False,
             batch_size: int = 32, activation_fn: str | Callable | None = None, apply_softmax: bool = False,
             truncate: bool = True):
        """Score every document against ``query`` and sort, best first (sentence-transformers' ``rank``).

        Args:
            query: a str.
            documents: a list of str (may be empty).
            top_k: keep the best ``top_k`` (None, default: all).
            return_documents: add each document's text under ``"text"``.
            batch_size / activation_fn / apply_softmax / truncate: as :meth:`predict`.

        Returns:
            ``[{"corpus_id": int, "score": float, "text"?: str}, ...]`` sorted by score, descending; ties
            keep the lower ``corpus_id`` first.

        Raises:
            ValueError: a model with more than one label (use :meth:`predict`), top_k < 0.
            TypeError: a query that is not a str, documents that are not a list of str.
        """
        if self.num_labels != 1:
            raise ValueError(f"rank needs a model with one label (a score per pair); this one has "
                             f"{self.num_labels}: use predict with pairs instead")
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        documents = _check_documents(documents)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0):
            raise ValueError(f"top_k must be an int >= 0 or None, got {top_k!r}")
        scores = self.predict([(query, d) for d in documents], batch_size, activation_fn=activation_fn,
                              apply_softmax=apply_softmax, truncate=truncate)
        return rank_results(scores, documents if return_documents else None, top_k)

    # ---- the two halves of predict, for batchers that merge many callers -------------------------
    def embed_token_ids(self, ids: list[list[int]], rows, *, type_ids: list[list[int]] | None = None,
                        prompt_length=None) -> np.ndarray:
        """Run one batch: pad ``ids[rows]`` (with their segment ids), run ONNX Runtime.

        The name is the batcher's protocol (:class:`~embfast.DynamicBatcher`); ``prompt_length`` is
        accepted and unused. Returns (len(rows), num_labels) float32 logits. Thread-safe.
        """
        feeds = self.tokenizer.pad(ids, np.asarray(rows), type_ids)
        return self.session.run(feeds)

    def postprocess(self, logits: np.ndarray, *, activation_fn: str | Callable | None = None,
                    apply_softmax: bool = False) -> np.ndarray:
        """Scores from (n, num_labels) logits: activation (None: the model's) then softmax if asked."""
        return apply_activation(logits, self._activation(activation_fn), apply_softmax)

    def format_scores(self, scores: np.ndarray, single: bool, convert_to_numpy: bool = True):
        """(n, num_labels) scores in predict's return shape (see :meth:`predict`)."""
        if self.num_labels == 1:
            scores = scores[:, 0]
            if single:
                return float(scores[0])
        if single:
            return scores[0]
        return scores if convert_to_numpy else list(scores)


def _check_documents(documents) -> list[str]:
    if isinstance(documents, np.ndarray) and documents.ndim == 1:
        documents = documents.tolist()
    if not isinstance(documents, (list, tuple)):
        raise TypeError(f"documents must be a list of str, got {type(documents).__name__}")
    for i, d in enumerate(documents):
        if not isinstance(d, str):
            raise TypeError(f"documents[{i}] must be a str, got {type(d).__name__}")
    return list(documents)


def rank_results(scores: np.ndarray, documents: list[str] | None = None, top_k: int | None = None) -> list[dict]:
    """``[{"corpus_id", "score", "text"?}]`` best first from (n,) scores; ties keep the lower index first."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if top_k is not None:
        order = order[:top_k]
    out = []
    for i in order.tolist():
        hit = {"corpus_id": i, "score": float(scores[i])}
        if documents is not None:
            hit["text"] = documents[i]
        out.append(hit)
    return out


def rerank_search(index, queries, top_k: int, reranker: CrossEncoder, candidates: int = 100,
                  **search_kwargs) -> list[list[dict]]:
    """``index.search`` for ``max(top_k, candidates)`` rows, then each query's rows scored by ``reranker``
    (all pairs of all queries in one :meth:`CrossEncoder.predict`: one length sort) and the best ``top_k``
    kept. Hits keep their fields; ``score`` becomes the reranker's, ``retrieval_score`` the index's.

    Raises:
        TypeError: ``reranker`` is not a CrossEncoder; queries that are vectors (the reranker reads text).
        ValueError: a multi-label reranker, ``candidates`` < 1, rows without texts.
    """
    if not isinstance(reranker, CrossEncoder):
        raise TypeError(f"rerank must be an embfast.CrossEncoder, got {type(reranker).__name__}")
    if reranker.num_labels != 1:
        raise ValueError(f"rerank needs a cross-encoder with one label, this one has {reranker.num_labels}")
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise ValueError(f"rerank_candidates must be an int >= 1, got {candidates!r}")
    texts = [queries] if isinstance(queries, str) else queries
    if not isinstance(texts, (list, tuple)) or not all(isinstance(q, str) for q in texts):
        raise TypeError("rerank needs text queries (a str or a list of str): the cross-encoder reads the query")
    hits = index.search(list(texts), max(int(top_k), int(candidates)), **search_kwargs)
    pairs = []
    for q, row in zip(texts, hits, strict=True):
        for h in row:
            if h.get("text") is None:
                raise ValueError(f"row {h['id']!r} has no text to rerank: add rows with texts")
            pairs.append((q, h["text"]))
    scores = reranker.predict(pairs, search_kwargs.get("batch_size", 32)) if pairs else np.zeros(0, np.float32)
    out, start = [], 0
    for row in hits:
        s = scores[start:start + len(row)]
        start += len(row)
        out.append([{**row[i], "score": float(s[i]), "retrieval_score": row[i]["score"]}
                    for i in np.argsort(-s, kind="stable")[:top_k].tolist()])
    return out
