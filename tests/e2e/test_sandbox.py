"""End to end: the real CDS Hooks sandbox, in headless Chromium, against a running service.

Three loopback servers: the sandbox's production build (static files), a small FHIR R4 server
holding the seed patient (tests/e2e/fhir_server.py), and the service itself
(``cds-service serve`` in development mode). Playwright drives the sandbox's "PAMA Imaging"
tab as a clinician would: pick a study and a reason, read the card and the rating, take the
suggestion or override the card; the service's report must then say exactly what happened.

Screenshots and the page's HTML are saved to the test's tmp dir when a test fails. With
``CDS_SANDBOX_DOCS=1`` the screenshots shown in docs/sandbox.md are rewritten.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT
from tests.e2e.fhir_server import SEED_PATIENT, SandboxFhirServer, seed_patient
from tests.e2e.sandbox import Sandbox, StaticSite, sandbox_url
from tests.served import served

SANDBOX = Path("tools") / "cds-hooks-sandbox" / "build"


def sandbox_build() -> Path:
    """The sandbox build: CDS_SANDBOX_BUILD, else ../shared beside the checkout (where the team
    keeps it), else the workplace's shared folder (a clone elsewhere, as CI may make)."""
    if os.environ.get("CDS_SANDBOX_BUILD"):
        return Path(os.environ["CDS_SANDBOX_BUILD"])
    for shared in (ROOT.parent / "shared", Path("/work/shared")):
        if (shared / SANDBOX / "index.html").is_file():
            return shared / SANDBOX
    return ROOT.parent / "shared" / SANDBOX


BUILD = sandbox_build()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(not (BUILD / "index.html").is_file(),
                       reason=f"the CDS Hooks sandbox build is not at {BUILD} "
                              "(see ../shared/tools/cds-hooks-sandbox/README.md)"),
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install "
                       "chromium; .ci/run installs it)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(pip install -e '.[test]'; make test installs it)")
expect = sync_api.expect

ADMIN = "sandbox-admin-token"
PATIENT = SEED_PATIENT
SUGGESTION = "Change to MRI lumbar spine without IV contrast"
WITHOUT_CONTRAST = "MRI lumbar spine without IV contrast"
LOW_BACK_PAIN = "Low back pain (finding)"
NOT_APPROPRIATE = re.compile(r"^PAMA Rating: not-appropriate\W*$")
APPROPRIATE = re.compile(r"^PAMA Rating: appropriate\W*$")
DOCS = ROOT / "docs"


# --- the servers and the browser ------------------------------------------------------------
@pytest.fixture(scope="module")
def site() -> Iterator[StaticSite]:
    with StaticSite(BUILD) as s:
        yield s


@pytest.fixture(scope="module")
def fhir_server() -> Iterator[SandboxFhirServer]:
    with SandboxFhirServer() as server:
        server.data[PATIENT] = seed_patient()
        yield server


@pytest.fixture
def fhir(request: pytest.FixtureRequest, fhir_server: SandboxFhirServer) -> SandboxFhirServer:
    """The FHIR server, with the searches of the test's ``fhir_fails`` mark answering 500 (set
    before the sandbox opens: it runs the prefetch queries when it loads the patient)."""
    fhir_server.fail.clear()
    for mark in request.node.iter_markers("fhir_fails"):
        fhir_server.fail.update(mark.args)
    with fhir_server.lock:
        fhir_server.seen.clear()
    return fhir_server


@pytest.fixture
def service(tmp_path: Path, fhir_server: SandboxFhirServer) -> Iterator[str]:
    """A fresh service (its own SQLite database) that may fetch from the FHIR server."""
    data = tmp_path / "data"
    with served(data, CDS_ADMIN_TOKEN=ADMIN, CDS_FHIR_ALLOWED_SERVERS=fhir_server.base,
                CDS_DATABASE_URL=f"sqlite+aiosqlite:///{data / 'cds.db'}",
                CDS_LOG_LEVEL="WARNING") as base:
        assert httpx.get(base + "/healthz", timeout=5).status_code == 200, "service not up"
        yield base


