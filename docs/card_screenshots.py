"""Screenshots of three cards in the real CDS Hooks sandbox (issue 22: cards read at a glance).

    .venv/bin/python docs/card_screenshots.py after    # writes docs/card-<name>-after.png

Three loopback servers as in tests/e2e/test_sandbox.py (the sandbox build, a FHIR server holding
three fixture patients with their dates moved to today, the service of this checkout); Chromium
picks the study and "low back pain" as its reason, and each card is photographed on its own.
The label (``before``, ``after``) names the files: run it on the code before a change and after.
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import FIXTURE_NOW, FIXTURES  # noqa: E402
from tests.e2e.fhir_server import SandboxFhirServer, shift_dates  # noqa: E402
from tests.e2e.sandbox import CHROMIUM_ARGS, Sandbox, StaticSite, sandbox_url  # noqa: E402
from tests.e2e.test_sandbox import BUILD, CHROMIUM, LOW_BACK_PAIN  # noqa: E402
from tests.served import served  # noqa: E402

# card name -> (fixture whose patient is served, CPT code picked in the sandbox)
CARDS = {
    "chronic-mri-contrast": ("v3-seed-mri-w", "72149"),  # V3, MRI with contrast: a warning
    "acute-mri": ("v1-acute-mri-wo", "72148"),  # V1, 10 days of pain: no imaging yet
    # suspected cauda equina (urinary retention, saddle anaesthesia), CT with contrast: critical
    "cauda-equina-ct": ("v4-ces-symptoms-on-problem-list-mri-wo", "72132"),
}


def patient_of(fixture: str) -> tuple[str, dict]:
    """The fixture's patient id and prefetch, its dates moved to today (the service rates with
    the real clock), with a name for the sandbox's banner."""
    body = json.loads((FIXTURES / "requests" / f"{fixture}.json").read_text())
    days = (datetime.now(UTC).date() - FIXTURE_NOW.date()).days
    data = shift_dates(body["prefetch"], days)
    data["patient"].setdefault("name", [{"use": "official", "given": ["Sam"],
                                         "family": fixture.split("-")[0].upper()}])
    return body["context"]["patientId"], data


def main(label: str) -> None:
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="cards-"))
    with StaticSite(BUILD) as site, SandboxFhirServer() as fhir, \
            served(tmp, CDS_FHIR_ALLOWED_SERVERS=fhir.base, CDS_LOG_LEVEL="WARNING") as service, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for name, (fixture, cpt) in CARDS.items():
            pid, data = patient_of(fixture)
            fhir.data[pid] = data
            context = browser.new_context(viewport={"width": 1400, "height": 2600})
            page = context.new_page()
            page.set_default_timeout(10_000)
            sb = Sandbox(page)
            sb.open(sandbox_url(site.base, fhir.base, pid, service))
            sb.pick_order(cpt)
            call = sb.add_reason("low back pain", LOW_BACK_PAIN)
            assert call.status == 200 and len(call.cards) == 1, call.body
            page.wait_for_timeout(300)
            out = ROOT / "docs" / f"card-{name}-{label}.png"
            sb.cards().first.screenshot(path=str(out))
            print(f"wrote {out.relative_to(ROOT)}: {call.cards[0]['summary']}")
            context.close()
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "after")
