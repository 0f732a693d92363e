"""Issue 11, findings 1, 2 and 4: bounded cost per request, bounded caches, odd FHIR values.

- Order-sign cost is linear in the drafts (each draft is screened once, not once per order), and
  a request over the limits (drafts, nesting, codings, code length) gets 413 with an
  OperationOutcome naming the limit, never a hang.
- Long codes are never admitted to the code-lookup cache.
- Dates outside what the service (or Python) can compute with, and fields of the wrong type,
  make the fact unknown: the call answers.
- A heavy call is evaluated off the event loop: /healthz answers while it runs (real socket).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cds_service.clinical.scan as scan_module
from cds_service.app import create_app
from cds_service.clinical.model import Tri
from cds_service.knowledge import load_knowledge
from cds_service.protocol import HookRequest
from cds_service.record import record_from_prefetch
from tests.builders import PATIENT, condition, day, hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, FIXTURES, SELECT, SIGN, ValidatingClient, dev_settings
from tests.served import served as serve

SEED = json.loads((FIXTURES / "requests" / "v3-seed-mri-w.json").read_text())


@pytest.fixture(scope="module")
def api() -> Iterator[ValidatingClient]:
    with ValidatingClient(create_app(dev_settings(), clock=lambda: FIXTURE_NOW)) as c:
        yield c


def outcome_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"][0]


# ------------------------------------------------------------------ 1: linear cost, limits


@pytest.mark.sources
def test_order_sign_screens_each_draft_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = scan_module._order_like_hit

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(scan_module, "_order_like_hit", counted)
    with ValidatingClient(create_app(dev_settings(), clock=lambda: FIXTURE_NOW)) as c:
        for n in (50, 200):
            calls["n"] = 0
            drafts = [order(f"o{i}", cpt=("72149", "72148", "72100")[i % 3]) for i in range(n)]
            r = c.post(SIGN, json=hook_request(*drafts, hook="order-sign",
                                               prefetch=seed_prefetch(FIXTURE_NOW)))
            assert r.status_code == 200
            assert len(r.json()["systemActions"]) == n
            # the record's resources plus each draft once: not n x n
            assert calls["n"] <= n + 20, (n, calls["n"])


def test_too_many_drafts_is_413_naming_the_limit(api: ValidatingClient) -> None:
    drafts = [order(f"o{i}", cpt="72148") for i in range(201)]
    started = time.monotonic()
    r = api.post(SIGN, json=hook_request(*drafts, hook="order-sign"))
    assert r.status_code == 413
    problem = outcome_of(r)
    assert problem["code"] == "too-costly" and "201 draft orders" in problem["diagnostics"]
    assert problem["expression"] == ["context.draftOrders.entry"]
    assert time.monotonic() - started < 5  # refused up front, not evaluated


def nested(depth: int) -> dict[str, Any]:
    draft = order(cpt="72148")
    node = draft
    for _ in range(depth):
        node["extension"] = [{"url": "urn:x", "extension": []}]
        node = node["extension"][0]
    return draft


@pytest.mark.parametrize("depth", [40, 250])
def test_deeply_nested_draft_is_413_not_500(api: ValidatingClient, depth: int) -> None:
    r = api.post(SELECT, json=hook_request(nested(depth), prefetch=seed_prefetch(FIXTURE_NOW)))
    assert r.status_code == 413
    assert "nested deeper than 64" in outcome_of(r)["diagnostics"]


def test_moderately_nested_draft_is_rated(api: ValidatingClient) -> None:
    r = api.post(SELECT, json=hook_request(nested(10), prefetch=seed_prefetch(FIXTURE_NOW)))
    assert r.status_code == 200 and r.json()["systemActions"]


@pytest.mark.parametrize("where", ["draft", "prefetch"])
def test_too_many_codings_or_too_long_a_code_is_413(api: ValidatingClient, where: str) -> None:
    many = [{"system": "urn:x", "code": str(i)} for i in range(65)]
    long = [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M" * 100_000}]
    for codings, words in ((many, "codings in one concept"), (long, "longer than 512")):
        draft = order(cpt="72148")
        prefetch = seed_prefetch(FIXTURE_NOW)
        if where == "draft":
            draft["code"]["coding"] = draft["code"]["coding"] + codings
        else:
            prefetch["conditions"]["entry"][0]["resource"]["code"]["coding"] += codings
        r = api.post(SELECT, json=hook_request(draft, prefetch=prefetch))
        assert r.status_code == 413, r.text
        problem = outcome_of(r)
        assert words in problem["diagnostics"]
        assert problem["expression"] == (["context.draftOrders"] if where == "draft"
                                         else ["prefetch.conditions"])


def test_a_concept_in_a_list_is_checked_too(api: ValidatingClient) -> None:
    """reasonCode is a list of concepts: the second one over the limit is found."""
    prefetch = seed_prefetch(FIXTURE_NOW)
    prefetch["servicerequests"]["entry"].append({"resource": {
        "resourceType": "ServiceRequest", "id": "sr-long", "status": "active",
        "intent": "order", "subject": {"reference": "Patient/pt-seed"},
        "reasonCode": [{"text": "back pain"}, {"coding": [
            {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M" * 600}]}]}})
    r = api.post(SELECT, json=hook_request(order(cpt="72148"), prefetch=prefetch))
    assert r.status_code == 413, r.text
    assert outcome_of(r)["expression"] == ["prefetch.servicerequests"]


# ------------------------------------------------------------------ 2: bounded caches


def test_codes_longer_than_any_known_code_are_not_cached() -> None:
    knowledge = load_knowledge()
    for i in range(2_000):
        assert knowledge.valuesets_of("http://hl7.org/fhir/sid/icd-10-cm", f"{i:0400d}") == set()
        assert knowledge.valuesets_of("urn:" + "s" * 400, str(i)) == set()
    assert len(knowledge._cache) == 0
    assert knowledge.valuesets_of("http://hl7.org/fhir/sid/icd-10-cm", "M54.50")
    assert len(knowledge._cache) == 1


# ------------------------------------------------------------------ 4: odd but real FHIR values


ODD_DATES = ["0001-01-01", "9999-12-31", "9999-12", "9999", "0000", "1799-12-31",
             "2201-01-01", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59-14:00",
             "2026-02-30", "2026-13", "not a date", ""]
DATE_FIELDS = [("conditions", 0, "onsetDateTime"), ("conditions", 0, "recordedDate"),
               ("procedures", 0, "performedDateTime"), ("patient", None, "birthDate")]


@pytest.mark.parametrize("value", ODD_DATES)
@pytest.mark.parametrize("field", DATE_FIELDS, ids=[f[2] for f in DATE_FIELDS])
def test_dates_out_of_range_make_the_fact_unknown_not_a_500(
        api: ValidatingClient, field: tuple[str, int | None, str], value: str) -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    key, index, name = field
    target = prefetch[key] if index is None else prefetch[key]["entry"][index]["resource"]
    target[name] = value
    for cpt in ("72148", "72149"):
        r = api.post(SELECT, json=hook_request(order(cpt=cpt), prefetch=prefetch))
        assert r.status_code in (200, 412), r.text


ODD_VALUES = st.sampled_from([
    {"coding": [{"code": "active"}]}, {"x": 1}, [], ["active"], 1, -1, 10**30, 1.5, True, None,
    "", "\x00", "x" * 5_000, "0001-01-01", "9999-12-31", {"value": 10**30, "code": "a"},
    {"start": "0001-01-01", "end": "9999-12-31"}, [{"coding": "M54.5"}], {"coding": {}},
])
RESOURCE_PATHS = [(key, name) for key in ("conditions", "procedures")
                  for name in ("status", "clinicalStatus", "verificationStatus", "onsetAge",
                               "onsetPeriod", "performedPeriod", "code", "category",
                               "subject", "abatementDateTime", "id")]


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(RESOURCE_PATHS), ODD_VALUES), min_size=1, max_size=4),
       st.sampled_from(["72148", "72149", "72100", "78306"]),
       st.sampled_from([None, {"x": 1}, 5, "stat", ["urgent"]]))
def test_odd_shapes_in_any_field_never_fail(api: ValidatingClient,
                                            damage: list[tuple[tuple[str, str], Any]],
                                            cpt: str, priority: Any) -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    for (key, name), value in damage:
        prefetch[key]["entry"][0]["resource"][name] = copy.deepcopy(value)
    draft = order(cpt=cpt)
    if priority is not None:
        draft["priority"] = priority
    r = api.post(SELECT, json=hook_request(draft, prefetch=prefetch))
    assert r.status_code < 500, r.text


# ------------------------------------------------------------------ heavy calls off the loop


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("cost"), CDS_MAX_DRAFT_ORDERS="3000",
               CDS_MAX_BODY_BYTES=str(64 * 1024 * 1024)) as base:
        yield base


def test_health_answers_while_a_heavy_call_is_evaluated(served: str) -> None:
    drafts = [order(f"o{i}", cpt=("72149", "72148", "72100")[i % 3]) for i in range(3000)]
    body = json.dumps(hook_request(*drafts, hook="order-sign",
                                   prefetch=seed_prefetch(FIXTURE_NOW))).encode()
    done: dict[str, float] = {}

    def heavy() -> None:
        r = httpx.post(served + SIGN, content=body, timeout=60,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 200
        done["heavy"] = time.monotonic()

    worker = threading.Thread(target=heavy)
    worker.start()
    time.sleep(0.3)  # the heavy call is being evaluated (it takes about a second)
    r = httpx.get(served + "/healthz", timeout=10)
    done["health"] = time.monotonic()
    worker.join(timeout=60)
    assert r.status_code == 200
    assert "heavy" in done and done["health"] < done["heavy"]


def test_a_call_with_nothing_to_rate_does_not_read_the_chart(api: ValidatingClient) -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    prefetch["conditions"]["entry"][0]["resource"]["code"]["coding"] += [
        {"system": "urn:x", "code": str(i)} for i in range(100)]  # over the codings limit
    lab = order(cpt="36415")  # a blood draw: not lumbar imaging
    r = api.post(SELECT, json=hook_request(lab, prefetch=prefetch))
    assert r.status_code == 200 and r.json() == {"cards": []}
    r = api.post(SELECT, json=hook_request(order(cpt="72148"), prefetch=prefetch))
    assert r.status_code == 413  # an imaging order reads it, and the limit applies


# ------------------------------------------------------------------ issue 25, item 2: linear work


def _sign_with_findings(drafts: int, findings: int) -> dict[str, Any]:
    """order-sign: ``drafts`` lumbar MRIs against the seed record plus ``findings`` active bone
    metastasis conditions dated in this episode (each a red flag the rules must read)."""
    prefetch = seed_prefetch(FIXTURE_NOW)
    entries = prefetch["conditions"]["entry"]
    for i in range(findings):
        entries.append({"resource": condition(f"met-{i}", "C79.51", day(FIXTURE_NOW, 10 + i % 30))})
    orders = [order(f"o{i}", cpt="72148") for i in range(drafts)]
    return hook_request(*orders, hook="order-sign", prefetch=prefetch)


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> dict[str, int]:
    calls = {"n": 0}
    real = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.sources
def test_the_record_is_read_once_per_call_whatever_the_drafts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Which conditions are in scope is patient-level work: found once per call, not once per
    draft order (20 drafts x 1,500 conditions took 5 s)."""
    from cds_service.clinical.rules import RuleContext

    scoped = _count_calls(monkeypatch, RuleContext, "in_scope")
    engine = create_app(dev_settings(), clock=lambda: FIXTURE_NOW).state.services.engine
    counts = {}
    for drafts, findings in ((2, 60), (20, 60), (2, 120)):
        scoped["n"] = 0
        body = _sign_with_findings(drafts, findings)
        request = HookRequest.model_validate(body)
        rated = engine.rate(request, record_from_prefetch(request.prefetch, PATIENT),
                            FIXTURE_NOW)
        assert len(rated) == drafts
        assert all(r.facts.cancer.value is Tri.YES for r in rated)
        counts[(drafts, findings)] = scoped["n"]
    assert counts[(20, 60)] == counts[(2, 60)], counts  # ten times the drafts: no more reads
    assert counts[(2, 120)] <= 2 * counts[(2, 60)] + 10, counts  # twice the record: twice


