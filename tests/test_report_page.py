"""The report page in a real headless browser, and the CLI report and db commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cds_service.app import create_app
from tests.conftest import FIXTURE_NOW, FIXTURES, ROOT, SELECT, ValidatingClient, dev_settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ADMIN = "report-admin-token"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def make_page(tmp_path: Path) -> tuple[Path, str]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cds.db'}"
    settings = dev_settings(database_url=url, data_dir=tmp_path, admin_token=ADMIN)
    body = json.loads((FIXTURES / "requests" / "v3-seed-mri-w.json").read_text())
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
        cards = [c.post(SELECT, json=body).json()["cards"][0] for _ in range(3)]
        c.post(SELECT + "/feedback", json={"feedback": [
            {"card": cards[0]["uuid"], "outcome": "accepted",
             "acceptedSuggestions": [{"id": cards[0]["suggestions"][0]["uuid"]}],
             "outcomeTimestamp": "2026-11-01T13:00:00Z"},
            {"card": cards[1]["uuid"], "outcome": "overridden",
             "overrideReason": {"reason": {"system": "urn:x", "code": "clinical-judgement",
                                           "display": "Clinical findings not in the record"}},
             "outcomeTimestamp": "2026-11-01T13:00:00Z"}]})
        page = c.get("/admin/report", headers={"Authorization": f"Bearer {ADMIN}"})
    path = tmp_path / "report.html"
    path.write_text(page.text)
    return path, url


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium;"
                    " .ci/run installs it)")
def test_report_page_renders_in_chromium(tmp_path: Path) -> None:
    page, _ = make_page(tmp_path)
    profile = tmp_path / "profile"
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert '<div id="shown"><b>3</b>cards shown</div>' in html
    assert '<div id="accepted"><b>1</b>accepted</div>' in html
    assert '<div id="overridden"><b>1</b>overridden</div>' in html
    assert "Clinical findings not in the record" in html
    assert html.count("<svg") == 3
    shot = tmp_path / "report.png"
    run = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                          f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.stat().st_size > 10_000


def test_cli_db_upgrade_and_report(tmp_path: Path) -> None:
    _, url = make_page(tmp_path)
    env = {**os.environ, "CDS_ENV": "development", "CDS_DATABASE_URL": url,
           "CDS_DATA_DIR": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cds_service", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    up = cli("db", "upgrade")
    assert up.returncode == 0 and "latest schema" in up.stdout
    text = cli("report")
    assert "cards shown 3: accepted 1, overridden 1, ignored 1" in text.stdout
    assert "Clinical findings not in the record (clinical-judgement)" in text.stdout
    data = json.loads(cli("report", "--json", "--service", "lbp-imaging-order-sign").stdout)
    assert data["totals"]["shown"] == 0
    out = tmp_path / "r.html"
    assert cli("report", "--html", str(out)).returncode == 0
    assert "<svg" in out.read_text()
