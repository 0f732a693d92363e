"""End to end, issue 23: the card's SMART link opened from the real CDS Hooks sandbox, in
headless Chromium. The sandbox's FHIR server plays the EHR (``_services/smart/Launch``, a SMART
authorisation server that approves at once: tests/e2e/fhir_server.py); the draft order exists
only in the sandbox (``context.draftOrders``), so the app rates the card's study for the token's
patient and says it is not saved yet. After "Save answers" the app sends the sandbox the order
re-rated (SMART Web Messaging ``scratchpad.update``, then ``ui.done``): the sandbox shows the new
rating and closes the app's window, with no further click.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from tests.e2e.fhir_server import PRACTITIONER, SEED_PATIENT, SandboxFhirServer, seed_patient
from tests.e2e.sandbox import Sandbox, StaticSite, sandbox_url
from tests.e2e.test_sandbox import BUILD, CHROMIUM, LOW_BACK_PAIN
from tests.served import served

pytestmark = [
    pytest.mark.skipif(not (BUILD / "index.html").is_file(),
                       reason=f"the CDS Hooks sandbox build is not at {BUILD}"),
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = sync_api.expect
APPROPRIATE = re.compile(r"^PAMA Rating: appropriate\W*$")
MRI = "MRI lumbar spine without IV contrast"


def undecided_patient() -> dict[str, Any]:
    """The seed patient with no conservative care on record and an epidural injection
    planned: an MRI without contrast is rated only once someone says whether conservative care
    was tried, and for how long (V2 or V3)."""
    data = seed_patient()
    data["procedures"] = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    injection = {"resourceType": "ServiceRequest", "id": "sr-esi", "status": "active",
                 "intent": "order", "code": {"coding": [
                     {"system": "http://www.ama-assn.org/go/cpt", "code": "62323"}]},
                 "authoredOn": datetime.now(UTC).date().isoformat(),
                 "subject": {"reference": f"Patient/{SEED_PATIENT}"}}
    data["servicerequests"] = {"resourceType": "Bundle", "type": "searchset",
                               "entry": [{"resource": injection}]}
    return data


@pytest.fixture(scope="module")
def site() -> Iterator[StaticSite]:
    with StaticSite(BUILD) as s:
        yield s


@pytest.fixture(scope="module")
def fhir() -> Iterator[SandboxFhirServer]:
    with SandboxFhirServer() as server:
        server.data[SEED_PATIENT] = undecided_patient()
        yield server


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, fhir: SandboxFhirServer) -> Iterator[str]:
    data = tmp_path_factory.mktemp("sandbox-smart")
    with served(data, CDS_FHIR_ALLOWED_SERVERS=fhir.base, CDS_PUBLIC_BASE_URL="{base}",
                CDS_SMART_FRAME_ANCESTORS=f"http://localhost:{fhir.port}",
                CDS_LOG_LEVEL="WARNING") as base:
        yield base


def test_the_cards_link_opens_the_app_and_the_sandbox_shows_the_new_rating(
        browser: Any, site: StaticSite, fhir: SandboxFhirServer, service: str,
        tmp_path: Path) -> None:
    fhir.ehr.reset()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(15_000)
    sb = Sandbox(page, timeout=15)
    try:
        sb.open(sandbox_url(site.base, fhir.base, SEED_PATIENT, service))
        sb.pick_order("72148")
        call = sb.add_reason("low back pain", LOW_BACK_PAIN)
        assert call.status == 200, call.body
        asking = [c for c in call.cards if c.get("links")]
        assert len(asking) == 1, call.cards
        (link,) = asking[0]["links"]
        assert link["type"] == "smart", asking
        expect(sb.rating()).not_to_have_text(APPROPRIATE)
        with context.expect_page() as opened:
            sb.cards().get_by_text(link["label"]).click()
        app = opened.value
        app.set_default_timeout(15_000)
        # the sandbox asked its FHIR server for the launch, with the link's appContext
        # (the sandbox asks for a launch when it draws the card's links, and again on the click)
        asked = fhir.ehr.launch_requests[-1]
        assert asked["launchUrl"] == f"{service}/app/launch"
        assert asked["parameters"]["appContext"] == link["appContext"]
        assert asked["parameters"]["smart_messaging_origin"] == site.base
        expect(app.locator("h1")).to_have_text("Questions that decide the rating")
        expect(app.locator("body")).to_contain_text(f"Order: {MRI} (not saved yet)")
        app.locator('input[name="conservative-care"][value="yes"]').check()
        weeks = app.locator('input[name="conservative-care-weeks"]')
        expect(weeks).to_be_enabled()
        weeks.fill("8")
        app.get_by_role("button", name="Save answers").click()
        # the sandbox shows the re-rated order, and the app's window is closed: no click
        expect(sb.rating()).to_have_text(APPROPRIATE)
        sb.wait_until(app.is_closed, "the app's window closed by ui.done")
        (saved,) = fhir.ehr.responses
        assert saved["author"] == {"reference": PRACTITIONER}
        assert saved["basedOn"] == [{"reference": "ServiceRequest/example-request-id"}]
        assert sb.errors == []
    except Exception:
        page.screenshot(path=str(tmp_path / "sandbox.png"), full_page=True)
        for extra in context.pages[1:]:
            extra.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        print(f"saved in {tmp_path}")
        raise
    finally:
        context.close()


def test_the_app_works_in_a_side_panel_of_another_site(browser: Any, fhir: SandboxFhirServer,
                                                        service: str, tmp_path: Path) -> None:
    """Item 7: the EHR's page (http://localhost:port, another site than the app's 127.0.0.1)
    shows the app in a frame: its Partitioned cookie is kept there, the answers are saved, and
    the saved page says when the order is rated (no SMART Web Messaging from this EHR)."""
    fhir.ehr.reset()
    launch = httpx.post(f"{fhir.base}/_services/smart/Launch", json={
        "launchUrl": f"{service}/app/launch", "parameters": {
            "patient": SEED_PATIENT, "appContext": json.dumps({
                "order": "ServiceRequest/draft-1", "procedure": "mri-wo",
                "ask": ["conservative-care"]})}}).json()["launch_id"]
    app = f"{service}/app/launch?" + urlencode({"iss": fhir.base, "launch": launch})
    context = browser.new_context(viewport={"width": 1000, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        page.goto(f"http://localhost:{fhir.port}/ehr?" + urlencode({"app": app}))
        panel = page.frame_locator("#panel")
        expect(panel.locator("h1")).to_have_text("Questions that decide the rating")
        panel.locator('input[name="conservative-care"][value="no"]').check()
        panel.get_by_role("button", name="Save answers").click()
        expect(panel.locator(".notice.saved")).to_contain_text(
            "the order is rated with these answers when you next select or sign it")
        expect(panel.get_by_role("button", name="Close")).to_be_visible()
        (saved,) = fhir.ehr.responses
        assert saved["item"] == [{"linkId": "conservative-care", "text": saved["item"][0]["text"],
                                  "answer": [{"valueBoolean": False}]}]
    except Exception:
        page.screenshot(path=str(tmp_path / "ehr.png"), full_page=True)
        print(f"saved in {tmp_path}")
        raise
    finally:
        context.close()
