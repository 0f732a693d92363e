"""The benchmark script runs (one second, one request kind) so that it cannot rot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")
def test_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "bench/run.py", "--duration", "1", "--only",
                          "c-sandbox", "--json", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "c-sandbox" in run.stdout and "ratio" in run.stdout
    result = json.loads(out.read_text())["c-sandbox"]
    assert result["service"]["requests"] > 0 and result["bare"]["requests"] > 0
    assert result["service"]["errors"] == 0 and result["cards"] == 1


@pytest.mark.skipif(shutil.which("wrk") is None or not os.environ.get("CDS_TEST_POSTGRES_URL"),
                    reason="needs wrk and CDS_TEST_POSTGRES_URL")
def test_soak_smoke_one_audit_row_per_call(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = {**os.environ, "CDS_BENCH_POSTGRES_URL": os.environ["CDS_TEST_POSTGRES_URL"]}
    run = subprocess.run([sys.executable, "bench/soak.py", "--duration", "2", "--measure", "1",
                          "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["calls_answered"] > 100
    assert result["audit_rows"] == result["calls_answered"] and result["errors"] == 0
