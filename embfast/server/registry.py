"""The models one ``embfast serve`` process serves, and which one a request gets.

A server holds any number of models of three kinds: embedders (:class:`~embfast.Embedder`, for the OpenAI, TEI
and Cohere embedding routes), cross-encoders (:class:`~embfast.CrossEncoder`, for the rerank routes) and sparse
encoders (:class:`~embfast.SparseEncoder`, for ``/embed_sparse``). Each has its names (``--served-model-name``
aliases, else the model's own name) and its own :class:`~embfast.DynamicBatcher`.

Routing (:meth:`ModelRegistry.pick`): a request names its model in the body's ``model`` field (OpenAI, Cohere,
TEI rerank) or in a ``?model=`` query parameter (any route). No name: the first model of the route's kind.
A served name of another kind: 424 naming the kind and the models that fit. A name nobody serves: 404 listing
the served names, unless only one model of the route's kind is served, which then answers whatever name the
client sends (clients send their own defaults, such as OpenAI's ``text-embedding-3-small``; TEI ignores the
field the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from embfast.server.common import ApiError

#: the model kinds, as manifests name them, and what each serves
KIND_ROUTES = {"embedder": "/v1/embeddings, /embed, /v2/embed", "cross-encoder": "/rerank, /predict, /v1/rerank",
               "sparse-encoder": "/embed_sparse"}
_NO_MODEL = {
    "embedder": ("this server has no embedding model (it serves {others}): use {their_routes}",
                 "model_not_embedder"),
    "cross-encoder": ("this server has no reranker: start it with a cross-encoder (--model CROSS_ENCODER_DIR or "
                      "--reranker CROSS_ENCODER_DIR)", "model_not_reranker"),
    "sparse-encoder": ("this server has no sparse (SPLADE) model: start it with --sparse SPARSE_ENCODER_DIR or a "
                       "sparse encoder as --model", "model_not_sparse"),
}


def model_kind_of(model) -> str:
    """"embedder", "cross-encoder" or "sparse-encoder" for a loaded embfast model (TypeError for anything else)."""
    from embfast.cross_encoder import CrossEncoder
    from embfast.encoder import Embedder
    from embfast.sparse_encoder import SparseEncoder

    if isinstance(model, CrossEncoder):
        return "cross-encoder"
    if isinstance(model, SparseEncoder):
        return "sparse-encoder"
    if isinstance(model, Embedder):
        return "embedder"
    raise TypeError(f"a served model must be an embfast Embedder, CrossEncoder or SparseEncoder, got "
                    f"{type(model).__name__}")


def weights_bytes(model) -> int | None:
    """Bytes of the ONNX file the model runs (with its external-data files): what its weights hold in memory."""
    path = getattr(getattr(model, "session", None), "path", None)
    if path is None or not Path(path).is_file():
        return None
    path = Path(path)
    extra = [p for p in path.parent.iterdir() if p.name != path.name and p.name.startswith(path.name)]
    return path.stat().st_size + sum(p.stat().st_size for p in extra if p.is_file())


@dataclass
class ServedModel:
    """One served model: its names (the first is what answers carry), kind, model, batcher and memory figures."""

    names: tuple[str, ...]
    kind: str
    model: object
    batcher: object
    owned: bool = True  # the app made the batcher and closes it at shutdown
    rss_load_bytes: int | None = None  # process RSS growth while `embfast serve` loaded it (None: handed in)
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def dim(self) -> int:
        return int(self.model.dim) if self.kind == "embedder" else 0

    @property
    def prompts(self) -> dict:
        if self.kind == "embedder":
            return dict(self.model.config.prompts)
        return dict(getattr(self.model, "prompts", {}) or {})

    def describe(self) -> dict:
        """What /v1/models and /info say of this model."""
        m = self.model
        out = {"id": self.name, "aliases": list(self.names[1:]), "kind": self.kind, "model_dir": str(m.model_dir),
               "max_seq_length": int(m.config.max_seq_length), "precision": m.precision, "device": m.device,
               "threads": m.session.threads, "workers": self.batcher.workers,
               "memory": {"weights_bytes": weights_bytes(m), "rss_load_bytes": self.rss_load_bytes}}
        if self.kind == "embedder":
            out.update(dim=self.dim, pooling=m.config.pooling, normalize=m.config.normalize)
        elif self.kind == "cross-encoder":
            out.update(dim=None, num_labels=m.num_labels, activation=m.config.activation)
        else:
            out.update(dim=int(m.vocab_size), pooling="splade")
        return out


class ModelRegistry:
    """The served models, in the order given; see the module docstring for how a request's model is chosen."""

    def __init__(self, entries: list[ServedModel]):
        if not entries:
            raise ValueError("nothing to serve: give an Embedder, a CrossEncoder, a SparseEncoder, or several")
        seen: dict[str, str] = {}
        for e in entries:
            for n in e.names:
                if not isinstance(n, str) or not n:
                    raise ValueError(f"a served model name must be a non-empty string, got {n!r}")
                if n in seen:
                    raise ValueError(f"two served models are named {n!r} ({seen[n]} and {e.model!r}); give each "
                                     "its own name with --served-model-name")
                seen[n] = repr(e.model)
        self.entries = list(entries)
        self._by_name = {n: e for e in entries for n in e.names}

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def of_kind(self, kind: str) -> list[ServedModel]:
        return [e for e in self.entries if e.kind == kind]

    def default(self, kind: str) -> ServedModel | None:
        """The first model of ``kind``, or None."""
        return next((e for e in self.entries if e.kind == kind), None)

    def names(self) -> list[str]:
        return [n for e in self.entries for n in e.names]

    def find(self, name: str | None) -> ServedModel | None:
        """The model served under ``name`` (None: not served)."""
        return self._by_name.get(name) if name else None

    def pick(self, kind: str, requested: str | None = None) -> ServedModel:
        """The model of ``kind`` a request asking for ``requested`` (None: any) gets.

        Raises:
            ApiError: 424 when no model of ``kind`` is served or ``requested`` names one of another kind; 404 when
            several models of ``kind`` are served and none is named ``requested`` (the message lists them);
            422 for a ``requested`` that is not a string.
        """
        if requested is not None and not isinstance(requested, str):
            raise ApiError(422, f"model must be a string, got {type(requested).__name__}", code="invalid_parameter",
                           param="model")
        fits = self.of_kind(kind)
        named = self.find(requested)
        if named is not None and named.kind == kind:
            return named
        if not fits:
            message, code = _NO_MODEL[kind]
            others = sorted({e.kind for e in self.entries})
            raise ApiError(424, message.format(others=", ".join(f"a {k}" for k in others),
                                               their_routes=" or ".join(KIND_ROUTES[k] for k in others)), code=code)
        if named is not None:
            raise ApiError(424, f"model {requested!r} is a {named.kind}, not a {kind}; this route's models: "
                           f"{', '.join(e.name for e in fits)}", code="wrong_model_kind", param="model")
        if not requested or len(fits) == 1:
            return fits[0]
        raise ApiError(404, f"model {requested!r} is not served here; {kind} models: "
                       f"{', '.join(n for e in fits for n in e.names)} (all served: {', '.join(self.names())})",
                       code="model_not_found", param="model")
