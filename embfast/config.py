"""Read what a sentence-transformers / Hugging Face model folder says about itself.

Everything the engine needs is read from the folder (modules.json,
1_Pooling/config.json, N_Dense/config.json, sentence_bert_config.json,
config_sentence_transformers.json, tokenizer_config.json, config.json); there
are no per-model code paths. A folder we cannot run faithfully gets a
:class:`ModelConfigError` that names the missing or unknown piece.

Both module layouts sentence-transformers writes are understood: the legacy
names (``sentence_transformers.models.Pooling``, pooling flags such as
``pooling_mode_mean_tokens``) and the 5.x ones
(``sentence_transformers.sentence_transformer.modules.pooling.Pooling``,
``"pooling_mode": "mean"``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# legacy sentence-transformers pooling flags -> our kernel modes
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
# sentence-transformers 5.x ``pooling_mode`` names -> our kernel modes
_POOLING_NAMES = {"cls": "cls", "mean": "mean", "max": "max", "mean_sqrt_len_tokens": "mean_sqrt_len",
                  "lasttoken": "lasttoken", "weightedmean": "weightedmean"}
_SUPPORTED_POOLING = ("mean", "cls", "max", "lasttoken", "mean_sqrt_len")
# modules.json "type" -> what it is, by class name: every spelling sentence-transformers has used
# (sentence_transformers.models.Pooling, sentence_transformers.sentence_transformer.modules.pooling.Pooling, ...)
_MODULE_KINDS = {"Transformer": "transformer", "Pooling": "pooling", "Normalize": "normalize", "Dense": "dense"}
# Dense activation functions we run in NumPy (class name -> our name); sentence-transformers' default is Tanh
DENSE_ACTIVATIONS = {"Identity": "identity", "Tanh": "tanh", "ReLU": "relu", "Sigmoid": "sigmoid",
                     "GELU": "gelu", "SiLU": "silu"}
_DENSE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class ModelConfigError(ValueError):
    """The model folder is missing a piece, or has one the engine cannot run."""


@dataclass
class ModelConfig:
    """How to turn this model's token vectors into sentence embeddings.

    Attributes:
        pooling: mean | cls | max | lasttoken | mean_sqrt_len.
        normalize: the model ends with a Normalize module (L2, after pooling and Dense layers).
        max_seq_length: truncation length in tokens, special tokens included.
        dim: width of the pooled vectors: the transformer's hidden size (what
            :meth:`Embedder.embed_token_ids` returns per row).
        output_dim: the embedding dimension users get: ``dim``, or the last Dense
            layer's ``out_features``.
        do_lower_case: lower-case texts before tokenizing (sentence_bert_config).
        padding_side: "right" or "left" (decoder models pad on the left).
        prompts: named prompts from config_sentence_transformers.json.
        default_prompt_name: the prompt applied when none is given, or None.
        include_prompt: whether prompt tokens count in pooling (Pooling config); False
            excludes them, as sentence-transformers does.
        dense: Dense layers applied after pooling, in order: one dict per layer with
            ``path`` (subfolder), ``in_features``, ``out_features``, ``bias`` and
            ``activation`` (identity | tanh | relu | sigmoid | gelu | silu).
    """

    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int = 512
    dim: int = 0
    output_dim: int = 0
    do_lower_case: bool = False
    padding_side: str = "right"
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True
    dense: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        cfg = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        if not cfg.output_dim:  # manifests written before Dense support: no head, so the widths agree
            cfg.output_dim = cfg.dim
        return cfg


def _read_json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path} is not valid JSON: {exc}") from exc


def module_kind(type_name: str) -> str | None:
    """``transformer`` | ``pooling`` | ``normalize`` | ``dense`` for a modules.json type, else None."""
    if not isinstance(type_name, str) or not type_name.startswith("sentence_transformers."):
        return None
    return _MODULE_KINDS.get(type_name.rsplit(".", 1)[-1])


def _pooling_modes(pool_cfg: dict) -> list[str]:
    """The pooling modes a Pooling config.json asks for (either layout)."""
    mode = pool_cfg.get("pooling_mode")
    if mode is not None:  # sentence-transformers 5.x
        names = [mode] if isinstance(mode, str) else list(mode)
        return [_POOLING_NAMES.get(n, str(n)) for n in names]
    return [m for flag, m in _POOLING_FLAGS.items() if pool_cfg.get(flag)]


def _read_pooling(cfg: ModelConfig, pooling_dir: Path) -> None:
    pool_cfg = _read_json(pooling_dir / "config.json")
    if not isinstance(pool_cfg, dict):
        raise ModelConfigError(f"{pooling_dir}/config.json is missing")
    modes = _pooling_modes(pool_cfg)
    if len(modes) != 1 or modes[0] not in _SUPPORTED_POOLING:
        raise ModelConfigError(f"{pooling_dir}/config.json: pooling {modes or 'none'} is not supported; "
                               f"exactly one of {', '.join(_SUPPORTED_POOLING)} is")
    cfg.pooling = modes[0]
    cfg.include_prompt = bool(pool_cfg.get("include_prompt", True))
    width = pool_cfg.get("embedding_dimension") or pool_cfg.get("word_embedding_dimension")
    if width:
        cfg.dim = int(width)


def _read_dense(folder: Path, path: str, expected_in: int) -> dict:
    """One Dense layer's settings from ``folder/path/config.json`` (weights are read at export)."""
    d = folder / path
    dc = _read_json(d / "config.json")
    if not isinstance(dc, dict):
        raise ModelConfigError(f"{d}/config.json is missing (Dense module {path!r})")
    for key in ("in_features", "out_features"):
        if not isinstance(dc.get(key), int) or dc[key] < 1:
            raise ModelConfigError(f"{d}/config.json: {key} must be a positive int, got {dc.get(key)!r}")
    for key in ("module_input_name", "module_output_name"):
        if dc.get(key, "sentence_embedding") not in (None, "sentence_embedding"):
            raise ModelConfigError(f"{d}/config.json: {key} must be 'sentence_embedding', got {dc[key]!r}; "
                                   "Dense layers over token embeddings are not supported")
    act_path = dc.get("activation_function", "torch.nn.modules.activation.Tanh")
    act = DENSE_ACTIVATIONS.get(str(act_path).rsplit(".", 1)[-1]) if str(act_path).startswith("torch.") else None
    if act is None:
        raise ModelConfigError(f"{d}/config.json: activation_function {act_path!r} is not supported; supported: "
                               + ", ".join(f"torch.nn.{n}" for n in DENSE_ACTIVATIONS))
    if expected_in and dc["in_features"] != expected_in:
        raise ModelConfigError(f"{d}/config.json: in_features must be {expected_in} (the width before it), "
                               f"got {dc['in_features']}")
    if not any((d / w).is_file() for w in _DENSE_WEIGHTS):
        raise ModelConfigError(f"{d} has no weights ({' or '.join(_DENSE_WEIGHTS)})")
    return {"path": path, "in_features": int(dc["in_features"]), "out_features": int(dc["out_features"]),
            "bias": bool(dc.get("bias", True)), "activation": act}


