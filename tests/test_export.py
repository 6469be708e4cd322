"""Export into the cache: once, re-export on change, safe under concurrent processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from embfast.config import ModelConfigError, read_model_config
from embfast.export import ensure_exported, is_exported, read_manifest, resolve_model

from tests_helpers import copy_model


def test_manifest_records_what_the_engine_needs(tiny_dir):
    out = ensure_exported(tiny_dir)
    man = read_manifest(out)
    assert man["config"]["pooling"] == "mean" and man["config"]["normalize"] is True
    assert man["config"]["max_seq_length"] == 64 and man["config"]["dim"] == 32
    assert man["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert man["output_name"] == "last_hidden_state"
    assert len(man["source_checksum"]) == 64
    for f in ("model.onnx", "tokenizer.json", "modules.json", "sentence_bert_config.json"):
        assert (out / f).is_file()


def test_exported_once_then_reused(tiny_dir):
    out = ensure_exported(tiny_dir)
    stamp = (out / "model.onnx").stat().st_mtime_ns
    assert ensure_exported(tiny_dir) == out
    assert (out / "model.onnx").stat().st_mtime_ns == stamp
    assert resolve_model(out) == out  # an exported folder is used as it is


def test_changed_source_is_exported_again(tiny_dir, tmp_path):
    src = copy_model(tiny_dir, tmp_path / "m")
    first = ensure_exported(src)
    cfg = json.loads((src / "sentence_bert_config.json").read_text())
    cfg["max_seq_length"] = 32
    (src / "sentence_bert_config.json").write_text(json.dumps(cfg))
    second = ensure_exported(src)
    assert second != first
    assert read_manifest(second)["config"]["max_seq_length"] == 32


def test_concurrent_processes_do_not_corrupt_the_cache(tiny_dir, tmp_path):
    src = copy_model(tiny_dir, tmp_path / "race")
    code = "import sys; from embfast.export import ensure_exported; print(ensure_exported(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(src)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=os.environ.copy(), cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1
    out = paths.pop()
    assert is_exported(out)
    leftovers = [p for p in os.listdir(os.path.dirname(out)) if ".tmp-" in p]
    assert leftovers == []


def test_corrupt_manifest_is_refused(tiny_dir, tmp_path):
    from embfast import Embedder

    out = copy_model(ensure_exported(tiny_dir), tmp_path / "exported")
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is missing or corrupt"):
        Embedder(out)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json"),
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.CNN",
                                                            "path": "1_CNN"}])), "CNN"),
    (lambda d: (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True})),
     "weightedmean"),
])
def test_unsupported_folders_name_the_piece(tiny_dir, tmp_path, edit, match):
    src = copy_model(tiny_dir, tmp_path / "broken")
    edit(src)
    with pytest.raises(ModelConfigError, match=match):
        read_model_config(src)


def test_staged_folder_swaps_in_on_success_and_leaves_the_old_one_on_error(tmp_path):
    from embfast.export import staged_folder

    out = tmp_path / "model"
    with staged_folder(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError, match="half-way"), staged_folder(out) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("half-way")
    assert (out / "a.txt").read_text() == "one"
    with staged_folder(out) as tmp:
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or old folders left
