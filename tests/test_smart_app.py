"""The SMART app (/app/) against the tests' own SMART EHR (tests/smart_server.py), on real
sockets: launch -> authorise -> token -> questions -> QuestionnaireResponse written -> the next
order-select rates the order with it; and every failure a clear page, never a 500."""

from __future__ import annotations

import asyncio
import dataclasses
import html
import json
import logging
import re
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from cds_service.app import ConfigurationError, create_app
from cds_service.engine import Engine
from cds_service.knowledge import load_knowledge
from cds_service.record import record_from_prefetch
from cds_service.render import load_templates
from cds_service.settings import Settings
from cds_service.smart.keys import SessionKeys
from cds_service.smart.oauth import can_write_responses
from cds_service.smart.rating import rating_view
from cds_service.store import Store
from tests.builders import PATIENT, bundle, hook_request, order
from tests.conftest import ROOT, SELECT, dev_settings
from tests.served import served
from tests.smart_server import CLIENT_ID, LAUNCH, ORDER_ID, SmartTestServer, challenge_of
from tests.test_store import BACKENDS, database

SCOPES = Settings().smart_scopes
SAVED = ("Saved. Close this window; the order is rated with these answers when you next "
         "select or sign it.")
MRI = "MRI lumbar spine without IV contrast"


# ------------------------------------------------------------------ servers and steps


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory,
            ehr_server: SmartTestServer) -> Iterator[tuple[str, Path]]:
    data = tmp_path_factory.mktemp("smart-app")
    # (each test sets the EHR's configuration: read at every launch; launches not limited)
    with served(data, CDS_FHIR_ALLOWED_SERVERS=ehr_server.base, CDS_PUBLIC_BASE_URL="{base}",
                CDS_WORKERS="2", CDS_LOG_LEVEL="WARNING", CDS_SMART_CONFIG_CACHE_SECONDS="0",
                CDS_SMART_LAUNCHES_PER_MINUTE="100000") as base:  # sessions shared
        yield base, data


@pytest.fixture
def browser(service: tuple[str, Path]) -> Iterator[httpx.Client]:
    """A browser: its own cookies, redirects followed by hand."""
    with httpx.Client(base_url=service[0], timeout=20) as client:
        yield client


def launch(client: httpx.Client, ehr: SmartTestServer, iss: str | None = None) -> httpx.Response:
    return client.get("/app/launch", params={"iss": iss or ehr.base, "launch": LAUNCH})


def authorise(client: httpx.Client, ehr: SmartTestServer) -> str:
    """Launch, and be sent back by the EHR: the callback's path and query."""
    started = launch(client, ehr)
    assert started.status_code == 302, started.text
    at_ehr = httpx.get(started.headers["location"])
    assert at_ehr.status_code == 302, at_ehr.text
    back = urlsplit(at_ehr.headers["location"])
    return f"{back.path}?{back.query}"


def sign_in(client: httpx.Client, ehr: SmartTestServer) -> httpx.Response:
    """Launch -> authorise -> callback (the code exchanged): the callback's answer."""
    return client.get(authorise(client, ehr))


def text(response: httpx.Response) -> str:
    """The page's text as read (no style, no tags, spaces collapsed)."""
    body = re.sub(r"<style>.*?</style>|<[^>]+>", " ", response.text, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(body)).replace(" :", ":").strip()


def assert_page(response: httpx.Response, status: int, *phrases: str) -> None:
    """A page of the app: the status, HTML, not cached, the phrases, no trace."""
    shown = text(response)
    assert response.status_code == status, (response.status_code, shown[:2000])
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert "Traceback" not in shown and "internal error" not in shown
    for phrase in phrases:
        assert phrase in shown, (phrase, shown[:3000])