def _read_modules(cfg: ModelConfig, folder: Path, modules: list) -> None:
    if not isinstance(modules, list) or not modules:
        raise ModelConfigError(f"{folder}/modules.json must be a non-empty list of modules, got {modules!r}")
    kinds = []
    for mod in modules:
        mtype = mod.get("type", "") if isinstance(mod, dict) else mod
        kind = module_kind(mtype)
        if kind is None:
            raise ModelConfigError(f"{folder}/modules.json: module {mtype!r} (path {mod.get('path')!r}) "
                                   "is not supported; supported: Transformer, Pooling, Dense, Normalize")
        kinds.append(kind)
    if kinds[0] != "transformer" or kinds.count("transformer") != 1:
        raise ModelConfigError(f"{folder}/modules.json: the first module must be the only Transformer, got {kinds}")
    if modules[0].get("path"):
        raise ModelConfigError(f"{folder}: a Transformer module in subfolder {modules[0]['path']!r} is not supported")
    if kinds.count("pooling") != 1 or kinds[1] != "pooling":
        raise ModelConfigError(f"{folder}/modules.json must have exactly one Pooling module right after the "
                               f"Transformer, got {kinds}")
    if "normalize" in kinds and (kinds.count("normalize") != 1 or kinds[-1] != "normalize"):
        raise ModelConfigError(f"{folder}/modules.json: Normalize must be the last module, got {kinds}")
    _read_pooling(cfg, folder / (modules[1].get("path") or "1_Pooling"))
    width = cfg.dim
    for mod, kind in zip(modules[2:], kinds[2:], strict=True):
        if kind == "dense":
            layer = _read_dense(folder, mod.get("path") or "", width)
            cfg.dense.append(layer)
            width = layer["out_features"]
        elif kind == "normalize":
            cfg.normalize = True
    cfg.output_dim = width


