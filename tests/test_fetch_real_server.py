"""The FHIR fetch against a server as slow as real ones, over a socket, with the default settings.

The tests' FHIR server (tests/fhir_server.py) answers each request after 100 ms and pages by 20
(HAPI's default page size): ``hapi`` honours ``_count`` up to 200 as HAPI does, ``fixed`` ignores
it (a server with its own page size, the worst case). The record is the seed patient's with a
hundred or a few hundred other resources; the patient's own resources are served last, so a
fetch cut short shows as a 412 or as an answer other than the one with the full prefetch.
How long the fetch takes is measured in bench/fetch_latency.py, not here.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from cds_service.app import create_app
from cds_service.record import SourceState, record_from_prefetch
from cds_service.record.fetch import FetchPolicy, FhirFetcher
from cds_service.settings import Settings
from tests import builders
from tests.builders import PATIENT, hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient, dev_settings
from tests.fhir_server import FhirTestServer, peak_overlap
from tests.test_fhir_integration import comparable
from tests.test_sandbox_fixes import fetch_outcomes

TOKEN = "slow-server-token-" + "4" * 12
AUTH = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300,
        "scope": "patient/*.read", "subject": "cds-service"}
LATENCY = 0.1  # seconds per answer, a real server's query and network
SERVERS = {"hapi": 200, "fixed": None}  # the largest _count honoured; None: ignored
RECORDS = {"seed-100": (40, 60, 4), "few-hundred": (160, 180, 40)}  # conditions, procedures, SRs


def large_record(conditions: int, procedures: int, requests: int) -> dict[str, Any]:
    return builders.large_record(FIXTURE_NOW, conditions, procedures, requests)


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest) -> Iterator[FhirTestServer]:
    with FhirTestServer(20, latency=LATENCY, max_count=SERVERS[request.param]) as fhir:
        yield fhir


def fetched_body(body: dict[str, Any], fhir: FhirTestServer) -> dict[str, Any]:
    """The same call without prefetch: the service reads the record from ``fhir``."""
    fhir.data[PATIENT] = copy.deepcopy(body["prefetch"])
    bare = {k: v for k, v in copy.deepcopy(body).items() if k != "prefetch"}
    bare["fhirServer"], bare["fhirAuthorization"] = fhir.base, AUTH
    return bare


@pytest.mark.parametrize("record", sorted(RECORDS))
def test_no_412_and_the_same_answer_when_a_slow_server_pages_the_record(
        server: FhirTestServer, record: str) -> None:
    body = hook_request(order(cpt="72148"), prefetch=large_record(*RECORDS[record]))
    settings = dev_settings(fhir_allowed_servers=server.base)  # the default budget and pages
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
        expected = c.post(SELECT, json=body)
        assert expected.status_code == 200, expected.text
        for _ in range(3):
            r = c.post(SELECT, json=fetched_body(body, server))
            assert r.status_code == 200, r.text  # never a 412: the server answers
            assert comparable(r.json()) == comparable(expected.json())
        # the patient and five searches; this server has no QuestionnaireResponse endpoint
        # (the clinician's answers are optional: a 404 changes nothing)
        assert fetch_outcomes(c) == {"fetched": 3.0 * 6, "http-404": 3.0}
    searches = [urlsplit(p) for p, _ in server.requests if "/Patient/" not in p]
    assert all(parse_qs(s.query)["_count"] == ["200"] for s in searches
               if "page=" not in s.query)  # every search asked for pages of 200
    if server.max_count:  # a server that honours _count: one page per search
        assert len(server.requests) == 3 * 7


def test_the_next_pages_of_different_searches_are_in_flight_together() -> None:
    """A server that pages by 20 whatever it is asked: the searches' chains of pages run side by
    side (sequential searches would never have two requests in the server at once)."""
    record = record_from_prefetch(None, PATIENT)
    with FhirTestServer(20, latency=LATENCY) as fhir:
        fhir.data[PATIENT] = large_record(*RECORDS["few-hundred"])
        report = fetch(fhir, record, FetchPolicy(allowed=(fhir.base,), require_https=False))
    assert report.outcomes.pop("questionnaireresponses") == "http-404"  # no such endpoint
    assert set(report.outcomes.values()) == {"fetched"}
    assert len(record.conditions.resources) == 160 and len(record.procedures.resources) == 180
    first = [s for s in fhir.served if "page=" not in s.path]
    following = [s for s in fhir.served if "page=" in s.path]
    assert len(first) == 7 and len(following) == 7 + 8 + 1
    assert peak_overlap(first) >= 2
    assert peak_overlap(following) >= 2


def fetch(fhir: FhirTestServer, record: Any, policy: FetchPolicy) -> Any:
    async def go() -> Any:
        fetcher = FhirFetcher(policy)
        try:
            return await fetcher.complete(record, fhir.base, TOKEN)
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize(("page_size", "count"), [(200, ["200"]), (50, ["50"]), (0, None)])
def test_the_searches_ask_for_the_page_size_set(page_size: int, count: list[str] | None) -> None:
    with FhirTestServer(20, max_count=200) as fhir:
        fhir.data[PATIENT] = large_record(*RECORDS["seed-100"])
        record = record_from_prefetch(None, PATIENT)
        report = fetch(fhir, record, FetchPolicy(allowed=(fhir.base,), require_https=False,
                                                 page_size=page_size))
    assert report.outcomes.pop("questionnaireresponses") == "http-404"  # no such endpoint
    assert set(report.outcomes.values()) == {"fetched"}
    assert len(record.procedures.resources) == 60
    for path, _ in fhir.requests:
        query = parse_qs(urlsplit(path).query)
        if path.startswith("/fhir/Patient/"):
            assert query == {}  # a read takes no _count
        elif "page" not in query:
            assert query.get("_count") == count
    pages = len(fhir.requests) - 1
    assert pages == {200: 6, 50: 6 + 1, 0: 6 + 1 + 2}[page_size]


def test_the_page_cap_holds_with_the_defaults() -> None:
    """A search longer than the cap (ten pages of 20 from a server that ignores _count): the
    source stays partial after ten pages, and the hook never answers 5xx."""
    prefetch = seed_prefetch(FIXTURE_NOW)
    with FhirTestServer(20) as fhir:
        fhir.data[PATIENT] = large_record(2, 250, 0)
        del prefetch["procedures"]
        record = record_from_prefetch(prefetch, PATIENT)
        report = fetch(fhir, record, FetchPolicy(allowed=(fhir.base,), require_https=False))
        assert report.outcomes == {"procedures": "page-cap"}
        assert record.procedures.state is SourceState.PARTIAL
        assert len(record.procedures.resources) == 10 * 20
        assert len(fhir.requests) == 10
        body = hook_request(order(cpt="72148"), prefetch=prefetch)
        body["fhirServer"], body["fhirAuthorization"] = fhir.base, AUTH
        settings = dev_settings(fhir_allowed_servers=fhir.base)
        with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
            assert c.post(SELECT, json=body).status_code in (200, 412)


def test_the_fetch_policy_defaults_are_the_settings_defaults() -> None:
    fields, policy = Settings.model_fields, FetchPolicy()
    assert policy.timeout_seconds == fields["fhir_timeout_seconds"].default
    assert policy.budget_seconds == fields["fhir_budget_seconds"].default
    assert policy.max_pages == fields["fhir_max_pages"].default
    assert policy.page_size == fields["fhir_page_size"].default
    assert policy.max_response_bytes == fields["fhir_max_response_bytes"].default


def test_the_hook_fetch_uses_the_page_size_setting() -> None:
    app = create_app(dev_settings(fhir_page_size=75))
    assert app.state.fetcher.policy.page_size == 75
