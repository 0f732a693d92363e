"""Issue 12, findings 1-3, at the API: displays on every coding the service writes, a reason on
every suggested order, and fetching from an open (allow-listed) FHIR server without a token."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest

from cds_service.app import create_app
from tests.builders import hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, FIXTURES, SELECT, SIGN, ValidatingClient, dev_settings
from tests.fhir_server import FhirTestServer

CASES = json.loads((FIXTURES / "expected.json").read_text())["cases"]


def codings(value: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every Coding in a response: a dict with both system and code."""
    if isinstance(value, dict):
        if "system" in value and "code" in value:
            yield path, value
        for k, v in value.items():
            yield from codings(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from codings(v, f"{path}[{i}]")


@pytest.mark.parametrize("case", [c for c in CASES if c["cards"] or c["orders"]],
                         ids=lambda c: c["name"])
def test_every_coding_the_service_writes_has_a_display(client: ValidatingClient,
                                                       case: dict[str, Any]) -> None:
    body = json.loads((FIXTURES / case["file"]).read_text())
    r = client.post(SELECT if body["hook"] == "order-select" else SIGN, json=body)
    if r.status_code != 200:
        return
    data = r.json()
    written: list[Any] = [card.get("suggestions", []) for card in data["cards"]]
    written += [card.get("overrideReasons", []) for card in data["cards"]]
    for action in data.get("systemActions", []):  # the rating extensions the service adds
        written += [e for e in action["resource"].get("extension", [])
                    if e["url"].startswith("http://fhir.org/argonaut/Extension/pama")]
    draft_codes = {(c["system"], c["code"]) for _, c in codings(
        body["context"]["draftOrders"])}
    for path, coding in codings(written):
        if (coding["system"], coding["code"]) in draft_codes and ".reasonCode" in path:
            continue  # the draft's own reasons are passed on as the EHR sent them
        assert coding.get("display"), f"{case['name']}: {path} {coding}"


def test_the_first_coding_of_a_suggested_order_has_a_display(client: ValidatingClient) -> None:
    r = client.post(SELECT, json=hook_request(order(cpt="72149"),
                                              prefetch=seed_prefetch(FIXTURE_NOW)))
    resource = r.json()["cards"][0]["suggestions"][0]["actions"][0]["resource"]
    first = resource["code"]["coding"][0]
    assert first["code"] == "72148" and first["display"] == "MRI lumbar spine without IV contrast"


@pytest.mark.parametrize("reason", ["absent", "empty"])
def test_a_suggested_order_always_carries_a_reason(client: ValidatingClient,
                                                   reason: str) -> None:
    draft = order(cpt="72149", reason=None)
    if reason == "empty":
        draft["reasonCode"] = []
    r = client.post(SELECT, json=hook_request(draft, prefetch=seed_prefetch(FIXTURE_NOW)))
    card = r.json()["cards"][0]
    resource = card["suggestions"][0]["actions"][0]["resource"]
    reasons = resource["reasonCode"]
    assert reasons and reasons[0]["coding"][0]["code"] == "M54.16"  # the LBP on the record
    assert reasons[0]["coding"][0]["display"]


def test_a_suggested_order_keeps_the_drafts_reasons(client: ValidatingClient) -> None:
    draft = order(cpt="72149", reason="M54.50")
    r = client.post(SELECT, json=hook_request(draft, prefetch=seed_prefetch(FIXTURE_NOW)))
    resource = r.json()["cards"][0]["suggestions"][0]["actions"][0]["resource"]
    assert resource["reasonCode"] == draft["reasonCode"]


@pytest.fixture(scope="module")
def fhir() -> Iterator[FhirTestServer]:
    with FhirTestServer(page_size=50) as server:
        yield server


def without_procedures(fhir: FhirTestServer) -> dict[str, Any]:
    """The sandbox's call when its Procedure query failed: no key, fhirServer, no token."""
    prefetch = seed_prefetch(FIXTURE_NOW)
    fhir.data["pt-seed"] = copy.deepcopy(prefetch)
    del prefetch["procedures"]
    body = hook_request(order(cpt="72148"), prefetch=prefetch)
    body["fhirServer"] = fhir.base
    return body


def fetch_outcomes(client: ValidatingClient) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("cds_fhir_fetch_total{"):
            out[line.split('outcome="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def test_an_open_allow_listed_server_is_read_without_a_token(fhir: FhirTestServer) -> None:
    settings = dev_settings(fhir_allowed_servers=fhir.base, fhir_budget_seconds=2.0,
                            fhir_timeout_seconds=1.0)
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
        fhir.requests.clear()
        r = c.post(SELECT, json=without_procedures(fhir))
        assert r.status_code == 200, r.text  # rated, not 412
        assert r.json()["systemActions"]
        assert [p for p, _ in fhir.requests] == ["/fhir/Procedure?patient=pt-seed&_count=200"]
        assert all(auth is None for _, auth in fhir.requests)  # no token was invented
        assert fetch_outcomes(c) == {"fetched": 1.0}


def test_absent_answers_are_fetched_alongside_and_their_failure_changes_nothing(
        fhir: FhirTestServer) -> None:
    """An EHR that does not prefetch the optional answers: they are read with what is missing;
    this server has no QuestionnaireResponse endpoint (404), and the order is rated anyway."""
    settings = dev_settings(fhir_allowed_servers=fhir.base, fhir_budget_seconds=2.0,
                            fhir_timeout_seconds=1.0)
    body = without_procedures(fhir)
    del body["prefetch"]["questionnaireresponses"]
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
        fhir.requests.clear()
        r = c.post(SELECT, json=body)
        assert r.status_code == 200, r.text
        assert sorted(p for p, _ in fhir.requests) == [
            "/fhir/Procedure?patient=pt-seed&_count=200",
            "/fhir/QuestionnaireResponse?patient=pt-seed&_count=200"]
        assert fetch_outcomes(c) == {"fetched": 1.0, "http-404": 1.0}


def test_without_the_setting_no_fetch_and_the_outcome_says_no_token(
        fhir: FhirTestServer) -> None:
    settings = dev_settings(fhir_allowed_servers=fhir.base, fhir_fetch_without_token=False)
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
        fhir.requests.clear()
        r = c.post(SELECT, json=without_procedures(fhir))
        assert r.status_code == 412
        assert fhir.requests == []
        assert fetch_outcomes(c) == {"no-token": 1.0}  # not "no-server": one was given


def test_no_fetch_from_a_server_that_is_not_allow_listed(fhir: FhirTestServer) -> None:
    with ValidatingClient(create_app(dev_settings(), clock=lambda: FIXTURE_NOW)) as c:
        fhir.requests.clear()
        r = c.post(SELECT, json=without_procedures(fhir))
        assert r.status_code == 412 and fhir.requests == []
        assert fetch_outcomes(c) == {"not-allowed": 1.0}