def _max_seq_length(hf: dict, sbert: dict | None, tok_cfg: dict | None) -> int:
    """sentence-transformers' rule: sentence_bert_config's max_seq_length, else the smaller of the
    tokenizer's model_max_length and the model's max_position_embeddings."""
    if isinstance(sbert, dict) and sbert.get("max_seq_length"):
        return int(sbert["max_seq_length"])
    limits = [hf.get("max_position_embeddings"), (tok_cfg or {}).get("model_max_length")]
    limits = [int(v) for v in limits if isinstance(v, (int, float)) and 0 < v < 1e9]
    return min(limits) if limits else 512


def read_model_config(folder: str | Path) -> ModelConfig:
    """Read a sentence-transformers folder (or a plain HF transformer folder, which gets mean pooling).

    Args:
        folder: the model folder.

    Returns:
        The folder's :class:`ModelConfig`.

    Raises:
        ModelConfigError: naming the missing file or the unsupported module / setting.
    """
    folder = Path(folder)
    hf = _read_json(folder / "config.json")
    if not isinstance(hf, dict):
        raise ModelConfigError(f"{folder} has no config.json: not a Hugging Face model folder")
    cfg = ModelConfig()
    text_cfg = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else hf
    cfg.dim = int(text_cfg.get("hidden_size") or text_cfg.get("d_model") or 0)

    modules = _read_json(folder / "modules.json")
    if modules is not None:
        _read_modules(cfg, folder, modules)
    else:
        cfg.output_dim = cfg.dim

    sbert = _read_json(folder / "sentence_bert_config.json")
    if isinstance(sbert, dict):
        cfg.do_lower_case = bool(sbert.get("do_lower_case", False))
        task = sbert.get("transformer_task", "feature-extraction")
        if task != "feature-extraction":
            raise ModelConfigError(f"{folder}/sentence_bert_config.json: transformer_task must be "
                                   f"'feature-extraction', got {task!r}")

    st_cfg = _read_json(folder / "config_sentence_transformers.json")
    if isinstance(st_cfg, dict):
        cfg.prompts = dict(st_cfg.get("prompts") or {})
        cfg.default_prompt_name = st_cfg.get("default_prompt_name") or None
        if cfg.default_prompt_name is not None and cfg.default_prompt_name not in cfg.prompts:
            raise ModelConfigError(f"{folder}/config_sentence_transformers.json: default_prompt_name "
                                   f"{cfg.default_prompt_name!r} must be one of the prompts {sorted(cfg.prompts)}")

    tok_cfg = _read_json(folder / "tokenizer_config.json")
    if isinstance(tok_cfg, dict):
        cfg.padding_side = tok_cfg.get("padding_side", "right") or "right"
    if cfg.padding_side not in ("left", "right"):
        raise ModelConfigError(f"{folder}/tokenizer_config.json: padding_side must be 'left' or 'right', "
                               f"got {cfg.padding_side!r}")
    cfg.max_seq_length = _max_seq_length(text_cfg, sbert, tok_cfg if isinstance(tok_cfg, dict) else None)
    if not (folder / "tokenizer.json").is_file():
        raise ModelConfigError(f"{folder} has no tokenizer.json (a fast tokenizer is required)")
    return cfg