def csrf(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text[:2000]
    return html.unescape(found.group(1))


def answer(client: httpx.Client, page: httpx.Response, action: str,
           **answers: str) -> httpx.Response:
    form = {"csrf": csrf(page), "action": action,
            **{k.replace("_", "-"): v for k, v in answers.items()}}
    return client.post("/app/questions", data=form)


def checked(page: httpx.Response) -> dict[str, str]:
    """name -> the answer the form shows (a checked radio or a number's value)."""
    radios = re.findall(r'name="([\w-]+)" value="([^"]*)" checked', page.text)
    numbers = re.findall(r'name="([\w-]+)" type="number"[^>]* value="([^"]*)"', page.text)
    return {**dict(radios), **{k: v for k, v in numbers if v}}


# ------------------------------------------------------------------ the whole way


def test_launch_answer_save_then_the_hook_rates_the_order(
        browser: httpx.Client, ehr: SmartTestServer, service: tuple[str, Path]) -> None:
    base, data = service
    # 1. launch: a redirect to the EHR's authorize endpoint, a session cookie, PKCE, state
    started = launch(browser, ehr)
    assert started.status_code == 302
    target = urlsplit(started.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == f"{ehr.origin}/auth/authorize"
    asked = {k: v[0] for k, v in parse_qs(target.query).items()}
    assert asked["response_type"] == "code" and asked["client_id"] == CLIENT_ID
    assert asked["redirect_uri"] == f"{base}/app/callback" and asked["scope"] == SCOPES
    assert asked["aud"] == ehr.base and asked["launch"] == LAUNCH
    assert asked["code_challenge_method"] == "S256" and len(asked["state"]) >= 32
    cookie = started.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/app" in cookie
    assert "secure" not in cookie  # development (http); Secure everywhere else
    # 2. the EHR approves and sends the browser back; 3. the code is exchanged (PKCE checked)
    at_ehr = httpx.get(started.headers["location"])
    back = urlsplit(at_ehr.headers["location"])
    called = browser.get(f"{back.path}?{back.query}")
    assert called.status_code == 303 and called.headers["location"] == "questions"
    exchanged = ehr.token_requests[-1]
    assert challenge_of(exchanged["code_verifier"]) == asked["code_challenge"]
    assert exchanged["redirect_uri"] == asked["redirect_uri"]
    (token,) = ehr.tokens
    # 4. the questions: only those asked, pre-filled from the record, the rating still open
    page = browser.get("/app/questions")
    assert_page(page, 200, "Alex Seed", f"Order: {MRI} Questions",
                "not rated yet", "Has conservative care", "If yes: For how many weeks?")
    assert set(re.findall(r'<(?:input|button)[^>]* name="([\w-]+)"', page.text)) == {
        "csrf", "conservative-care", "conservative-care-weeks", "action"}
    assert checked(page) == {"conservative-care": ""}  # "Not known": the record is silent
    assert re.search(r'name="conservative-care-weeks"[^>]* disabled', page.text)  # until "Yes"
    assert_page(page, 200, "Why these questions: the record shows")
    assert all(auth == f"Bearer {token}" for _, _, auth in ehr.fhir_requests)
    # 5. "Update rating" with the answers so far: the same engine, now determinate
    updated = answer(browser, page, "update", conservative_care="yes",
                     conservative_care_weeks="8")
    assert_page(updated, 200, f"{MRI}: Appropriate", "Usually appropriate (UA)", "(V3)")
    assert checked(updated) == {"conservative-care": "yes", "conservative-care-weeks": "8"}
    unreadable = answer(browser, page, "update", conservative_care="yes",
                        conservative_care_weeks="eight")
    assert_page(unreadable, 400, "could not be read", "Enter a whole number of weeks")
    assert 'aria-invalid="true"' in unreadable.text and not ehr.responses
    # 6. save: the QuestionnaireResponse is written to the EHR with the app's token
    saved = answer(browser, updated, "save", conservative_care="yes",
                   conservative_care_weeks="8")
    assert_page(saved, 200, SAVED, f"{MRI}: Appropriate")
    (response,) = ehr.responses
    assert response["subject"] == {"reference": f"Patient/{PATIENT}"}
    assert response["basedOn"] == [{"reference": f"ServiceRequest/{ORDER_ID}"}]
    assert response["status"] == "completed"
    assert response["author"] == {"reference": "Practitioner/dr-1"}  # the clinician signed in
    assert response["encounter"] == {"reference": "Encounter/enc-1"}
    assert response["questionnaire"].split("|")[0].endswith("/fhir/Questionnaire/lbp-imaging-auc")
    assert [(i["linkId"], i["answer"]) for i in response["item"]] == [
        ("conservative-care", [{"valueBoolean": True}]),
        ("conservative-care-weeks", [{"valueInteger": 8}])]
    assert ("POST", "/fhir/QuestionnaireResponse", f"Bearer {token}") in ehr.fhir_requests
    # the token is in no page, and not readable in the database
    for shown in (started, called, page, updated, saved):
        assert token not in shown.text and token not in str(shown.headers)
    assert_token_not_stored(data, token)
    # 7. the next order-select, with that response in prefetch, rates the order determinately
    assert_hook_rates_with_answers(base, ehr, response)


def assert_token_not_stored(data: Path, token: str) -> None:
    for path in data.iterdir():
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    with sqlite3.connect(data / "cds.db") as db:
        rows = db.execute("SELECT id, state, verifier, granted FROM app_session").fetchall()
    assert rows and all(state is None and verifier is None for _, state, verifier, _ in rows)
    assert all(PATIENT not in str(row) for row in rows)


def assert_hook_rates_with_answers(base: str, ehr: SmartTestServer,
                                   response: dict[str, Any]) -> None:
    prefetch = dict(ehr.data)
    draft = order(ORDER_ID, cpt="72148")
    before = httpx.post(base + SELECT, json=hook_request(draft, prefetch={
        **prefetch, "questionnaireresponses": bundle()}), timeout=20).json()
    assert [c["indicator"] for c in before["cards"]] == ["info"], before
    link = before["cards"][0]["links"][0]
    assert link["type"] == "smart" and link["url"] == f"{base}/app/launch"
    context = json.loads(link["appContext"])
    assert context["order"] == f"ServiceRequest/{ORDER_ID}" and context["procedure"] == "mri-wo"
    assert "conservative-care" in context["ask"]
    after = httpx.post(base + SELECT, json=hook_request(draft, prefetch={
        **prefetch, "questionnaireresponses": bundle(response)}), timeout=20).json()
    ratings = [c["code"] for a in after["systemActions"]
               for e in a["resource"]["extension"] if "valueCodeableConcept" in e
               for c in e["valueCodeableConcept"]["coding"]]
    assert "appropriate" in ratings and "UA" in ratings, after
    assert all("links" not in c for c in after["cards"])  # nothing left to ask


def test_the_session_is_seen_by_every_worker(browser: httpx.Client, ehr: SmartTestServer,
                                             service: tuple[str, Path]) -> None:
    sign_in(browser, ehr)
    for _ in range(6):  # new connections: the kernel spreads them over the two workers
        with httpx.Client(base_url=service[0], cookies=browser.cookies, timeout=20) as again:
            assert_page(again.get("/app/questions"), 200, "Has conservative care")


# ------------------------------------------------------------------ failure pages


def test_launch_without_parameters_or_from_an_unknown_ehr(browser: httpx.Client,
                                                           ehr: SmartTestServer) -> None:
    assert_page(browser.get("/app/launch"), 400, "Not opened by the EHR")
    refused = launch(browser, ehr, iss="http://127.0.0.1:9/fhir")
    assert_page(refused, 400, "This EHR is not known to the service",
                "CDS_FHIR_ALLOWED_SERVERS")
    assert "set-cookie" not in refused.headers and not ehr.authorize_requests


def test_smart_configuration_without_s256_is_refused(browser: httpx.Client,
                                                     ehr: SmartTestServer) -> None:
    ehr.smart_config_extra = {"code_challenge_methods_supported": ["plain"]}
    assert_page(launch(browser, ehr), 502, "SMART configuration", "S256")


def test_bad_state_and_a_replayed_callback(browser: httpx.Client, ehr: SmartTestServer,
                                           service: tuple[str, Path]) -> None:
    back = authorise(browser, ehr)
    forged = re.sub(r"state=[^&]+", "state=forged-state", back)
    assert_page(browser.get(forged), 400, "This sign-in is not known")
    with httpx.Client(base_url=service[0]) as stranger:  # another browser, no cookie
        assert_page(stranger.get(back), 400, "This sign-in is not known")
    assert browser.get(back).status_code == 303  # the real one still works, once
    assert_page(browser.get(back), 400, "This sign-in is not known")
    assert len(ehr.token_requests) == 1


def test_the_ehr_refuses_authorisation(browser: httpx.Client, ehr: SmartTestServer) -> None:
    ehr.authorize_error = "access_denied"
    assert_page(sign_in(browser, ehr), 403, "The EHR did not authorise the app",
                "access_denied")
    assert not ehr.token_requests


@pytest.mark.parametrize(("mode", "phrase"), [
    ("http-400", "refused the sign-in (HTTP 400, invalid_grant)"),
    ("no-access-token", "no bearer access_token"),
    ("bad-json", "no bearer access_token"),
])
def test_token_errors(browser: httpx.Client, ehr: SmartTestServer, mode: str,
                      phrase: str) -> None:
    ehr.token_mode = mode
    assert_page(sign_in(browser, ehr), 502, phrase)
    assert_page(browser.get("/app/questions"), 401, "Your session has ended")


def test_fhir_write_refused_keeps_the_answers(browser: httpx.Client,
                                              ehr: SmartTestServer) -> None:
    sign_in(browser, ehr)
    page = browser.get("/app/questions")
    ehr.write_status = 403
    refused = answer(browser, page, "save", conservative_care="yes", conservative_care_weeks="8")
    assert_page(refused, 502, "Not saved", "did not accept the answers (HTTP 403)",
                "still on the form", f"{MRI}: Appropriate")
    assert checked(refused) == {"conservative-care": "yes", "conservative-care-weeks": "8"}
    assert not ehr.responses


def test_without_a_practitioner_signed_in_answers_are_saved_without_an_author(
        browser: httpx.Client, ehr: SmartTestServer) -> None:
    """Issue 21: only a practitioner's answers are a clinician's; when the EHR names no one
    (no fhirUser), the app says so, and the answers saved carry no author and rate nothing."""
    ehr.user = None
    sign_in(browser, ehr)
    page = browser.get("/app/questions")
    assert_page(page, 200, "Your answers will not count as a clinician's")
    updated = answer(browser, page, "update", conservative_care="yes",
                     conservative_care_weeks="8")
    assert_page(updated, 200, "not rated yet")  # the answers change no rating
    saved = answer(browser, page, "save", conservative_care="yes", conservative_care_weeks="8")
    assert_page(saved, 200, "Saved, without an author", "do not change the rating")
    (response,) = ehr.responses
    assert "author" not in response


def test_without_the_write_scope_the_rating_is_still_shown(browser: httpx.Client,
                                                           ehr: SmartTestServer) -> None:
    ehr.scope = "launch patient/*.rs"
    sign_in(browser, ehr)
    page = browser.get("/app/questions")
    refused = answer(browser, page, "save", conservative_care="no")
    assert_page(refused, 403, "the EHR did not grant the app the right to save answers",
                f"{MRI}: Not appropriate")
    assert not any(method == "POST" for method, _, _ in ehr.fhir_requests)


def test_allergies_refused_by_the_ehr_still_rate(browser: httpx.Client,
                                                ehr: SmartTestServer) -> None:
    """A token without the allergy scope: the allergies only add (a contrast allergy stays
    unknown), so the app still shows the questions; a refused problem list does not."""
    ehr.refused_searches = {"AllergyIntolerance"}
    sign_in(browser, ehr)
    assert browser.get("/app/questions").status_code == 200
    ehr.refused_searches = {"Condition"}
    sign_in(browser, ehr)
    assert_page(browser.get("/app/questions"), 401, "The EHR no longer accepts the app's access")


def test_no_session_and_a_missing_csrf_token(browser: httpx.Client, ehr: SmartTestServer) -> None:
    assert_page(browser.get("/app/questions"), 401, "Your session has ended")
    browser.cookies.set("cds_app_session", "forged.signature", path="/app")
    assert_page(browser.get("/app/questions"), 401, "Your session has ended")
    browser.cookies.clear()
    sign_in(browser, ehr)
    page = browser.get("/app/questions")
    forged = browser.post("/app/questions", data={"action": "save", "conservative-care": "no",
                                                  "csrf": csrf(page)[:-2] + "xx"})
    assert_page(forged, 403, "The answers could not be accepted")
    assert not ehr.responses


def test_an_order_of_another_patient_is_refused(browser: httpx.Client,
                                                ehr: SmartTestServer) -> None:
    ehr.orders[ORDER_ID] = order(ORDER_ID, cpt="72148", patient="someone-else")
    try:
        sign_in(browser, ehr)
        assert_page(browser.get("/app/questions"), 403, "The order is not this patient's")
    finally:
        ehr.orders[ORDER_ID] = order(ORDER_ID, cpt="72148")


# ------------------------------------------------------------------ issue 23

# Each read the app makes, made to fail (500) by the test EHR: "order" is the order's own read
READS = ["Patient", "Condition", "Procedure", "ServiceRequest", "MedicationRequest",
         "QuestionnaireResponse", "AllergyIntolerance"]
NAMES = {"Patient": "demographics", "Condition": "problem list", "Procedure": "procedures",
         "ServiceRequest": "orders and referrals", "MedicationRequest": "medication orders",
         "QuestionnaireResponse": "answers saved earlier", "AllergyIntolerance": "allergies"}


@pytest.mark.parametrize("action", ["update", "save"])
@pytest.mark.parametrize("fault", ["no-birth-date", "order", *READS])
def test_answers_are_never_lost_to_a_missing_birth_date_or_a_failed_read(
        browser: httpx.Client, ehr: SmartTestServer, fault: str, action: str) -> None:
    """Item 1: both buttons answer a page (never a 500), and "Save answers" saves whatever the
    reads or the rating do; item 5: a source that could not be read is named on the page."""
    sign_in(browser, ehr)
    page = browser.get("/app/questions")
    assert page.status_code == 200
    born = ehr.data["patient"].pop("birthDate") if fault == "no-birth-date" else None
    ehr.failing = {fault}
    try:
        shown = answer(browser, page, action, conservative_care="yes",
                       conservative_care_weeks="8")
    finally:
        if born:
            ehr.data["patient"]["birthDate"] = born
    assert shown.status_code == 200, text(shown)[:2000]
    assert_page(shown, 200, *([SAVED] if action == "save" else []))
    assert len(ehr.responses) == (1 if action == "save" else 0)
    if action == "save":
        (saved,) = ehr.responses
        assert [(i["linkId"], i["answer"]) for i in saved["item"]] == [
            ("conservative-care", [{"valueBoolean": True}]),
            ("conservative-care-weeks", [{"valueInteger": 8}])]
    if fault == "order":
        assert_page(shown, 200, "cannot be shown",
                    "Reading the order failed (http-500)")
    elif fault in NAMES:
        assert_page(shown, 200, f"Could not be read from the EHR: {NAMES[fault]}",
                    "the server failed")
    else:  # no birth date: the age is unknown, the scenarios that leave open agree
        assert_page(shown, 200, f"{MRI}: Appropriate",
                    "more than one is possible; each gives this rating")


def test_a_failed_read_is_not_an_empty_record(browser: httpx.Client,
                                              ehr: SmartTestServer) -> None:
    """Item 5: the medication orders could not be read: the page names them and what that
    leaves open, and no question says the record shows "nothing either way"."""
    ehr.failing = {"MedicationRequest"}
    sign_in(browser, ehr)
    page = browser.get("/app/questions")
    assert_page(page, 200, "Could not be read from the EHR: medication orders (the server "
                "failed).", "some of it could not be read")
    assert "The record shows: nothing either way" not in text(page)


def test_a_draft_order_the_ehr_does_not_serve_is_rated_as_the_cards_study(
        browser: httpx.Client, ehr: SmartTestServer) -> None:
    """Item 3: the card named a draft (context.draftOrders) that the FHIR server does not
    have: the app rates the card's study for the token's patient and says it is not saved."""
    ehr.app_context = json.dumps({"order": "ServiceRequest/example-request-id",
                                  "procedure": "mri-wo", "ask": ["conservative-care"]})
    sign_in(browser, ehr)
    page = browser.get("/app/questions")
    assert_page(page, 200, f"Order: {MRI} (not saved yet)", "not rated yet",
                "Has conservative care")
    assert "example-request-id" not in text(page)
    saved = answer(browser, page, "save", conservative_care="yes", conservative_care_weeks="8")
    assert_page(saved, 200, SAVED, f"{MRI}: Appropriate")
    (response,) = ehr.responses
    assert response["basedOn"] == [{"reference": "ServiceRequest/example-request-id"}]
    ehr.app_context = json.dumps({"order": "ServiceRequest/example-request-id"})
    sign_in(browser, ehr)  # no study named: nothing to rate
    assert_page(browser.get("/app/questions"), 404, "The order was not found")


def test_launched_with_fhir_context_or_without_any_order(browser: httpx.Client,
                                                         ehr: SmartTestServer) -> None:
    """Item 4: SMART 2.1 fhirContext names the order; with neither it nor appContext, the
    patient's draft or active lumbar imaging orders are offered, and the one chosen is rated
    (and its answers saved against it)."""
    ehr.app_context = None
    ehr.fhir_context = [{"reference": f"ServiceRequest/{ORDER_ID}"}]
    sign_in(browser, ehr)
    assert_page(browser.get("/app/questions"), 200, f"Order: {MRI}", "Has conservative care")
    ehr.fhir_context = None
    ehr.list_orders = True
    sign_in(browser, ehr)
    offered = browser.get("/app/questions")
    assert_page(offered, 200, "Which order?", f"{MRI} (draft)")
    links = re.findall(r'href="(questions\?order=[^"]+)"', offered.text)
    assert links == [f"questions?order={ORDER_ID}"]  # not the injection, not another study
    page = browser.get("/app/" + html.unescape(links[0]))
    assert_page(page, 200, f"Order: {MRI}", "Has conservative care")
    assert f'name="order" value="{ORDER_ID}"' in page.text
    saved = answer(browser, page, "save", conservative_care="no", order=ORDER_ID)
    assert_page(saved, 200, SAVED)
    assert ehr.responses[-1]["basedOn"] == [{"reference": f"ServiceRequest/{ORDER_ID}"}]
    ehr.list_orders = False
    sign_in(browser, ehr)
    assert_page(browser.get("/app/questions"), 200, "No lumbar imaging order to rate")
    ehr.orders[ORDER_ID] = order(ORDER_ID, cpt="72148", patient="someone-else")
    try:  # an order chosen by hand is read like any other: another patient's is refused
        assert_page(browser.get(f"/app/questions?order={ORDER_ID}"), 403,
                    "The order is not this patient's")
    finally:
        ehr.orders[ORDER_ID] = order(ORDER_ID, cpt="72148")


@pytest.mark.parametrize("mode", ["unsigned", "wrong-aud", "wrong-key", "expired"])
def test_an_id_token_that_does_not_validate_names_no_author(
        browser: httpx.Client, ehr: SmartTestServer, mode: str) -> None:
    """Item 6: the id_token is checked (the issuer's keys, aud = the client id, not expired)
    before its fhirUser is the author; one that fails names no one."""
    ehr.id_token_mode = mode
    sign_in(browser, ehr)
    page = browser.get("/app/questions")
    assert_page(page, 200, "Your answers will not count as a clinician's",
                "The sign-in could not be verified")
    answer(browser, page, "save", conservative_care="no")
    (response,) = ehr.responses
    assert "author" not in response
    assert response["encounter"] == {"reference": "Encounter/enc-1"}


def test_after_saving_the_ehr_is_sent_the_order_re_rated(browser: httpx.Client,
                                                         ehr: SmartTestServer) -> None:
    """Item 8: where the EHR offers SMART Web Messaging, the saved page carries
    scratchpad.update (the order with its PAMA rating) and ui.done for its origin."""
    ehr.messaging_origin = "http://127.0.0.1:8000"
    sign_in(browser, ehr)
    page = browser.get("/app/questions")
    saved = answer(browser, page, "save", conservative_care="yes", conservative_care_weeks="8")
    assert_page(saved, 200, "Saved. The order is re-rated with your answers.")
    found = re.search(r'<script type="application/json" id="messages">(.*?)</script>',
                      saved.text, flags=re.S)
    assert found, saved.text[:3000]
    said = json.loads(found.group(1))
    assert said["origin"] == "http://127.0.0.1:8000"
    update, done = said["messages"]
    assert update["messageType"] == "scratchpad.update" and done["messageType"] == "ui.done"
    assert update["messagingHandle"] == "handle-1"
    resource = update["payload"]["resource"]
    assert resource["id"] == ORDER_ID and resource["code"]["coding"][0]["display"]
    ratings = [c["code"] for e in resource["extension"] if "valueCodeableConcept" in e
               for c in e["valueCodeableConcept"]["coding"]]
    assert "appropriate" in ratings and resource["reasonCode"][0]["coding"][0]
    assert 'id="close"' not in saved.text
    sign_in(browser, ehr)  # answers that leave the order unrated: nothing to send, a Close
    page = browser.get("/app/questions")
    still = answer(browser, page, "save", conservative_care="")
    assert_page(still, 200, SAVED, "not rated yet")
    assert 'id="messages"' not in still.text and 'id="close"' in still.text


# ------------------------------------------------------------------ in-process


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def test_session_expiry_token_timeout_and_no_token_in_logs(
        tmp_path: Path, ehr: SmartTestServer, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    settings = dev_settings(data_dir=tmp_path, fhir_allowed_servers=ehr.base,
                            smart_session_seconds=60)
    logging.getLogger("cds_service").propagate = True
    app = create_app(settings, clock=clock)
    with caplog.at_level("DEBUG", logger="cds_service"), \
            TestClient(app, follow_redirects=False) as client:
        assert sign_in(client, ehr).status_code == 303
        assert client.get("/app/questions").status_code == 200
        clock.now += timedelta(seconds=61)
        assert_page(client.get("/app/questions"), 401, "Your session has ended")
        smart = client.app.state.smart  # type: ignore[attr-defined]
        smart.policy = dataclasses.replace(smart.policy, timeout_seconds=0.3)
        ehr.token_mode = "slow"
        assert_page(sign_in(client, ehr), 502, "token endpoint", "timeout")
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records
                       if r.name.startswith("cds_service"))
    assert ehr.tokens and not any(t in logged for t in ehr.tokens)
    assert PATIENT not in logged and "code=" not in logged


def test_launches_write_no_rows_and_expired_sessions_go_at_the_next_sign_in(
        tmp_path: Path, ehr: SmartTestServer) -> None:
    clock = Clock()
    url = f"sqlite+aiosqlite:///{tmp_path / 'cds.db'}"
    settings = dev_settings(data_dir=tmp_path, database_url=url, fhir_allowed_servers=ehr.base,
                            smart_session_seconds=60)

    def rows() -> int:
        with sqlite3.connect(tmp_path / "cds.db") as db:
            return int(db.execute("SELECT count(*) FROM app_session").fetchone()[0])

    with TestClient(create_app(settings, clock=clock), follow_redirects=False) as client:
        for _ in range(5):  # anonymous launches: no session row
            assert launch(client, ehr).status_code == 302
        assert rows() == 0
        assert sign_in(client, ehr).status_code == 303
        first = httpx.Cookies(client.cookies)
        client.cookies.clear()  # another browser
        assert sign_in(client, ehr).status_code == 303
        client.cookies = first
        assert sign_in(client, ehr).status_code == 303  # replaces this browser's first row
        assert rows() == 2
        clock.now += timedelta(seconds=61)
        assert sign_in(client, ehr).status_code == 303
    assert rows() == 1


@pytest.mark.parametrize("kind", BACKENDS)
def test_app_sessions_in_the_store(kind: str, tmp_path: Path) -> None:
    for url in database(kind, tmp_path):
        asyncio.run(_sessions(url))


async def _sessions(url: str) -> None:
    store = Store(url, "k")
    now = datetime.now(UTC)
    try:
        await store.upgrade()
        row = {"id": "a" * 64, "state": None, "verifier": None, "iss": "https://x/fhir",
               "token_endpoint": "https://x/token", "redirect_uri": "https://cds/app/callback",
               "granted": "sealed", "created_at": now,
               "expires_at": now + timedelta(minutes=15)}
        await store.replace_app_session(None, row)
        await store.replace_app_session(None, {**row, "id": "b" * 64,
                                               "expires_at": now - timedelta(seconds=1)})
        kept = await store.app_session("a" * 64, now)
        assert kept is not None and kept.granted == "sealed"
        assert await store.app_session("b" * 64, now) is None  # expired
        await store.replace_app_session("a" * 64, {**row, "id": "c" * 64})  # rotated
        assert await store.app_session("a" * 64, now) is None
        assert await store.app_session("c" * 64, now) is not None
        assert await store.drop_app_sessions(now) == 1
        assert await store.app_session("c" * 64, now) is not None
    finally:
        await store.dispose()


def test_production_session_secret_is_long_or_derived(tmp_path: Path) -> None:
    """A set secret must be long enough to sign with; unset, one is derived from the audit
    hash key (production requires that one), different for another audit key."""
    issuers = tmp_path / "issuers.json"
    issuers.write_text('[{"iss": "https://ehr.example", "jwks": {"keys": []}}]')
    ready = {"env": "production", "trusted_issuers_file": issuers, "audit_hash_key": "k" * 32,
             "public_base_url": "https://cds.example.org", "data_dir": tmp_path}
    with pytest.raises(ConfigurationError, match="at least 32 characters"):
        create_app(Settings(**ready, smart_session_secret="short"))
    create_app(Settings(**ready, smart_session_secret="s" * 32))
    derived = create_app(Settings(**ready, smart_session_secret=None)).state.smart.keys
    other = create_app(Settings(**{**ready, "audit_hash_key": "j" * 32})).state.smart.keys
    assert derived.cookie("same-id") != other.cookie("same-id")
    assert derived.session_id(derived.cookie("same-id")) == "same-id"
    off = create_app(Settings(**ready, smart_app_enabled=False))
    with TestClient(off) as client:
        assert client.get("/app/launch", params={"iss": "x", "launch": "y"}).status_code == 404


def test_cookie_signature_and_write_scopes() -> None:
    keys = SessionKeys("secret")
    session_id = keys.new_id()
    cookie = keys.cookie(session_id)
    assert keys.session_id(cookie) == session_id
    assert keys.session_id(cookie[:-1] + ("A" if cookie[-1] != "A" else "B")) is None
    assert SessionKeys("other").session_id(cookie) is None
    assert keys.open(session_id, keys.seal(session_id, b"grant")) == b"grant"
    assert keys.open(keys.new_id(), keys.seal(session_id, b"grant")) is None
    for scope in ("patient/QuestionnaireResponse.c", "patient/QuestionnaireResponse.crs",
                  "user/QuestionnaireResponse.cruds", "patient/QuestionnaireResponse.write",
                  "patient/*.write", "patient/*.*", "launch patient/*.cud"):
        assert can_write_responses(scope), scope
    for scope in ("patient/QuestionnaireResponse.rs", "patient/QuestionnaireResponse.read",
                  "patient/Observation.c", "launch openid", ""):
        assert not can_write_responses(scope), scope


def test_in_a_frame_the_cookie_is_probed_and_a_new_window_offered(
        browser: httpx.Client, ehr: SmartTestServer) -> None:
    """Item 7: launched in an EHR's frame, the app first sees whether the browser keeps its
    cookie there (SameSite=None; Secure; Partitioned); where it does not (this client keeps no
    Secure cookie over http), it says so and offers the same launch in a new window. Only the
    allow-listed EHRs may frame it (frame-ancestors)."""
    framed = {"Sec-Fetch-Dest": "iframe"}
    probe = browser.get("/app/launch", params={"iss": ehr.base, "launch": LAUNCH},
                        headers=framed)
    assert probe.status_code == 303
    assert probe.headers["location"].startswith("launch?") and "probe=1" in probe.headers[
        "location"]
    cookie = probe.headers["set-cookie"].lower()
    assert "cds_app_probe=" in cookie and "samesite=none" in cookie and "secure" in cookie \
        and "partitioned" in cookie
    refused = browser.get("/app/" + probe.headers["location"], headers=framed)
    assert_page(refused, 200, "The app cannot work inside this panel", "Open in a new window")
    link = re.search(r'href="(launch\?[^"]+)" target="_blank"', refused.text)
    assert link and parse_qs(urlsplit(html.unescape(link.group(1))).query) == {
        "iss": [ehr.base], "launch": [LAUNCH]}
    assert not ehr.authorize_requests  # the launch is not spent
    assert refused.headers["content-security-policy"].endswith(
        f"frame-ancestors 'self' {ehr.origin}")
    window = launch(browser, ehr)  # a window of its own: SameSite=Lax as before
    assert window.status_code == 302 and "samesite=lax" in window.headers["set-cookie"].lower()


def test_still_open_lists_only_what_a_question_settles(ehr: SmartTestServer) -> None:
    """Item 9: a fact no question settles (the age band, from the birth date) is not listed
    as "Still open" on the page: the clinician could do nothing about it there."""
    engine = Engine(load_knowledge(), load_templates(ROOT / "cards"), dev_settings())
    record = record_from_prefetch(ehr.data, PATIENT)
    rated = engine.rate_order(order(ORDER_ID, cpt="72148"), record, datetime.now(UTC))
    assert rated is not None
    open_ = dataclasses.replace(rated.decision, determinate=False, pama=None,
                                deciding=["elderly", "conservative_care"])
    view = rating_view(engine, dataclasses.replace(rated, decision=open_))
    assert view.still_open == [engine.templates.fact_label("conservative_care")]


def _asked(page: httpx.Response) -> list[str]:
    """The questions of a page, in the order shown (each radio group once)."""
    return list(dict.fromkeys(re.findall(r'<input type="radio" name="([a-z-]+)"', page.text)))


def test_at_most_four_questions_red_flags_first(browser: httpx.Client,
                                               ehr: SmartTestServer) -> None:
    """Item 9: a link naming many questions shows at most four, red flags first; a launch
    without a link asks those that decide the order's rating, never the whole questionnaire."""
    ehr.app_context = json.dumps({
        "order": f"ServiceRequest/{ORDER_ID}", "procedure": "mri-wo",
        "ask": ["pain-duration", "conservative-care", "intervention-candidate", "trauma",
                "cauda-equina", "cancer", "infection"]})
    sign_in(browser, ehr)
    page = browser.get("/app/questions")
    assert_page(page, 200, f"Order: {MRI}")
    asked = _asked(page)
    assert asked[:3] == ["cauda-equina", "cancer", "infection"], asked
    assert len(asked) <= 4, asked
    saved = answer(browser, page, "update", cauda_equina="no")  # the form keeps the same four
    assert _asked(saved) == asked
    ehr.app_context = None
    ehr.fhir_context = [{"reference": f"ServiceRequest/{ORDER_ID}"}]
    sign_in(browser, ehr)
    menu = browser.get("/app/questions")
    assert_page(menu, 200, f"Order: {MRI}")
    assert 1 <= len(_asked(menu)) <= 4, _asked(menu)
