"""FHIR fetch of missing prefetch: faults (respx), SSRF guard, pagination, the 412 rule."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
import respx

from cds_service.record import SourceState, record_from_prefetch
from cds_service.record.fetch import FetchPolicy, FhirFetcher, server_allowed
from tests.builders import PATIENT, bundle, condition, day, hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, SELECT

BASE = "https://ehr.example.org/fhir"
TOKEN = "tok-" + "9" * 20
POLICY = FetchPolicy(allowed=(BASE,), require_https=True, timeout_seconds=0.5,
                     budget_seconds=1.0, max_pages=3)


async def resolve(host: str) -> list[str]:
    """ehr.example.org does not resolve here, and a name that does not resolve is not fetched.
    (Loopback, in case: respx answers every request before a connection is made.)"""
    return ["127.0.0.1"]


def fetch(prefetch: dict[str, Any] | None, server: str = BASE, policy: FetchPolicy = POLICY,
          token: str | None = TOKEN) -> tuple[Any, Any]:
    record = record_from_prefetch(prefetch, PATIENT)

    async def go() -> Any:
        fetcher = FhirFetcher(policy, resolver=resolve)
        try:
            return await fetcher.complete(record, server, token)
        finally:
            await fetcher.aclose()

    return record, asyncio.run(go())


def mock_all(router: respx.Router, prefetch: dict[str, Any]) -> None:
    router.get(f"{BASE}/Patient/{PATIENT}").respond(200, json=prefetch["patient"])
    router.get(f"{BASE}/Condition", params={"patient": PATIENT}).respond(
        200, json=prefetch["conditions"])
    router.get(f"{BASE}/Procedure", params={"patient": PATIENT}).respond(
        200, json=prefetch["procedures"])
    router.get(f"{BASE}/ServiceRequest", params={"patient": PATIENT}).respond(
        200, json=prefetch["servicerequests"])
    router.get(f"{BASE}/MedicationRequest", params={"patient": PATIENT}).respond(
        200, json=prefetch["medications"])
    router.get(f"{BASE}/QuestionnaireResponse", params={"patient": PATIENT}).respond(
        200, json=prefetch["questionnaireresponses"])
    router.get(f"{BASE}/AllergyIntolerance", params={"patient": PATIENT}).respond(
        200, json=prefetch["allergies"])


def test_fetches_every_missing_key_with_the_bearer_token() -> None:
    full = seed_prefetch(FIXTURE_NOW)
    with respx.mock(assert_all_called=True) as router:
        mock_all(router, full)
        record, report = fetch(None)
        for call in router.calls:
            assert call.request.headers["authorization"] == f"Bearer {TOKEN}"
    assert report.outcomes == {k: "fetched" for k in full}
    assert record.missing_keys() == []
    assert [r["id"] for r in record.conditions.resources] == ["c-lbp", "c-htn"]


def test_only_missing_keys_are_fetched() -> None:
    full = seed_prefetch(FIXTURE_NOW)
    partial = dict(full)
    del partial["procedures"]
    with respx.mock(assert_all_called=False) as router:
        mock_all(router, full)
        record, report = fetch(partial)
        assert [c.request.url.path for c in router.calls] == ["/fhir/Procedure"]
    assert report.outcomes == {"procedures": "fetched"}


@pytest.mark.parametrize(("response", "outcome"), [
    (httpx.Response(401), "http-401"),
    (httpx.Response(403), "http-403"),
    (httpx.Response(404), "http-404"),
    (httpx.Response(429), "http-429"),
    (httpx.Response(500), "http-500"),
    (httpx.Response(200, content=b"{not json"), "malformed-json"),
    (httpx.Response(200, json={"resourceType": "Patient", "id": PATIENT}), "wrong-content"),
    (httpx.Response(302, headers={"Location": "http://169.254.169.254/latest"}), "http-302"),
    (httpx.ConnectError("refused"), "connection-error"),
    (httpx.ReadTimeout("slow"), "timeout"),
])
def test_each_fault_leaves_the_source_missing(response: Any, outcome: str) -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    del prefetch["conditions"]
    with respx.mock() as router:
        route = router.get(f"{BASE}/Condition")
        if isinstance(response, Exception):
            route.side_effect = response
        else:
            route.return_value = response
        record, report = fetch(prefetch)
        assert len(router.calls) == 1  # no redirect followed, no retry for these
    assert report.outcomes == {"conditions": outcome}
    assert record.conditions.state is SourceState.MISSING


def test_one_retry_on_503() -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    full = prefetch.pop("conditions")
    with respx.mock() as router:
        router.get(f"{BASE}/Condition").side_effect = [httpx.Response(503),
                                                       httpx.Response(200, json=full)]
        record, report = fetch(prefetch)
        assert len(router.calls) == 2
    assert report.outcomes == {"conditions": "fetched"}
    with respx.mock() as router:
        router.get(f"{BASE}/Condition").respond(502)
        record, report = fetch(prefetch)
        assert len(router.calls) == 2
    assert report.outcomes == {"conditions": "http-502"}


def paged(entries: list[dict[str, Any]], nxt: str | None) -> dict[str, Any]:
    b = bundle(*entries)
    if nxt:
        b["link"] = [{"relation": "next", "url": nxt}]
    return b


def test_pagination_of_a_prefetch_bundle_is_followed() -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    c1, c2 = (e["resource"] for e in prefetch["conditions"]["entry"])
    prefetch["conditions"] = paged([c1], f"{BASE}/Condition?patient={PATIENT}&page=2")
    with respx.mock() as router:
        router.get(f"{BASE}/Condition", params={"page": "2"}).respond(200, json=paged(
            [c2, condition("c3", "M81.0", day(FIXTURE_NOW, 10))], None))
        record, report = fetch(prefetch)
    assert report.outcomes == {"conditions": "fetched"}
    assert [r["id"] for r in record.conditions.resources] == ["c-lbp", "c-htn", "c3"]
    assert record.conditions.state is SourceState.COMPLETE


def test_page_cap_leaves_the_source_partial() -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    del prefetch["conditions"]
    with respx.mock() as router:
        router.get(f"{BASE}/Condition").mock(side_effect=lambda req: httpx.Response(
            200, json=paged([condition(f"c{len(router.calls)}", "I10", None)],
                            f"{BASE}/Condition?patient={PATIENT}&page={len(router.calls) + 1}")))
        record, report = fetch(prefetch)
        assert len(router.calls) == 3
    assert report.outcomes == {"conditions": "page-cap"}
    assert record.conditions.state is SourceState.PARTIAL
    assert len(record.conditions.resources) == 3


def test_next_link_to_another_server_is_not_followed() -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    prefetch["conditions"]["link"] = [{"relation": "next",
                                       "url": "https://evil.example.com/fhir/Condition?p=2"}]
    with respx.mock() as router:
        record, report = fetch(prefetch)
        assert len(router.calls) == 0  # the token never goes to evil.example.com
    assert report.outcomes == {"conditions": "foreign-next-link"}
    assert record.conditions.state is SourceState.PARTIAL


@pytest.mark.parametrize("server", [
    "https://evil.example.com/fhir",          # not allow-listed
    "http://ehr.example.org/fhir",            # https required outside development
    "https://ehr.example.org/fhir/../admin",  # not the same base
])
def test_servers_outside_the_allow_list_are_never_called(server: str) -> None:
    with respx.mock() as router:
        record, report = fetch(None, server=server)
        assert len(router.calls) == 0
    assert set(report.outcomes.values()) == {"not-allowed"}


def test_link_local_and_metadata_addresses_are_refused_even_if_allow_listed() -> None:
    for server in ("http://169.254.169.254/fhir", "http://[fe80::1]/fhir",
                   "http://metadata.google.internal/fhir"):
        policy = FetchPolicy(allowed=FetchPolicy.parse_allowed(server), require_https=False)
        with respx.mock() as router:
            _, report = fetch(None, server=server, policy=policy)
            assert len(router.calls) == 0
        assert set(report.outcomes.values()) == {"unsafe-address"}, server


def test_no_fetch_without_a_token_or_server() -> None:
    with respx.mock() as router:
        _, report = fetch(None, token=None)  # a server, no token, policy without_token off
        assert len(router.calls) == 0
    assert set(report.outcomes.values()) == {"no-token"}
    with respx.mock() as router:
        _, report = fetch(None, server=None)
        assert len(router.calls) == 0
    assert set(report.outcomes.values()) == {"no-server"}


def test_allow_list_normalisation() -> None:
    policy = FetchPolicy(allowed=FetchPolicy.parse_allowed(
        " https://EHR.example.org:443/fhir/ , http://127.0.0.1:8099"), require_https=False)
    assert server_allowed("https://ehr.example.org/fhir", policy)
    assert server_allowed("http://127.0.0.1:8099/", policy)
    assert not server_allowed("http://127.0.0.1:8098", policy)
    assert not server_allowed("http://localhost:8099", policy)


def test_token_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("cds_service").propagate = True
    with caplog.at_level("DEBUG"), respx.mock() as router:
        router.get(url__startswith=BASE).respond(500)
        fetch(None)
        fetch(None, server="https://evil.example.com/fhir")
    assert caplog.records
    assert all(TOKEN not in r.getMessage() and TOKEN not in str(r.__dict__)
               for r in caplog.records)


# ------------------------------------------------------------------ the 412 rule, over HTTP


def test_412_when_undecidable_and_nothing_can_be_fetched(client: Any) -> None:
    r = client.post(SELECT, json=hook_request(order(cpt="72148")))
    assert r.status_code == 412
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert set(body["issue"][0]["expression"]) == {
        "prefetch.patient", "prefetch.conditions", "prefetch.procedures",
        "prefetch.servicerequests", "prefetch.medications"}


def test_no_412_when_the_order_can_be_rated_anyway(client: Any) -> None:
    r = client.post(SELECT, json=hook_request(order(cpt="72149")))
    assert r.status_code == 200
    assert r.json()["cards"][0]["indicator"] == "warning"


def test_no_412_for_orders_that_are_not_imaging(client: Any) -> None:
    r = client.post(SELECT, json=hook_request(order(cpt="36415")))
    assert r.status_code == 200 and r.json() == {"cards": []}


def test_412_names_only_the_missing_key(client: Any) -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    prefetch["procedures"] = {"resourceType": "OperationOutcome", "issue": []}
    r = client.post(SELECT, json=hook_request(order(cpt="72148"), prefetch=prefetch))
    assert r.status_code == 412
    assert r.json()["issue"][0]["expression"] == ["prefetch.procedures"]