# ---- cross-encoders ------------------------------------------------------------------------------------
# Activation functions a cross-encoder may name (sentence-transformers stores a dotted torch path), by class name.
CE_ACTIVATIONS = ("Identity", "Sigmoid", "Tanh", "ReLU", "GELU", "SiLU")
_CE_TASKS = ("sequence-classification", "text-classification")


@dataclass
class CrossEncoderConfig:
    """How to turn a sequence classifier's logits into sentence-transformers' CrossEncoder scores.

    Attributes:
        num_labels: logits per input (config.json ``num_labels`` / ``id2label``).
        activation: applied to the logits by ``predict``: identity | sigmoid | tanh | relu | gelu | silu.
            Read as sentence-transformers 5.x does: config_sentence_transformers.json ``activation_fn``,
            else config.json ``sentence_transformers.activation_fn`` (4.x), else the older
            ``sbert_ce_default_activation_function``, else sigmoid for one label and identity otherwise.
        max_seq_length: truncation length of a pair in tokens, special tokens included (sentence_bert_config's
            ``max_seq_length``, else the smaller of the tokenizer's ``model_max_length`` and the model's
            ``max_position_embeddings``).
        padding_side: "right", or "left" (decoder classifiers; they score the last token).
        do_lower_case: lower-case inputs first (sentence_bert_config).
        labels: the label names (``id2label``), in logit order.
    """

    num_labels: int = 1
    activation: str = "sigmoid"
    max_seq_length: int = 512
    padding_side: str = "right"
    do_lower_case: bool = False
    labels: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        """Width of one row of model output (``num_labels``); the batcher's protocol name."""
        return self.num_labels

    @property
    def include_prompt(self) -> bool:
        return True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CrossEncoderConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


#: sentence-transformers module classes that make a folder a sparse encoder (embfast.sparse_config refuses
#: the last three by name)
_SPARSE_MODULES = {"SpladePooling", "MLMTransformer", "SparseStaticEmbedding", "SparseAutoEncoder", "Router"}


def _class_name(module) -> str:
    name = module.get("type", "") if isinstance(module, dict) else str(module)
    return str(name).rsplit(".", 1)[-1]


def is_sparse_folder(folder: str | Path) -> bool:
    """True for a sentence-transformers SparseEncoder folder: modules.json names a SpladePooling or
    MLMTransformer module, sentence_bert_config.json says ``transformer_task: fill-mask``, or
    config_sentence_transformers.json says ``model_type: SparseEncoder``."""
    folder = Path(folder)
    modules = _read_json(folder / "modules.json")
    if isinstance(modules, list) and any(_class_name(m) in _SPARSE_MODULES for m in modules):
        return True
    sbert = _read_json(folder / "sentence_bert_config.json")
    if isinstance(sbert, dict) and sbert.get("transformer_task") == "fill-mask":
        return True
    st_cfg = _read_json(folder / "config_sentence_transformers.json")
    return isinstance(st_cfg, dict) and st_cfg.get("model_type") == "SparseEncoder"


def model_kind(folder: str | Path) -> str:
    """``"cross-encoder"`` for a sequence classifier (what sentence-transformers' CrossEncoder loads),
    ``"sparse-encoder"`` for a sentence-transformers SparseEncoder folder
    (:func:`is_sparse_folder`; a plain ``*ForMaskedLM`` folder stays an embedder
    unless :class:`embfast.SparseEncoder` asks for it), else ``"embedder"``.

    A folder is a cross-encoder when its config.json names a ``*ForSequenceClassification`` architecture,
    its sentence_bert_config.json says ``transformer_task: sequence-classification``, or its
    config_sentence_transformers.json says ``model_type: CrossEncoder``; a modules.json with a Pooling
    module always makes it an embedder.
    """
    folder = Path(folder)
    if is_sparse_folder(folder):  # SpladePooling / MLMTransformer / fill-mask / model_type SparseEncoder
        return "sparse-encoder"
    modules = _read_json(folder / "modules.json")
    if isinstance(modules, list) and any(
            module_kind(m.get("type", "") if isinstance(m, dict) else m) == "pooling" for m in modules):
        return "embedder"
    sbert = _read_json(folder / "sentence_bert_config.json")
    if isinstance(sbert, dict) and sbert.get("transformer_task") in _CE_TASKS:
        return "cross-encoder"
    st_cfg = _read_json(folder / "config_sentence_transformers.json")
    if isinstance(st_cfg, dict) and st_cfg.get("model_type") == "CrossEncoder":
        return "cross-encoder"
    hf = _read_json(folder / "config.json")
    archs = hf.get("architectures") if isinstance(hf, dict) else None
    if isinstance(archs, list) and any(str(a).endswith("ForSequenceClassification") for a in archs):
        return "cross-encoder"
    return "embedder"