@pytest.fixture
def sandbox(request: pytest.FixtureRequest, browser: Any, site: StaticSite,
            fhir: SandboxFhirServer, service: str, tmp_path: Path) -> Iterator[Sandbox]:
    """A fresh browser context (clean localStorage) on the sandbox, opened on the seed patient;
    the first call (no study yet) has been answered."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(10_000)
    sb = Sandbox(page)
    try:
        first = sb.open(sandbox_url(site.base, fhir.base, PATIENT, service))
        assert first.status == 200 and first.cards == [], first.body
        yield sb
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is None or report.failed:
            page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
            (tmp_path / "failed.html").write_text(page.content())
            print(f"sandbox page saved: {tmp_path / 'failed.png'}, {tmp_path / 'failed.html'}; "
                  f"page errors: {sb.errors}; hook calls: "
                  f"{[(c.status, c.draft['code']['coding'][0].get('code')) for c in sb.calls]}")
        context.close()


def snap(sb: Sandbox, tmp_path: Path, name: str) -> None:
    """A screenshot in the tmp dir, and in docs/ when CDS_SANDBOX_DOCS=1."""
    path = tmp_path / f"sandbox-{name}.png"
    sb.page.screenshot(path=str(path))
    if os.environ.get("CDS_SANDBOX_DOCS") == "1":
        shutil.copyfile(path, DOCS / path.name)


def report(service: str) -> dict[str, Any]:
    r = httpx.get(service + "/admin/report", timeout=10,
                  headers={"Authorization": f"Bearer {ADMIN}", "Accept": "application/json"})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def rated(sb: Sandbox, cpt: str, with_reason: bool = True) -> dict[str, Any]:
    """Pick the study (and low back pain as the reason); the one card that comes back."""
    call = sb.pick_order(cpt)
    if with_reason:
        call = sb.add_reason("low back pain", LOW_BACK_PAIN)
        assert call.draft["reasonCode"][0]["coding"][0]["code"] == "279039007"
    assert call.status == 200, call.body
    assert len(call.cards) == 1, call.body
    expect(sb.cards()).to_have_count(1)
    return call.cards[0]


# --- the scenarios ----------------------------------------------------------------------------
def test_mri_with_contrast_card_rating_and_accepted_suggestion(
        sandbox: Sandbox, service: str, tmp_path: Path) -> None:
    """Seed patient, MRI with contrast for low back pain: a warning card and "not-appropriate";
    the suggestion changes the order to MRI without contrast (shown by its display), the rating
    becomes "appropriate", and the service stored the acceptance."""
    card = rated(sandbox, "72149")
    assert card["summary"].startswith("MRI with contrast usually not appropriate")
    assert "consider MRI without contrast" in card["summary"]
    expect(sandbox.cards()).to_contain_text("MRI with contrast usually not appropriate")
    expect(sandbox.rating()).to_have_text(NOT_APPROPRIATE)
    expect(sandbox.cards().get_by_role("button", name=SUGGESTION)).to_be_visible()
    snap(sandbox, tmp_path, "card")

    item, after = sandbox.take_suggestion(SUGGESTION)
    assert item["outcome"] == "accepted" and item["card"] == card["uuid"]
    assert item["acceptedSuggestions"] == [{"id": card["suggestions"][0]["uuid"]}]
    # the sandbox shows code.coding[0].display of the suggested order (nothing when it is empty)
    expect(sandbox.study()).to_have_text([WITHOUT_CONTRAST])
    expect(sandbox.reasons()).to_have_text([LOW_BACK_PAIN])
    expect(sandbox.rating()).to_have_text(APPROPRIATE)
    assert after.draft["code"]["coding"][0]["code"] == "72148"
    assert after.status == 200 and after.cards == [], after.body
    expect(sandbox.cards()).to_have_count(0)
    assert sandbox.errors == []
    snap(sandbox, tmp_path, "accepted")

    totals = report(service)["totals"]
    assert totals["accepted"] == 1 and totals["overridden"] == 0, totals


def test_suggestion_for_an_order_without_a_reason(sandbox: Sandbox) -> None:
    """No reason picked: taking the suggestion must not throw in the page (the sandbox maps the
    suggested order's reasonCode) and the order changes."""
    card = rated(sandbox, "72149", with_reason=False)
    assert "usually not appropriate" in card["summary"]
    expect(sandbox.reasons()).to_have_count(0)
    expect(sandbox.rating()).to_have_text(NOT_APPROPRIATE)
    item, after = sandbox.take_suggestion(SUGGESTION)
    assert item["outcome"] == "accepted"
    assert sandbox.errors == []
    expect(sandbox.study()).to_have_text([WITHOUT_CONTRAST])
    expect(sandbox.rating()).to_have_text(APPROPRIATE)
    assert after.draft["code"]["coding"][0]["code"] == "72148"
    assert after.status == 200, after.body
    assert sandbox.errors == []


@pytest.mark.fhir_fails(("Procedure", "browser"))
def test_failing_fhir_query_is_fetched_by_the_service(
        sandbox: Sandbox, fhir: SandboxFhirServer) -> None:
    """The sandbox's Procedure query fails (500, and again on its GET retry): it leaves
    `procedures` out of prefetch. The rating of MRI without contrast hangs on them (8 weeks of
    physical therapy make it appropriate): the service fetches them from the allow-listed server
    (an open one: no token) and answers; the card for MRI with contrast cites them."""
    call = sandbox.pick_order("72148")
    assert "procedures" not in call.request.get("prefetch", {}), "the sandbox sent procedures"
    assert "conditions" in call.request["prefetch"]
    assert "fhirAuthorization" not in call.request
    assert call.status == 200, f"the service answered {call.status}: {call.body}"
    assert call.cards == [], call.body
    expect(sandbox.rating()).to_have_text(APPROPRIATE)
    expect(sandbox.page.locator("body")).not_to_contain_text("Could not get a response")

    call = sandbox.pick_order("72149")  # a card now, with the fetched therapy as its evidence
    assert call.status == 200, f"the service answered {call.status}: {call.body}"
    assert len(call.cards) == 1 and "usually not appropriate" in call.cards[0]["summary"]
    assert "| PT evaluation (97161) | Conservative care | 2026" in call.cards[0]["detail"]
    assert ", procedures |" in call.cards[0]["detail"]  # (where it is recorded, in words)
    expect(sandbox.cards()).to_contain_text("PT evaluation (97161)")
    expect(sandbox.rating()).to_have_text(NOT_APPROPRIATE)

    tried = fhir.requests("POST", "Procedure/_search") + fhir.requests("GET", "Procedure")
    assert [s.status for s in tried if s.origin][:2] == [500, 500], fhir.seen  # the sandbox
    fetched = [s for s in fhir.requests("GET", "Procedure") if not s.origin]  # the service
    assert fetched and all(s.params.get("patient") == [PATIENT] for s in fetched), fhir.seen
    assert all(s.authorization is None and s.status == 200 for s in fetched), fetched
    assert sandbox.errors == []


def test_override_from_the_dismiss_menu(sandbox: Sandbox, service: str,
                                        tmp_path: Path) -> None:
    """An override reason picked in the Dismiss menu: the sandbox posts `overridden` with the
    reason's code and system; the service stores it and reports it with its display text."""
    card = rated(sandbox, "72149")
    sandbox.cards().get_by_role("button", name="select dismiss reason").click()
    expect(sandbox.page.get_by_role("menuitem")).to_contain_text(
        [f"Override: {r['display']}" for r in card["overrideReasons"]])
    expect(sandbox.page.locator(".MuiMenu-paper")).to_have_css("opacity", "1")  # opened
    snap(sandbox, tmp_path, "override-menu")
    sandbox.page.keyboard.press("Escape")
    item = sandbox.override("Shared decision with the patient")
    assert item["outcome"] == "overridden" and item["card"] == card["uuid"]
    assert item["overrideReason"]["reason"]["code"] == "patient-preference"
    expect(sandbox.cards()).to_have_count(0)
    body = report(service)
    assert body["totals"]["overridden"] == 1 and body["totals"]["accepted"] == 0, body["totals"]
    assert body["override_reasons"] == [{"code": "patient-preference",
                                         "display": "Shared decision with the patient",
                                         "count": 1}]
    assert sandbox.errors == []


def test_scripted_session_report_counts_exactly(sandbox: Sandbox, service: str,
                                                tmp_path: Path) -> None:
    """A session in the picker: every change re-fires order-select for the same draft order.
    Six cards: three replaced by the next change (superseded), one accepted, one overridden,
    the last one left alone (ignored). Then the clinician changes their mind about the accepted
    card (overridden later): the last outcome wins and counts as a changed mind."""
    cards = [rated(sandbox, "72149", with_reason=False)]  # 1: no reason yet
    call = sandbox.add_reason("low back pain", LOW_BACK_PAIN)  # 2: the reason added
    cards.append(call.cards[0])
    for cpt in ("72132", "72158"):  # 3: CT with contrast; 4: MRI without and with
        call = sandbox.pick_order(cpt)
        assert len(call.cards) == 1, call.body
        cards.append(call.cards[0])
    accepted = cards[-1]
    assert accepted["suggestions"][0]["label"] == SUGGESTION
    item, after = sandbox.take_suggestion(SUGGESTION)
    assert after.cards == [] and item["card"] == accepted["uuid"]
    expect(sandbox.rating()).to_have_text(APPROPRIATE)
    cards.append(sandbox.pick_order("72149").cards[0])  # 5: overridden
    sandbox.override("Shared decision with the patient")
    cards.append(sandbox.pick_order("72132").cards[0])  # 6: left alone
    expect(sandbox.cards()).to_have_count(1)
    assert len({c["uuid"] for c in cards}) == 6
    assert sandbox.errors == []

    body = report(service)
    assert body["totals"] == {"shown": 6, "accepted": 1, "overridden": 1, "ignored": 1,
                              "superseded": 3, "changed_mind": 0}, body["totals"]
    kinds = {r["kind"]: r for r in body["by_kind"]}
    assert kinds == {
        "not-appropriate": {"kind": "not-appropriate", "shown": 5, "accepted": 0,
                            "overridden": 1, "ignored": 1, "superseded": 3, "changed_mind": 0},
        "better-alternative": {"kind": "better-alternative", "shown": 1, "accepted": 1,
                               "overridden": 0, "ignored": 0, "superseded": 0,
                               "changed_mind": 0}}
    assert body["override_reasons"] == [{"code": "patient-preference",
                                         "display": "Shared decision with the patient",
                                         "count": 1}]
    assert body["unknown_card_feedback"] == 0

    # the EHR reports later that the accepted card was overridden after all (by code, as the
    # sandbox sends reasons): overridden now, and a changed mind
    later = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    r = httpx.post(service + "/cds-services/lbp-imaging-order-select/feedback", timeout=10,
                   json={"feedback": [{"card": accepted["uuid"], "outcome": "overridden",
                                       "outcomeTimestamp": later, "overrideReason": {"reason": {
                                           "code": "clinical-judgement",
                                           "system": accepted["overrideReasons"][0]["system"]}}}]})
    assert r.status_code == 200 and r.json()["stored"] == 1, r.text
    body = report(service)
    assert body["totals"] == {"shown": 6, "accepted": 0, "overridden": 2, "ignored": 1,
                              "superseded": 3, "changed_mind": 1}, body["totals"]
    kinds = {r["kind"]: r for r in body["by_kind"]}
    assert kinds["better-alternative"] == {
        "kind": "better-alternative", "shown": 1, "accepted": 0, "overridden": 1, "ignored": 0,
        "superseded": 0, "changed_mind": 1}
    assert sorted(body["override_reasons"], key=lambda r: r["code"]) == [
        {"code": "clinical-judgement", "display": "Clinical findings not captured in the record",
         "count": 1},
        {"code": "patient-preference", "display": "Shared decision with the patient",
         "count": 1}]

    page = sandbox.page  # the report page, as an administrator sees it
    page.set_extra_http_headers({"Authorization": f"Bearer {ADMIN}"})
    page.goto(service + "/admin/report")
    expect(page.locator("#superseded")).to_have_text(re.compile(r"^\s*3\s*superseded"))
    expect(page.locator("body")).to_contain_text("Shared decision with the patient")
    snap(sandbox, tmp_path, "report")
