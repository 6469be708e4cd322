"""Build facts a user meets: a source checkout without the compiled core says so plainly (once), and the
native kernels' code path can be forced to the portable one (EMBFAST_ISA=generic, as CI's second pass runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import embfast
from embfast import kernels

PROBE = ("import embfast; from embfast import kernels; print('native', kernels.HAS_NATIVE, 'isa', kernels.isa()); "
         "print('error', embfast.build_info().get('native_error'))")


def _best_isa() -> str:
    """What "auto" picks on this CPU: AVX2+FMA (with POPCNT) when /proc/cpuinfo lists them."""
    flags = set()
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return "avx2+fma" if {"avx2", "fma", "popcnt"} <= flags else "generic"


def _python(code: str, cwd, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("EMBFAST_REQUIRE_NATIVE", "EMBFAST_ISA")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=environ)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A source checkout as a user has it after `pip install .`: the package's Python files, no compiled core."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(Path(embfast.__file__).parent, root / "embfast",
                    ignore=shutil.ignore_patterns("_core*", "__pycache__"))
    (root / "pyproject.toml").write_text("[project]\nname = 'embfast'\n")
    (root / "csrc").mkdir()
    return root


def test_source_checkout_without_core_warns_once_and_says_how_to_fix(checkout):
    r = _python(PROBE, checkout)
    assert r.returncode == 0, r.stderr
    assert "native False isa none" in r.stdout
    assert r.stderr.count("RuntimeWarning") == 1, r.stderr
    for words in (f"imported from the source checkout {checkout / 'embfast'}", "has no compiled core",
                  "run from another directory", "pip install -e ."):
        assert words in r.stderr, r.stderr
    assert "circular import" not in r.stdout + r.stderr
    assert "source checkout" in r.stdout  # build_info()["native_error"] says the same


def test_require_native_makes_it_an_error(checkout):
    r = _python(PROBE, checkout, EMBFAST_REQUIRE_NATIVE="1")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "EMBFAST_REQUIRE_NATIVE=1 forbids the fallback" in r.stderr
    assert "pip install -e ." in r.stderr


def test_installed_package_has_its_core(tmp_path):
    if not kernels.HAS_NATIVE:
        pytest.skip("native core not built")
    r = _python(PROBE, tmp_path)
    assert r.returncode == 0 and "native True" in r.stdout and "Warning" not in r.stderr, r.stderr


def test_installed_package_has_its_int8_operators(monkeypatch):
    """The int8 operator library is built and installed with the core; it reports its path, and
    EMBFAST_ISA lowers it as it does the kernels."""
    if not kernels.HAS_NATIVE:
        pytest.skip("native core not built")
    from embfast import ortops
    from embfast.info import build_info

    monkeypatch.delenv("EMBFAST_ISA", raising=False)
    best = ortops.isa()
    info = build_info()
    assert info["ortops"] is True and info["ortops_isa"] == best and best in ("avx512vnni", "avx2", "generic")
    monkeypatch.setenv("EMBFAST_ISA", "generic")
    assert ortops.isa() == "generic"
    monkeypatch.setenv("EMBFAST_ISA", "avx2")
    assert ortops.isa() == ("generic" if best == "generic" else "avx2")


@pytest.mark.parametrize(("value", "isa"), [("generic", "generic"), ("GENERIC", "generic"), ("auto", None),
                                            ("", None), ("avx2", None)])
def test_embfast_isa_forces_the_portable_path(tmp_path, value, isa):
    if not kernels.HAS_NATIVE:
        pytest.skip("native core not built")
    r = _python(PROBE, tmp_path, EMBFAST_ISA=value)
    assert r.returncode == 0, r.stderr
    assert f"isa {isa or _best_isa()}" in r.stdout


def test_embfast_isa_refuses_unknown_values(tmp_path):
    r = _python(PROBE, tmp_path, EMBFAST_ISA="avx512")
    assert r.returncode != 0 and "EMBFAST_ISA must be one of auto, generic, avx2, got 'avx512'" in r.stderr


def test_set_isa_round_trip():
    if not kernels.HAS_NATIVE:
        pytest.skip("native core not built")
    before = kernels.isa()
    try:
        kernels.set_isa("generic")
        assert kernels.isa() == "generic" and kernels.build_info()["isa"] == "generic"
    finally:
        kernels.set_isa("generic" if before == "generic" else "auto")
    assert kernels.isa() == before
    with pytest.raises(ValueError, match="isa must be one of auto, generic, avx2, got 'sse'"):
        kernels.set_isa("sse")