def _activation(path, where: str) -> str:
    name = str(path).rsplit(".", 1)[-1]
    if not str(path).startswith("torch.") or name not in CE_ACTIVATIONS:
        raise ModelConfigError(f"{where}: activation_fn {path!r} is not supported; supported: "
                               + ", ".join(f"torch.nn.{n}" for n in CE_ACTIVATIONS))
    return name.lower()


def read_cross_encoder_config(folder: str | Path) -> CrossEncoderConfig:
    """Read a sentence-transformers CrossEncoder folder (5.x or 4.x layout) or a plain HF sequence classifier.

    Raises:
        ModelConfigError: no config.json / tokenizer.json, an architecture that is not a sequence classifier,
            an unsupported activation function or padding side.
    """
    folder = Path(folder)
    hf = _read_json(folder / "config.json")
    if not isinstance(hf, dict):
        raise ModelConfigError(f"{folder} has no config.json: not a Hugging Face model folder")
    archs = hf.get("architectures") or []
    if archs and not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise ModelConfigError(f"{folder}/config.json: architecture {archs[0]!r} is not a sequence classifier "
                               "(*ForSequenceClassification); generative (*ForCausalLM) rerankers are not supported")
    cfg = CrossEncoderConfig()
    id2label = hf.get("id2label")
    cfg.num_labels = int(hf.get("num_labels") or (len(id2label) if isinstance(id2label, dict) else 0) or 2)
    if isinstance(id2label, dict) and len(id2label) == cfg.num_labels:
        cfg.labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(cfg.num_labels)]
    else:
        cfg.labels = [f"LABEL_{i}" for i in range(cfg.num_labels)]

    st_cfg = _read_json(folder / "config_sentence_transformers.json")
    legacy = hf.get("sentence_transformers") if isinstance(hf.get("sentence_transformers"), dict) else {}
    path = None
    if isinstance(st_cfg, dict) and st_cfg.get("activation_fn"):
        path, where = st_cfg["activation_fn"], f"{folder}/config_sentence_transformers.json"
    elif legacy.get("activation_fn"):
        path, where = legacy["activation_fn"], f"{folder}/config.json"
    elif hf.get("sbert_ce_default_activation_function"):
        path, where = hf["sbert_ce_default_activation_function"], f"{folder}/config.json"
    cfg.activation = _activation(path, where) if path else ("sigmoid" if cfg.num_labels == 1 else "identity")

    sbert = _read_json(folder / "sentence_bert_config.json")
    if isinstance(sbert, dict):
        cfg.do_lower_case = bool(sbert.get("do_lower_case", False))
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    tok_cfg = tok_cfg if isinstance(tok_cfg, dict) else None
    if tok_cfg:
        cfg.padding_side = tok_cfg.get("padding_side", "right") or "right"
    if cfg.padding_side not in ("left", "right"):
        raise ModelConfigError(f"{folder}/tokenizer_config.json: padding_side must be 'left' or 'right', "
                               f"got {cfg.padding_side!r}")
    text_cfg = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else hf
    cfg.max_seq_length = _max_seq_length(text_cfg, sbert, tok_cfg)
    if not (folder / "tokenizer.json").is_file():
        raise ModelConfigError(f"{folder} has no tokenizer.json (a fast tokenizer is required)")
    return cfg
