"""The benchmark script runs (one second, one request kind) so that it cannot rot."""

from __future__ import annotations

import json
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
