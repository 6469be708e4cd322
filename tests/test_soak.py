"""The soak and fault test (benchmarks/soak_server.py), short: ~30 s of 8 clients against `embfast serve` on the
real model, with bad requests, clients that hang up mid-request and uploads that stall. Asserts the checks, not
timings: no 5xx (client or server side), every 200 matches a local encode, bad requests get 4xx, stalled uploads
get 408 in time, descriptors return to where they started, RSS grows little (loose bound)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_server.py"


@pytest.mark.slow
def test_short_soak_serves_correctly_and_holds_resources(minilm_dir, tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(SCRIPT), "--duration-s", "30", "--clients", "8", "--slow-clients", "2",
           "--body-timeout-s", "2", "--baseline-s", "10", "--bucket-s", "10", "--pool", "400",
           "--bad-share", "0.1", "--disconnect-share", "0.1", "--model", str(minilm_dir), "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rep = json.loads(out.read_text())
    summary = run.stdout[-3000:]
    assert rep["served_200"] > 0 and rep["rows_checked"] >= rep["served_200"], summary
    assert not rep["mismatches"] and rep["min_cosine"] >= 0.9999, summary
    assert not [s for s in rep["statuses"] if s.startswith("5")], summary
    assert not [c for c in rep["server"]["codes"] if c.startswith("5")], summary  # the server's own count
    assert not rep["bad_not_4xx"] and any(s.startswith("4") for s in rep["statuses"]), summary
    slow = rep["slow_uploads"]
    assert slow["count"] > 0 and slow["answered_408"] == slow["count"] and slow["max_seconds"] <= 2 + 5, summary
    assert rep["server"]["errors"].get("body_timeout", 0) >= slow["count"], summary
    assert rep["disconnects"] > 0 and not rep["transport_errors"], summary
    fds = rep["fds"]
    assert fds["after"] <= fds["before"] + 4, summary  # every connection let go
    assert fds["during_max"] <= fds["before"] + 8 + 2 + 16, summary  # clients + slow uploads + hang-ups in flight
    # loose: 30 s is short, ONNX Runtime's arena still grows with new batch shapes (27% seen here); the 10-minute
    # run in benchmarks/README.md is the 10% check (+4.5%)
    assert rep["rss_mib"]["growth"] < 0.5, summary
    assert rep["checks"]["no_5xx"] and rep["checks"]["all_200_match"]
