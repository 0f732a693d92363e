"""The command line: evaluate a request file without a server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import FIXTURES, ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CDS_ENV": "development"}
    return subprocess.run([sys.executable, "-m", "cds_service", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_evaluate_prints_cards_readably_and_the_json() -> None:
    out = run("evaluate", str(FIXTURES / "requests" / "v3-seed-mri-w.json"),
              "--now", "2026-11-01T12:00:00Z")
    assert out.returncode == 0, out.stderr
    head, _, raw = out.stdout.partition("\n\n")
    assert "[WARNING] MRI with contrast usually not appropriate" in head
    assert "suggestion: Change to MRI lumbar spine without IV contrast (recommended)" in head
    assert "not-appropriate / UNA" in head
    body = json.loads(raw)
    assert body["cards"][0]["indicator"] == "warning"


def test_evaluate_json_only() -> None:
    out = run("evaluate", "--json", str(FIXTURES / "requests" / "v3-seed-mri-wo.json"),
              "--now", "2026-11-01T12:00:00Z")
    assert out.returncode == 0
    assert json.loads(out.stdout)["cards"] == []


def test_evaluate_reports_bad_files() -> None:
    out = run("evaluate", "no-such-file.json")
    assert out.returncode == 2 and "cannot read" in out.stderr
    out = run("evaluate", str(FIXTURES / "examples" / "spec" / "v2-jwt-payload.json"))
    assert out.returncode == 2 and "hook is required" in out.stderr


def test_evaluate_into_a_pipe_closed_early_ends_quietly() -> None:
    """`cds-service evaluate FILE | head -1`: the reader is gone before the output is written
    (here: before the command starts); the command stops without a traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write fails with EPIPE
    try:
        out = subprocess.run(
            [sys.executable, "-m", "cds_service", "evaluate",
             str(FIXTURES / "requests" / "v3-seed-mri-w.json"), "--now", "2026-11-01T12:00:00Z"],
            cwd=ROOT, env={**os.environ, "CDS_ENV": "development"}, stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in out.stderr
    assert "BrokenPipeError" not in out.stderr
    assert out.stderr == ""
    assert out.returncode == 1
