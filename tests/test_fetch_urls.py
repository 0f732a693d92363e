"""The FHIR fetch never leaves the allow-listed base path, and odd values never become a 5xx.

A real FHIR server on loopback records every request: hostile patient ids and ``next`` links
must not reach a path outside the base, carry the bearer token there, or inject query parameters.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

from cds_service.app import create_app
from cds_service.record import SourceState, record_from_prefetch
from cds_service.record.fetch import FetchPolicy, FhirFetcher, same_server
from tests.builders import PATIENT, hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient, dev_settings
from tests.fhir_server import FhirTestServer

TOKEN = "urls-token-" + "3" * 12
AUTH = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300,
        "scope": "patient/*.read", "subject": "cds-service"}
UNFETCHABLE_IDS = ["../../../escaped", "..", ".", "x/../../escaped", "..\\..\\escaped", "a/b"]
HOSTILE_IDS = UNFETCHABLE_IDS + ["%2e%2e", "..%2f..%2fescaped", "x&_count=1000", "x?foo",
                                 "x#frag", "x y", "x;y=1", "pt-é", "..."]
CONTROL_IDS = ["x\ny", "x\r\ny", "x\ty", "x\x00y", "x\x7fy", "x\x85y", "\n"]
SEARCHES = ("/fhir/Condition", "/fhir/Procedure", "/fhir/ServiceRequest",
            "/fhir/MedicationRequest", "/fhir/QuestionnaireResponse", "/fhir/AllergyIntolerance")


@pytest.fixture
def fhir() -> Iterator[FhirTestServer]:
    with FhirTestServer(page_size=2) as server:
        yield server


def inside(path: str) -> bool:
    """The request path is the base ``/fhir`` or under it, even for a server that decodes
    percent-escapes before it resolves dot segments (or takes a backslash for a slash)."""
    segments = [unquote(s) for s in urlsplit(path).path.split("/")[1:]]
    return (segments[:1] == ["fhir"]
            and not any(s in (".", "..") or "/" in s or "\\" in s for s in segments))


def assert_never_left_the_base(fhir: FhirTestServer) -> None:
    outside = [p for p, _ in fhir.requests if not inside(p)]
    assert outside == []


def fetch(fhir: FhirTestServer, prefetch: dict[str, Any] | None,
          patient: str = PATIENT) -> tuple[Any, Any]:
    record = record_from_prefetch(prefetch, patient)
    policy = FetchPolicy(allowed=(fhir.base,), require_https=False, timeout_seconds=2.0,
                         budget_seconds=3.0, max_pages=5)

    async def go() -> Any:
        fetcher = FhirFetcher(policy)
        try:
            return await fetcher.complete(record, fhir.base, TOKEN)
        finally:
            await fetcher.aclose()

    return record, asyncio.run(go())


# ------------------------------------------------------------------ patient ids


@pytest.mark.parametrize("pid", HOSTILE_IDS)
def test_a_patient_id_stays_one_path_segment_or_one_query_value(fhir: FhirTestServer,
                                                                pid: str) -> None:
    _, report = fetch(fhir, None, patient=pid)
    assert_never_left_the_base(fhir)
    for path, _ in fhir.requests:
        parts = urlsplit(path)
        if parts.path.startswith("/fhir/Patient"):
            assert parts.path == f"/fhir/Patient/{quote(pid, safe='')}" and not parts.query
        else:
            assert parts.path in SEARCHES
            # the id is the one patient value: it adds no parameter and cannot change _count
            assert parse_qs(parts.query, keep_blank_values=True) == {
                "patient": [pid], "_count": [str(FetchPolicy().page_size)]}
    if pid in UNFETCHABLE_IDS:
        assert fhir.requests == []
        assert set(report.outcomes.values()) == {"bad-patient-id"}
    else:
        assert len(fhir.requests) == len(SEARCHES) + 1  # and Patient/{id}


def test_the_server_reads_back_the_patient_id_it_was_given(fhir: FhirTestServer) -> None:
    pid = "x&_count=1000?y#z"
    data = seed_prefetch(FIXTURE_NOW)
    data["patient"]["id"] = pid
    for key in ("conditions", "procedures"):
        for e in data[key]["entry"]:
            e["resource"]["subject"]["reference"] = f"Patient/{pid}"
    fhir.data[pid] = data
    record, report = fetch(fhir, None, patient=pid)
    assert report.outcomes["patient"] == "fetched"
    assert [r["id"] for r in record.conditions.resources] == ["c-lbp", "c-htn"]


# ------------------------------------------------------------------ next links


def escaping_links(base: str) -> list[str]:
    origin = base.removesuffix("/fhir")
    port = urlsplit(base).port
    return [
        f"{base}/../escaped",
        f"{base}/../../../escaped?patient={PATIENT}",
        f"{base}/Condition/../../escaped",
        f"{base}/%2e%2e/escaped",
        f"{base}/%2E%2E/%2E%2E/escaped",
        f"{base}/..%2fescaped",
        f"{base}/..%5cescaped",
        f"{base}\\..\\escaped",
        f"{base}x/Condition?patient={PATIENT}&page=2",
        f"{origin}/escaped",
        f"http://localhost:{port}/fhir/Condition?patient={PATIENT}&page=2",
        f"https://127.0.0.1:{port}/fhir/Condition?patient={PATIENT}&page=2",
        f"http://user:pw@127.0.0.1:{port}/fhir/Condition?patient={PATIENT}&page=2",
        f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/fhir/Condition?page=2",
        f"Condition?patient={PATIENT}&page=2",
        "//127.0.0.1/fhir/Condition",
    ]


def test_next_links_outside_the_base_are_not_followed(fhir: FhirTestServer) -> None:
    for link in escaping_links(fhir.base):
        prefetch = seed_prefetch(FIXTURE_NOW)
        prefetch["conditions"]["link"] = [{"relation": "next", "url": link}]
        fhir.requests.clear()
        record, report = fetch(fhir, prefetch)
        assert fhir.requests == [], link  # the token went nowhere
        assert report.outcomes == {"conditions": "foreign-next-link"}, link
        assert record.conditions.state is SourceState.PARTIAL
        assert not same_server(link, fhir.base), link


def test_next_links_of_a_fetched_page_outside_the_base_are_not_followed(
        fhir: FhirTestServer) -> None:
    fhir.data[PATIENT] = seed_prefetch(FIXTURE_NOW)
    prefetch = copy.deepcopy(fhir.data[PATIENT])
    del prefetch["conditions"]
    for link in escaping_links(fhir.base):
        fhir.next_links["Condition"] = link
        fhir.requests.clear()
        record, report = fetch(fhir, prefetch)
        assert [p for p, _ in fhir.requests] == [
            f"/fhir/Condition?patient={PATIENT}&_count={FetchPolicy().page_size}"], link
        assert report.outcomes == {"conditions": "foreign-next-link"}, link
        assert record.conditions.state is SourceState.PARTIAL


def test_next_links_inside_the_base_are_followed_after_normalisation(
        fhir: FhirTestServer) -> None:
    fhir.data[PATIENT] = seed_prefetch(FIXTURE_NOW)
    for link, seen in [
        (f"{fhir.base}/Condition/../Condition?patient={PATIENT}&page=2",
         f"/fhir/Condition?patient={PATIENT}&page=2"),
        (f"{fhir.base}/./Condition?patient={PATIENT}&page=2",
         f"/fhir/Condition?patient={PATIENT}&page=2"),
        (f"{fhir.base.replace('http://', 'HTTP://')}/Condition?patient={PATIENT}&page=2",
         f"/fhir/Condition?patient={PATIENT}&page=2"),
        (f"{fhir.base}?_getpages=abc&_getpagesoffset=2", "/fhir?_getpages=abc&_getpagesoffset=2"),
    ]:
        prefetch = seed_prefetch(FIXTURE_NOW)
        prefetch["conditions"]["link"] = [{"relation": "next", "url": link}]
        fhir.requests.clear()
        fetch(fhir, prefetch)
        assert fhir.requests == [(seen, f"Bearer {TOKEN}")], link


# ------------------------------------------------------------------ odd values over HTTP


@pytest.fixture
def api(fhir: FhirTestServer) -> Iterator[ValidatingClient]:
    settings = dev_settings(fhir_allowed_servers=fhir.base, fhir_budget_seconds=2.0,
                            fhir_timeout_seconds=1.0)
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
        yield c


@pytest.mark.parametrize("pid", CONTROL_IDS + HOSTILE_IDS)
def test_odd_patient_ids_never_make_a_5xx(api: ValidatingClient, fhir: FhirTestServer,
                                          pid: str) -> None:
    body = hook_request(order(cpt="72148", patient=pid), patient=pid)
    body["fhirServer"], body["fhirAuthorization"] = fhir.base, AUTH
    r = api.post(SELECT, json=body)
    assert r.status_code in (200, 412)
    assert_never_left_the_base(fhir)
    if pid in CONTROL_IDS:
        assert fhir.requests == []  # no fetch for a patient id no server can hold


@pytest.mark.parametrize("link", ["{base}/Condition?page=2\n", "{base}/Condition\r\nX: y",
                                  "{base}/Cond\x00ition", "{base}/Condition\x7f", "\n",
                                  "{base}/Condition?page=\x85", "http://[::1/fhir", "http://:0",
                                  "{base}/Condition?page=2 HTTP/1.1"])
def test_odd_next_links_never_make_a_5xx(api: ValidatingClient, fhir: FhirTestServer,
                                         link: str) -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    prefetch["conditions"]["link"] = [{"relation": "next", "url": link.format(base=fhir.base)}]
    body = hook_request(order(cpt="72148"), prefetch=prefetch)
    body["fhirServer"], body["fhirAuthorization"] = fhir.base, AUTH
    r = api.post(SELECT, json=body)
    assert r.status_code in (200, 412)
    assert_never_left_the_base(fhir)


@pytest.mark.parametrize("link", ["{base}/Condition?page=2\n", "{base}/Cond\x00ition",
                                  "http://[::1/fhir"])
def test_odd_next_links_leave_the_source_partial(fhir: FhirTestServer, link: str) -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    prefetch["conditions"]["link"] = [{"relation": "next", "url": link.format(base=fhir.base)}]
    record, report = fetch(fhir, prefetch)
    assert report.outcomes == {"conditions": "bad-next-link"}
    assert record.conditions.state is SourceState.PARTIAL
    assert fhir.requests == []
