"""Read what a sentence-transformers / Hugging Face model folder says about itself.

Everything the engine needs is read from the folder (modules.json,
1_Pooling/config.json, sentence_bert_config.json,
config_sentence_transformers.json, tokenizer_config.json, config.json); there
are no per-model code paths. A folder we cannot run faithfully gets an error
that names the missing or unknown piece.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# sentence-transformers pooling flags -> our kernel modes
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
_SUPPORTED_POOLING = ("mean", "cls", "max", "lasttoken", "mean_sqrt_len")
_KNOWN_MODULES = {
    "sentence_transformers.models.Transformer": "transformer",
    "sentence_transformers.models.Pooling": "pooling",
    "sentence_transformers.models.Normalize": "normalize",
}


class ModelConfigError(ValueError):
    """The model folder is missing a piece, or has one the engine cannot run."""


@dataclass
class ModelConfig:
    """How to turn this model's token vectors into sentence embeddings.

    Attributes:
        pooling: mean | cls | max | lasttoken | mean_sqrt_len.
        normalize: the model ends with a Normalize module (L2, after pooling).
        max_seq_length: truncation length in tokens, special tokens included.
        dim: embedding dimension (the transformer's hidden size).
        do_lower_case: lower-case texts before tokenizing (sentence_bert_config).
        padding_side: "right" or "left" (decoder models pad on the left).
        prompts: named prompts from config_sentence_transformers.json.
        default_prompt_name: the prompt applied when none is given, or None.
        include_prompt: whether prompt tokens count in pooling (Pooling config).
    """

    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int = 512
    dim: int = 0
    do_lower_case: bool = False
    padding_side: str = "right"
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _read_json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path} is not valid JSON: {exc}") from exc


def read_model_config(folder: str | Path) -> ModelConfig:
    """Read a sentence-transformers folder (or a plain HF transformer folder, which gets mean pooling).

    Raises ModelConfigError naming the missing file or the unsupported module.
    """
    folder = Path(folder)
    hf = _read_json(folder / "config.json")
    if not isinstance(hf, dict):
        raise ModelConfigError(f"{folder} has no config.json: not a Hugging Face model folder")
    cfg = ModelConfig()
    cfg.dim = int(hf.get("hidden_size") or hf.get("d_model") or 0)
    cfg.max_seq_length = int(hf.get("max_position_embeddings") or 512)

    modules = _read_json(folder / "modules.json")
    pooling_dir = None
    if modules is not None:
        for mod in modules:
            kind = _KNOWN_MODULES.get(mod.get("type", ""))
            if kind is None:
                raise ModelConfigError(f"{folder}/modules.json: module {mod.get('type')!r} (path {mod.get('path')!r}) "
                                       f"is not supported; supported: {', '.join(_KNOWN_MODULES)}")
            if kind == "transformer" and mod.get("path"):
                raise ModelConfigError(f"{folder}: a Transformer module in subfolder {mod['path']!r} is not supported")
            if kind == "pooling":
                pooling_dir = folder / mod.get("path", "1_Pooling")
            if kind == "normalize":
                cfg.normalize = True
        if pooling_dir is None:
            raise ModelConfigError(f"{folder}/modules.json has no Pooling module")
        pool_cfg = _read_json(pooling_dir / "config.json")
        if not isinstance(pool_cfg, dict):
            raise ModelConfigError(f"{pooling_dir}/config.json is missing")
        modes = [mode for flag, mode in _POOLING_FLAGS.items() if pool_cfg.get(flag)]
        if len(modes) != 1 or modes[0] not in _SUPPORTED_POOLING:
            raise ModelConfigError(f"{pooling_dir}/config.json: pooling {modes or 'none'} is not supported; "
                                   f"exactly one of {', '.join(_SUPPORTED_POOLING)} is")
        cfg.pooling = modes[0]
        cfg.include_prompt = bool(pool_cfg.get("include_prompt", True))
        if pool_cfg.get("word_embedding_dimension"):
            cfg.dim = int(pool_cfg["word_embedding_dimension"])

    sbert = _read_json(folder / "sentence_bert_config.json")
    if isinstance(sbert, dict):
        if sbert.get("max_seq_length"):
            cfg.max_seq_length = int(sbert["max_seq_length"])
        cfg.do_lower_case = bool(sbert.get("do_lower_case", False))

    st_cfg = _read_json(folder / "config_sentence_transformers.json")
    if isinstance(st_cfg, dict):
        cfg.prompts = dict(st_cfg.get("prompts") or {})
        cfg.default_prompt_name = st_cfg.get("default_prompt_name") or None

    tok_cfg = _read_json(folder / "tokenizer_config.json")
    if isinstance(tok_cfg, dict):
        cfg.padding_side = tok_cfg.get("padding_side", "right") or "right"
        mml = tok_cfg.get("model_max_length")
        if sbert is None and isinstance(mml, int) and mml < cfg.max_seq_length:
            cfg.max_seq_length = mml
    if cfg.padding_side not in ("left", "right"):
        raise ModelConfigError(f"{folder}/tokenizer_config.json: padding_side {cfg.padding_side!r} is not left/right")
    if not (folder / "tokenizer.json").is_file():
        raise ModelConfigError(f"{folder} has no tokenizer.json (a fast tokenizer is required)")
    return cfg
