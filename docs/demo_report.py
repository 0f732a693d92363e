"""Fill a scratch database with six weeks of realistic traffic and render the report page.

    .venv/bin/python docs/demo_report.py      # writes docs/report.html and docs/report.png

Uses the fixtures as traffic, a moving clock, and feedback drawn with fixed odds per card kind.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient

from cds_service.app import create_app
from cds_service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
REASONS = {"not-appropriate": ["clinical-judgement", "specialist-request", "record-incomplete"],
           "better-alternative": ["clinical-judgement", "patient-preference"],
           "mri-safety": ["mr-conditional"], "recent-mri": ["symptoms-changed"],
           "cauda-equina": ["already-evaluated"], "missing-data": []}


def main() -> None:
    rng = random.Random(7)
    tmp = Path(tempfile.mkdtemp())
    clock = {"now": datetime(2026, 10, 5, 9, tzinfo=UTC)}
    settings = Settings(env="development", data_dir=tmp, admin_token="demo",
                        database_url=f"sqlite+aiosqlite:///{tmp / 'demo.db'}")
    app = create_app(settings, clock=lambda: clock["now"])
    expected = json.loads((ROOT / "fixtures" / "expected.json").read_text())
    bodies = [json.loads((ROOT / "fixtures" / c["file"]).read_text())
              for c in expected["cases"] if c.get("status", 200) == 200 and c["cards"]]
    with TestClient(app) as c:
        for day in range(42):
            clock["now"] = datetime(2026, 10, 5, 9, tzinfo=UTC) + timedelta(days=day)
            for _ in range(rng.randint(3, 12)):
                body = rng.choice(bodies)
                url = "/cds-services/lbp-imaging-" + body["hook"]
                cards = c.post(url, json=body).json()["cards"]
                items = []
                for card in cards:
                    roll = rng.random()
                    when = (clock["now"] + timedelta(minutes=2)).isoformat()
                    accept = 0.35 + day / 200
                    if roll < accept and card.get("suggestions"):
                        items.append({"card": card["uuid"], "outcome": "accepted",
                                      "acceptedSuggestions": [
                                          {"id": card["suggestions"][0]["uuid"]}],
                                      "outcomeTimestamp": when})
                    elif roll < accept + 0.35 and card.get("overrideReasons"):
                        reason = rng.choice(card["overrideReasons"])
                        items.append({"card": card["uuid"], "outcome": "overridden",
                                      "overrideReason": {"reason": reason},
                                      "outcomeTimestamp": when})
                if items:
                    c.post(url + "/feedback", json={"feedback": items})
        page = c.get("/admin/report", headers={"Authorization": "Bearer demo"}).text
    out = ROOT / "docs" / "report.html"
    out.write_text(page)
    chromium = shutil.which("chromium")
    if chromium:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--no-first-run",
                        f"--user-data-dir={tmp / 'profile'}", "--hide-scrollbars",
                        f"--screenshot={ROOT / 'docs' / 'report.png'}",
                        "--window-size=1280,2200", out.as_uri()], check=True,
                       capture_output=True)
    print(f"wrote {out}" + (" and docs/report.png" if chromium else ""))


if __name__ == "__main__":
    main()
