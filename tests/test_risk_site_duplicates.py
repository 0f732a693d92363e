"""Issue 21, classes 4 (risk factors recorded another way), 9 (site) and 12 (duplicates): focused
unit tests, and properties over generated records as the safety properties are
(tests/test_safety_properties.py).

- Drug use without a fever code never makes infection yes, and never allows a cancel.
- An add-on surgery code, and an arthrodesis status naming no lumbar level, never make prior
  lumbar surgery yes; text naming another site makes them not count.
- A duplicate card never comes with a cancel where a red flag is possible or the order is
  urgent, and an order never gets more than one card.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.answer.rating import find_duplicate
from cds_service.clinical.facts import Tri, scan_record
from cds_service.knowledge import load_knowledge
from cds_service.record import record_from_prefetch
from tests.builders import (
    CPT,
    condition,
    day,
    hook_request,
    order,
    procedure,
    seed_prefetch,
)
from tests.conftest import FIXTURE_NOW
from tests.test_safety_properties import RED_FLAG_FACTS, deletes, evaluate, hook_calls

NOW = FIXTURE_NOW
KNOWLEDGE = load_knowledge()
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


def acute_prefetch() -> dict[str, Any]:
    """The seed patient with back pain for 10 days and no care: V1 unless a red flag counts."""
    p = seed_prefetch(NOW)
    p["conditions"]["entry"][0]["resource"]["onsetDateTime"] = day(NOW, 10)
    p["procedures"]["entry"] = []
    return p


def with_entries(p: dict[str, Any], key: str, *resources: dict[str, Any]) -> dict[str, Any]:
    p[key]["entry"] += [{"resource": r} for r in resources]
    return p


def rate_one(p: dict[str, Any], cpt: str = "72148", priority: str | None = None) -> Any:
    draft = order("d1", cpt=cpt)
    if priority:
        draft["priority"] = priority
    (result,) = evaluate(hook_request(draft, prefetch=p))
    return result


def texted(c: dict[str, Any], text: str) -> dict[str, Any]:
    c["code"]["text"] = text
    return c


# ------------------------------------------------------------------ risk factors


def test_drug_use_without_fever_asks_and_never_cancels() -> None:
    r = rate_one(with_entries(acute_prefetch(), "conditions",
                              condition("oud", "F11.20", day(NOW, 900))))
    assert r.facts.infection.value is Tri.UNKNOWN
    assert r.kinds == ["missing-data"] and deletes(r) == 0


def test_drug_use_with_fever_is_suspected_infection() -> None:
    r = rate_one(with_entries(acute_prefetch(), "conditions",
                              condition("oud", "F19.20", day(NOW, 900)),
                              condition("f", "R50.9", day(NOW, 2))))
    assert r.facts.infection.value is Tri.YES
    assert r.decision.variants == frozenset({"V7"}) and r.decision.category == "UA"


@pytest.mark.parametrize("code", ["F11.11", "F11.21", "F11.91", "F19.21"])
def test_drug_use_in_remission_does_not_count(code: str) -> None:
    r = rate_one(with_entries(acute_prefetch(), "conditions",
                              condition("oud", code, day(NOW, 900))))
    assert r.facts.infection.value is Tri.NO and deletes(r) == 1


SCT = "http://snomed.info/sct"


@pytest.mark.parametrize(("text", "value"), [
    ("Dependent drug abuse; injects heroin", Tri.UNKNOWN),
    ("Injection drug use", Tri.UNKNOWN),
    ("Heroin dependence, in remission", Tri.NO),
    ("History of IV drug use", Tri.NO),
    ("Dependent drug abuse", Tri.NO),  # a code in no value set, and no injection named
])
def test_injection_drug_use_is_read_from_the_text_of_a_code_no_set_lists(text: str,
                                                                         value: Tri) -> None:
    c = condition("du", "6525002", day(NOW, 900))
    c["code"] = {"coding": [{"system": SCT, "code": "6525002"}], "text": text}
    r = rate_one(with_entries(acute_prefetch(), "conditions", c))
    assert r.facts.infection.value is value
    if value is Tri.UNKNOWN:
        assert [e.code for e in r.facts.infection.evidence] == ["6525002"]
        assert deletes(r) == 0
    fever = condition("f", "R50.9", day(NOW, 2))
    r = rate_one(with_entries(acute_prefetch(), "conditions", c, fever))
    assert r.facts.infection.value is Tri.YES


def test_drug_use_with_the_clinical_status_remission_does_not_count() -> None:
    r = rate_one(with_entries(acute_prefetch(), "conditions",
                              condition("oud", "F11.20", day(NOW, 900), status="remission")))
    assert r.facts.infection.value is Tri.NO


def resolved(cid: str, code: str, onset: int, abated: int | None) -> dict[str, Any]:
    c = condition(cid, code, day(NOW, onset), status="resolved")
    if abated is not None:
        c["abatementDateTime"] = day(NOW, abated)
    return c


@pytest.mark.parametrize(("onset", "abated", "value"), [
    (150, 90, Tri.YES),  # treated until 3 months ago: relapse risk
    (500, 300, Tri.YES),  # abated within the year
    (800, 730, Tri.NO),  # two years ago: history
    (100, None, Tri.YES),  # resolved, no abatement date: dated by its onset
    (900, None, Tri.NO),
])
def test_a_spinal_infection_treated_in_the_last_year_counts(onset: int, abated: int | None,
                                                            value: Tri) -> None:
    for code in ("M46.26", "G06.1", "A18.01", "M46.46"):
        r = rate_one(with_entries(acute_prefetch(), "conditions",
                                  resolved("om", code, onset, abated)))
        assert r.facts.infection.value is value, code


def test_abatement_period_dates_the_end() -> None:
    c = resolved("om", "M46.26", 200, None)
    c["abatementPeriod"] = {"start": day(NOW, 120), "end": day(NOW, 100)}
    r = rate_one(with_entries(acute_prefetch(), "conditions", c))
    assert r.facts.infection.value is Tri.YES


def prednisone(days: int, status: str = "active") -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": f"rx{days}", "status": status,
            "intent": "order", "subject": {"reference": "Patient/pt-seed"},
            "medicationCodeableConcept": {"text": "Prednisone 10 MG Oral Tablet"},
            "authoredOn": day(NOW, days)}


@pytest.mark.parametrize(("days", "value"), [(240, Tri.YES), (120, Tri.YES), (30, Tri.UNKNOWN)])
def test_prednisone_on_the_medication_list_for_three_months_is_chronic_steroid_use(
        days: int, value: Tri) -> None:
    r = rate_one(with_entries(acute_prefetch(), "medications", prednisone(days)), cpt="72100")
    assert r.facts.steroids.value is value
    if value is Tri.YES:
        assert r.decision.variants == frozenset({"V6"}) and r.decision.category == "UA"


# ------------------------------------------------------------------ site


def texted_procedure(pid: str, cpt: str, days: int, text: str | None = None) -> dict[str, Any]:
    p = procedure(pid, cpt, day(NOW, days))
    if text:
        p["code"]["text"] = text
    return p


@pytest.mark.parametrize(("procedures", "value"), [
    ([("63045", 400, None), ("63048", 400, None)], Tri.NO),  # cervical primary, same day
    ([("63046", 400, None), ("63048", 400, None)], Tri.NO),  # thoracic
    ([("63020", 400, None), ("63035", 400, None)], Tri.NO),
    ([("22600", 400, None), ("22614", 400, None)], Tri.NO),
    ([("63047", 400, None), ("63048", 400, None)], Tri.YES),  # lumbar primary
    ([("63048", 400, None)], Tri.UNKNOWN),  # alone: no region named
    ([("63045", 500, None), ("63048", 400, None)], Tri.UNKNOWN),  # not the same day
    ([("63048", 400, "Laminectomy, each additional segment, lumbar L5")], Tri.YES),
    ([("63048", 400, "Laminectomy additional segment C6")], Tri.NO),
    ([("63048", 400, "Laminectomy each additional segment, cervical, thoracic, or lumbar")],
     Tri.UNKNOWN),  # the CPT descriptor names every region
])
def test_an_add_on_code_is_lumbar_only_beside_a_lumbar_primary_or_by_its_text(
        procedures: list[tuple[str, int, str | None]], value: Tri) -> None:
    p = acute_prefetch()
    p["procedures"]["entry"] = [{"resource": texted_procedure(f"p{i}", cpt, days, text)}
                                for i, (cpt, days, text) in enumerate(procedures)]
    r = rate_one(p)
    assert r.facts.prior_surgery.value is value
    if value is Tri.NO:
        assert deletes(r) == 1  # nothing else stands in the way of the V1 cancel


@pytest.mark.parametrize(("code", "value"), [
    ("Z94.7", Tri.NO), ("Z94.5", Tri.NO), ("Z94.6", Tri.NO), ("Z94.0", Tri.YES),
    ("Z94.4", Tri.YES), ("Z94.81", Tri.YES), ("Z94.84", Tri.YES)])
def test_transplant_status_counts_for_organs_not_cornea_skin_or_bone(code: str,
                                                                     value: Tri) -> None:
    r = rate_one(with_entries(acute_prefetch(), "conditions",
                              condition("tx", code, day(NOW, 1500))))
    assert r.facts.immunosuppression.value is value


@pytest.mark.parametrize(("text", "value"), [
    ("Lumbar fusion L4-L5", Tri.YES), ("Spinal fusion L5-S1", Tri.YES),
    ("Lumbosacral arthrodesis", Tri.YES), ("Ankle arthrodesis", Tri.NO),
    ("Cervical fusion C5-C6", Tri.NO), ("Subtalar arthrodesis", Tri.NO),
    ("Arthrodesis of the wrist", Tri.NO), ("Arthrodesis status", Tri.UNKNOWN),
    ("Fusion of cervical and lumbar spine", Tri.UNKNOWN)])
def test_arthrodesis_status_is_placed_by_its_text(text: str, value: Tri) -> None:
    r = rate_one(with_entries(acute_prefetch(), "conditions",
                              texted(condition("fus", "Z98.1", day(NOW, 1500)), text)))
    assert r.facts.prior_surgery.value is value


# ------------------------------------------------------------------ duplicates


def active_order(sid: str, cpt: str, days: int, status: str = "active") -> dict[str, Any]:
    return {"resourceType": "ServiceRequest", "id": sid, "status": status, "intent": "order",
            "code": {"coding": [{"system": CPT, "code": cpt}]},
            "subject": {"reference": "Patient/pt-seed"}, "authoredOn": day(NOW, days)}


def duplicate_of(p: dict[str, Any], draft: dict[str, Any],
                 drafts: list[dict[str, Any]] | None = None) -> Any:
    record = record_from_prefetch(p, "pt-seed")
    proc = KNOWLEDGE.procedure_of(draft["code"]["coding"])
    assert proc is not None
    return find_duplicate(draft, proc, scan_record(record, KNOWLEDGE), drafts or [draft],
                          KNOWLEDGE)


def test_the_same_study_ordered_and_active_is_a_duplicate_with_its_date() -> None:
    p = with_entries(seed_prefetch(NOW), "servicerequests", active_order("e1", "72148", 30),
                     active_order("e2", "72148", 2))
    dup = duplicate_of(p, order("d1", cpt="72148"))
    assert dup is not None and dup.resource == "ServiceRequest/e2"
    assert dup.date == day(NOW, 2) and not dup.drafted


@pytest.mark.parametrize(("status", "cpt"), [
    ("completed", "72148"),  # done: the recent-MRI card's business
    ("revoked", "72148"), ("draft", "72148"),
    ("active", "72158"),  # another MRI in the record: not the same study
    ("active", "72100")])
def test_not_a_duplicate(status: str, cpt: str) -> None:
    p = with_entries(seed_prefetch(NOW), "servicerequests", active_order("e1", cpt, 2, status))
    assert duplicate_of(p, order("d1", cpt="72148")) is None


def test_the_draft_itself_in_the_record_is_no_duplicate() -> None:
    p = with_entries(seed_prefetch(NOW), "servicerequests", active_order("d1", "72148", 0))
    assert duplicate_of(p, order("d1", cpt="72148")) is None


def test_two_lumbar_mris_drafted_together_the_later_is_the_duplicate() -> None:
    first, second = order("d1", cpt="72148"), order("d2", cpt="72158")
    xray = order("d0", cpt="72100")
    drafts = [xray, first, second]
    assert duplicate_of(seed_prefetch(NOW), first, drafts) is None
    dup = duplicate_of(seed_prefetch(NOW), second, drafts)
    assert dup is not None and dup.resource == "ServiceRequest/d1" and dup.drafted
    assert duplicate_of(seed_prefetch(NOW), xray, drafts) is None


def test_two_mris_signed_together_get_one_card_on_the_later() -> None:
    body = hook_request(order("d1", cpt="72148"), order("d2", cpt="72158"), hook="order-sign",
                        prefetch=seed_prefetch(NOW))
    results = {r.order["id"]: r for r in evaluate(body)}
    assert results["d1"].kinds == [] and results["d2"].kinds == ["duplicate"]
    assert deletes(results["d2"]) == 1


def test_a_warning_names_the_duplicate_in_its_detail() -> None:
    p = with_entries(seed_prefetch(NOW), "servicerequests", active_order("e1", "72149", 2))
    r = rate_one(p, cpt="72149")  # MRI with contrast only in V3: not appropriate
    assert r.kinds == ["not-appropriate"]
    assert "Likely duplicate" in (r.cards[0].detail or "")
    assert "ServiceRequest/e1" in (r.cards[0].detail or "")


def test_an_urgent_duplicate_gets_no_cancel() -> None:
    p = with_entries(seed_prefetch(NOW), "servicerequests", active_order("e1", "72148", 2))
    r = rate_one(p, priority="stat")
    assert r.kinds == ["duplicate"] and deletes(r) == 0


# ------------------------------------------------------------------ properties

DRUG_USE = ["F11.20", "F11.10", "F11.90", "F19.20", "F19.10", "F11.21", "F19.21"]
OTHER = ["I10", "E11.9", "M54.50", "M81.0", "Z94.7", "C61", "M96.1", "R33.9", "Z98.1"]
NO_INFECTION_SIGN = OTHER  # none of them is a fever, sepsis or spinal infection


@st.composite
def drug_use_records(draw: st.DrawFn) -> dict[str, Any]:
    p = seed_prefetch(NOW)
    p["conditions"]["entry"][0]["resource"]["onsetDateTime"] = day(
        NOW, draw(st.sampled_from([3, 10, 45, 112, 400])))
    if draw(st.booleans()):
        p["procedures"]["entry"] = []
    codes = draw(st.lists(st.sampled_from(DRUG_USE), min_size=1, max_size=3))
    codes += draw(st.lists(st.sampled_from(NO_INFECTION_SIGN), max_size=3))
    for i, code in enumerate(codes):
        onset = draw(st.one_of(st.none(), st.sampled_from([1, 30, 400, 2000])))
        status = draw(st.sampled_from(["active", "active", "resolved"]))
        p["conditions"]["entry"].append({"resource": condition(
            f"x{i}", code, day(NOW, onset) if onset is not None else None, status=status)})
    draft = order("d1", cpt=draw(st.sampled_from(["72148", "72100", "72149", "72158"])),
                  reason=draw(st.sampled_from(["M54.16", "M54.50", "F11.20", None])))
    priority = draw(st.sampled_from([None, "routine", "stat"]))
    if priority:
        draft["priority"] = priority
    return hook_request(draft, prefetch=p)


@PROPERTY_SETTINGS
@given(drug_use_records())
def test_drug_use_without_a_fever_code_never_makes_infection_yes_nor_allows_a_cancel(
        body: dict[str, Any]) -> None:
    conditions = [e["resource"] for e in body["prefetch"]["conditions"]["entry"]]
    reasons = [c["code"] for c in body["context"]["draftOrders"]["entry"][0]["resource"].get(
        "reasonCode", []) for c in c["coding"]]
    current = [c["code"]["coding"][0]["code"] for c in conditions
               if c["clinicalStatus"]["coding"][0]["code"] == "active"] + reasons
    in_use = any(code in DRUG_USE and code not in ("F11.21", "F19.21") for code in current)
    for r in evaluate(body):
        assert r.facts.infection.value is not Tri.YES
        if in_use:
            assert r.facts.infection.value is Tri.UNKNOWN
            assert deletes(r) == 0


ADD_ONS = ["63035", "63048", "22614"]
NOT_LUMBAR_PRIMARY = ["63020", "63045", "63046", "22600", "22610", "99213", "27870"]
TEXTS = [None, "Laminectomy, each additional segment", "Cervical laminectomy C5",
         "Arthrodesis, additional segment", "Thoracic decompression", "Neck surgery"]
FUSION_TEXTS = ["Arthrodesis status", "Ankle arthrodesis", "Cervical fusion C4-C5",
                "Knee fusion", "Subtalar arthrodesis", "Status post arthrodesis"]


@st.composite
def add_on_records(draw: st.DrawFn) -> dict[str, Any]:
    p = acute_prefetch()
    n = draw(st.integers(1, 4))
    p["procedures"]["entry"] = [{"resource": texted_procedure(
        f"p{i}", draw(st.sampled_from(ADD_ONS + NOT_LUMBAR_PRIMARY)),
        draw(st.sampled_from([30, 400, 401, 2000])), draw(st.sampled_from(TEXTS)))}
        for i in range(n)]
    if draw(st.booleans()):
        fusion = texted(condition("fus", draw(st.sampled_from(["Z98.1", "M96.0"])),
                                  day(NOW, 1500)), draw(st.sampled_from(FUSION_TEXTS)))
        p["conditions"]["entry"].append({"resource": fusion})
    draft = order("d1", cpt=draw(st.sampled_from(["72148", "72100", "72158"])))
    return hook_request(draft, prefetch=p)


@PROPERTY_SETTINGS
@given(add_on_records())
def test_an_add_on_or_site_less_fusion_code_never_makes_prior_surgery_yes(
        body: dict[str, Any]) -> None:
    for r in evaluate(body):
        assert r.facts.prior_surgery.value is not Tri.YES, r.facts.prior_surgery


@st.composite
def duplicate_calls(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(hook_calls())
    prefetch = body["prefetch"]
    requests = prefetch.get("servicerequests")
    if isinstance(requests, dict) and requests.get("resourceType") == "Bundle":
        drafts = [e["resource"] for e in body["context"]["draftOrders"]["entry"]]
        cpt = draw(st.sampled_from([d["code"]["coding"][0]["code"] for d in drafts]))
        requests["entry"].append({"resource": active_order(
            "earlier", cpt, draw(st.sampled_from([0, 2, 30, 400])))})
    return body


def test_the_duplicate_strategy_makes_duplicates() -> None:
    p = with_entries(seed_prefetch(NOW), "servicerequests", active_order("earlier", "72148", 2))
    r = rate_one(p)
    assert r.kinds == ["duplicate"]  # the kind the property below looks at


@PROPERTY_SETTINGS
@given(duplicate_calls())
def test_a_duplicate_card_never_comes_with_a_cancel_when_a_red_flag_is_possible(
        body: dict[str, Any]) -> None:
    for r in evaluate(body):
        assert len(r.cards) <= 1, r.kinds
        flags = [getattr(r.facts, n).value for n in RED_FLAG_FACTS]
        if "duplicate" in r.kinds and (any(v is not Tri.NO for v in flags) or r.facts.urgent):
            assert deletes(r) == 0, (flags, r.facts.urgent)
        for card in r.cards:
            for s in card.suggestions or []:
                if any(a.type == "delete" for a in s.actions):
                    assert not s.isRecommended

