"""Read what a sparse encoder (SPLADE) folder says about itself: pooling, activation, vocabulary, prompts.

A sparse encoder is a masked-language model (``*ForMaskedLM``: its MLM head gives one logit per
vocabulary entry and token) followed by SPLADE pooling (Formal et al., "SPLADE v2", 2021,
arXiv:2109.10086): ``w_j = pool_i log(1 + relu(logit_ij))`` over the text's tokens ``i``, ``pool`` =
max (SPLADE v2 and later) or sum (SPLADE v1), and an optional second ``log1p`` (``log1p_relu``,
OpenSearch's models). Two folders are understood:

- a sentence-transformers ``SparseEncoder`` folder: modules.json with a Transformer (5.x,
  ``transformer_task: fill-mask``) or an ``MLMTransformer`` (5.0-5.3) and a ``SpladePooling`` module
  whose config.json gives ``pooling_strategy`` and ``activation_function``;
- a plain Hugging Face ``*ForMaskedLM`` folder (no modules.json): max pooling and relu, what
  sentence-transformers' ``SparseEncoder`` picks for it.

Other sparse modules (SparseStaticEmbedding, SparseAutoEncoder, Router for inference-free SPLADE) are
refused with a :class:`~embfast.config.ModelConfigError` naming them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from embfast.config import _SPARSE_MODULES, ModelConfigError, _class_name, _max_seq_length, _read_json

SPLADE_POOLING = ("max", "sum")
SPLADE_ACTIVATIONS = ("relu", "log1p_relu")


@dataclass
class SparseEncoderConfig:
    """How to turn a masked-language model's logits into SPLADE vectors.

    Attributes:
        pooling: "max" (default, SPLADE v2+) or "sum" over the tokens (padding excluded).
        activation: "relu" (``log1p(relu(x))``, default) or "log1p_relu" (``log1p(log1p(relu(x)))``).
        vocab_size: the width of a sparse vector (config.json ``vocab_size``).
        max_seq_length: truncation length in tokens, special tokens included (sentence-transformers' rule).
        do_lower_case: lower-case texts first (sentence_bert_config.json).
        padding_side: "right" (or "left").
        prompts / default_prompt_name: config_sentence_transformers.json's.
        max_active_dims: keep at most this many non-zeros per vector by default (None: all).
        similarity_fn_name: "dot" (sentence-transformers' default for sparse encoders).
    """

    pooling: str = "max"
    activation: str = "relu"
    vocab_size: int = 0
    max_seq_length: int = 512
    do_lower_case: bool = False
    padding_side: str = "right"
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    max_active_dims: int | None = None
    similarity_fn_name: str = "dot"

    @property
    def dim(self) -> int:
        """Width of one row of model output (``vocab_size``); the batcher's protocol name."""
        return self.vocab_size

    @property
    def include_prompt(self) -> bool:
        return True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SparseEncoderConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def is_masked_lm(folder: str | Path) -> bool:
    """True when config.json names a ``*ForMaskedLM`` architecture."""
    hf = _read_json(Path(folder) / "config.json")
    archs = hf.get("architectures") if isinstance(hf, dict) else None
    return isinstance(archs, list) and any(str(a).endswith("ForMaskedLM") for a in archs)


def read_sparse_encoder_config(folder: str | Path) -> SparseEncoderConfig:
    """Read a SparseEncoder folder or a plain ``*ForMaskedLM`` folder (see the module docstring).

    Raises:
        ModelConfigError: no config.json / tokenizer.json; a model that is not a masked LM; a sparse
            module other than SpladePooling; an unknown pooling strategy or activation.
    """
    folder = Path(folder)
    hf = _read_json(folder / "config.json")
    if not isinstance(hf, dict):
        raise ModelConfigError(f"{folder} has no config.json: not a Hugging Face model folder")
    archs = hf.get("architectures") or []
    if archs and not is_masked_lm(folder):
        raise ModelConfigError(f"{folder}/config.json: architecture {archs[0]!r} is not a masked-language model "
                               "(*ForMaskedLM); SPLADE needs the MLM head's vocabulary logits")
    cfg = SparseEncoderConfig(vocab_size=int(hf.get("vocab_size") or 0))
    if cfg.vocab_size < 1:
        raise ModelConfigError(f"{folder}/config.json: vocab_size is missing")
    modules = _read_json(folder / "modules.json")
    if isinstance(modules, list):
        names = [_class_name(m) for m in modules]
        unsupported = [n for n in names if n in _SPARSE_MODULES - {"SpladePooling", "MLMTransformer"}
                       or n not in _SPARSE_MODULES | {"Transformer"}]
        if unsupported or "SpladePooling" not in names:
            raise ModelConfigError(f"{folder}/modules.json: embfast runs a Transformer (fill-mask) + SpladePooling, "
                                   f"got {names}")
        pool_dir = modules[names.index("SpladePooling")].get("path") or ""
        pool_cfg = _read_json(folder / pool_dir / "config.json") if pool_dir else None
        if isinstance(pool_cfg, dict):
            cfg.pooling = pool_cfg.get("pooling_strategy", "max") or "max"
            cfg.activation = pool_cfg.get("activation_function", "relu") or "relu"
    if cfg.pooling not in SPLADE_POOLING:
        raise ModelConfigError(f"{folder}: SpladePooling pooling_strategy must be one of {SPLADE_POOLING}, "
                               f"got {cfg.pooling!r}")
    if cfg.activation not in SPLADE_ACTIVATIONS:
        raise ModelConfigError(f"{folder}: SpladePooling activation_function must be one of {SPLADE_ACTIVATIONS}, "
                               f"got {cfg.activation!r}")
    sbert = _read_json(folder / "sentence_bert_config.json")
    if isinstance(sbert, dict):
        cfg.do_lower_case = bool(sbert.get("do_lower_case", False))
    st_cfg = _read_json(folder / "config_sentence_transformers.json")
    if isinstance(st_cfg, dict):
        cfg.prompts = dict(st_cfg.get("prompts") or {})
        cfg.default_prompt_name = st_cfg.get("default_prompt_name") or None
        cfg.similarity_fn_name = st_cfg.get("similarity_fn_name") or "dot"
        if cfg.default_prompt_name is not None and cfg.default_prompt_name not in cfg.prompts:
            raise ModelConfigError(f"{folder}/config_sentence_transformers.json: default_prompt_name "
                                   f"{cfg.default_prompt_name!r} must be one of the prompts {sorted(cfg.prompts)}")
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    tok_cfg = tok_cfg if isinstance(tok_cfg, dict) else None
    if tok_cfg:
        cfg.padding_side = tok_cfg.get("padding_side", "right") or "right"
    cfg.max_seq_length = _max_seq_length(hf, sbert, tok_cfg)
    if not (folder / "tokenizer.json").is_file():
        raise ModelConfigError(f"{folder} has no tokenizer.json (a fast tokenizer is required)")
    return cfg