@pytest.mark.sources
def test_evidence_is_de_duplicated_by_key_not_by_scanning_a_list(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Evidence rows are kept in a dict: comparing each new row with every earlier one made a
    chart of 5,000 findings cost 25 million comparisons."""
    from cds_service.clinical.model import Evidence

    compared = _count_calls(monkeypatch, Evidence, "__eq__")
    engine = create_app(dev_settings(), clock=lambda: FIXTURE_NOW).state.services.engine
    body = _sign_with_findings(1, 400)
    request = HookRequest.model_validate(body)
    rated = engine.rate(request, record_from_prefetch(request.prefetch, PATIENT), FIXTURE_NOW)
    assert len(rated[0].facts.cancer.evidence) == 400
    assert compared["n"] <= 400, compared  # n x n / 2 = 80,000 before


def test_many_drafts_against_a_long_chart_are_evaluated_off_the_event_loop() -> None:
    """Offloading goes by estimated cost, not body size alone: 200 drafts x 300 conditions is
    under 256 KiB and was evaluated on the event loop (holding /healthz for 3 s)."""
    from cds_service.api.hooks import heavy

    settings = dev_settings()
    body = _sign_with_findings(200, 300)
    size = len(json.dumps(body).encode())
    assert size < settings.offload_body_bytes
    request = HookRequest.model_validate(body)
    record = record_from_prefetch(request.prefetch, PATIENT)
    assert heavy(size, 200, record, settings)
    seed = _sign_with_findings(1, 0)  # the usual call stays on the loop (no thread hop)
    assert not heavy(len(json.dumps(seed).encode()), 1,
                     record_from_prefetch(HookRequest.model_validate(seed).prefetch, PATIENT),
                     settings)
