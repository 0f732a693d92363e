"""Issue 21, classes 7, 8, 10 and 15: each finding read in its context.

7. The episode: a symptom counts when dated in this episode or on the order; undated or older it
   is unknown (ask), never yes; a benign cause beside a bladder symptom means it does not count;
   a clinician's "no" settles an undated or older symptom, never an order reason.
8. Care for the back: care for another body part or condition is no back care; weeks of care are
   documented weeks (first to latest), never more than the episode; a therapy referral is care.
10. The answers' author: only a practitioner's answers are clinician-attested.
15. Answers that disagree with the record: said on the card; weeks capped at the episode.
"""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.answer.rating import Rated
from cds_service.clinical.answers import by_clinician
from cds_service.clinical.facts import ClinicalParams, Facts, Tri, derive_facts, scan_record
from cds_service.clinical.scenario import decide
from cds_service.engine import Engine
from cds_service.knowledge import load_knowledge
from cds_service.protocol import HookRequest
from cds_service.questionnaire import build_response, load_questions
from cds_service.record import record_from_prefetch
from cds_service.render import load_templates
from cds_service.settings import DEV_BASE_URL
from cds_service.smart.identity import practitioner_named
from tests.builders import (
    ICD,
    PATIENT,
    bundle,
    condition,
    day,
    hook_request,
    order,
    procedure,
    seed_prefetch,
)
from tests.conftest import FIXTURE_NOW, ROOT, dev_settings
from tests.test_safety_properties import hook_calls

NOW = FIXTURE_NOW
KNOWLEDGE = load_knowledge()
QUESTIONS = load_questions()
ENGINE = Engine(KNOWLEDGE, load_templates(ROOT / "cards"), dev_settings())
WEEK = timedelta(weeks=1)
CES_SYMPTOMS = ["R33.9", "R33.8", "R32", "N39.490", "R15.9", "N31.9", "K59.2", "R20.0"]


def record(onset: int | None = 10, *conds: dict[str, Any], care: bool = False,
           **resources: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed patient with back pain since ``onset`` days (None: undated), no care unless
    asked, and these conditions and resources."""
    p = seed_prefetch(NOW)
    lbp = p["conditions"]["entry"][0]["resource"]
    if onset is None:
        del lbp["onsetDateTime"]
    else:
        lbp["onsetDateTime"] = day(NOW, onset)
    p["conditions"]["entry"] += [{"resource": c} for c in conds]
    if not care:
        p["procedures"] = bundle()
    for key, found in resources.items():
        p[key] = bundle(*found)
    return p


def symptom(cid: str, code: str, days_ago: int | None, text: str = "",
            status: str = "active") -> dict[str, Any]:
    c = condition(cid, code, day(NOW, days_ago) if days_ago is not None else None, status)
    if text:
        c["code"]["text"] = text
    return c


def rate(prefetch: dict[str, Any], proc: str = "mri-wo",
         reasons: tuple[str, ...] = ("M54.50",)) -> tuple[Facts, Any]:
    draft = order(cpt="0", reason=None)
    draft["code"] = {"coding": [dict(KNOWLEDGE.procedures[proc].order_codes[0])]}
    if reasons:
        draft["reasonCode"] = [{"coding": [{"system": ICD, "code": r}]} for r in reasons]
    rec = record_from_prefetch(prefetch, PATIENT)
    facts = derive_facts(scan_record(rec, KNOWLEDGE), draft, [draft], KNOWLEDGE, NOW,
                         ClinicalParams())
    return facts, decide(facts, KNOWLEDGE, KNOWLEDGE.procedures[proc])


def rated(prefetch: dict[str, Any], proc: str = "mri-wo",
          reasons: tuple[str, ...] = ("M54.50",)) -> Rated:
    """Through the engine (answers applied), one order."""
    draft = order(cpt="0", reason=None)
    draft["code"] = {"coding": [dict(KNOWLEDGE.procedures[proc].order_codes[0])]}
    draft["reasonCode"] = [{"coding": [{"system": ICD, "code": r}]} for r in reasons]
    body = hook_request(draft, prefetch=prefetch)
    request = HookRequest.model_validate(body)
    rec = record_from_prefetch(request.prefetch, request.context.patientId)
    (result,) = ENGINE.rate(request, rec, NOW)
    return result


def response(answers: dict[str, Any], author: str | None = "Practitioner/dr-1",
             days_ago: int = 1) -> dict[str, Any]:
    authored = NOW.replace(hour=10) - timedelta(days=days_ago)
    qr = build_response(QUESTIONS, DEV_BASE_URL, answers, PATIENT, authored, author=author)
    qr["id"] = f"qr-{abs(hash(json.dumps(answers, sort_keys=True))) % 10_000}"
    return qr


def medication(mid: str, text: str, days_ago: int, status: str = "active",
               **extra: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": mid, "status": status,
            "intent": "order", "subject": {"reference": f"Patient/{PATIENT}"},
            "medicationCodeableConcept": {"text": text}, "authoredOn": day(NOW, days_ago),
            **extra}


def supply(days: int, repeats: int = 0) -> dict[str, Any]:
    return {"dispenseRequest": {"numberOfRepeatsAllowed": repeats, "expectedSupplyDuration": {
        "value": days, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"}}}


# ------------------------------------------------------------------ 7. the episode


def test_a_bladder_symptom_in_the_episode_counts_but_not_beside_a_benign_cause() -> None:
    retention = symptom("r", "R33.9", 3, "Urinary retention")
    facts, d = rate(record(10, retention))
    assert facts.cauda_equina.value is Tri.YES and d.variants == frozenset({"V4"})
    for cause in (symptom("b", "N40.1", 900), symptom("s", "N39.3", 900),
                  symptom("u", "N39.41", 900)):
        facts, d = rate(record(10, retention, cause))
        assert facts.cauda_equina.value is Tri.NO, cause["code"]
        assert d.variants == frozenset({"V1"})
    post_op = symptom("r", "R33.9", 3, "Postoperative urinary retention after hernia repair")
    facts, _ = rate(record(10, post_op))
    assert facts.cauda_equina.value is Tri.NO
    # overflow incontinence is no benign cause of itself
    facts, _ = rate(record(10, symptom("o", "N39.490", 3, "Overflow incontinence")))
    assert facts.cauda_equina.value is Tri.YES


def test_a_benign_bladder_cause_leaves_bowel_symptoms_neurogenic_bladder_and_order_reasons(
) -> None:
    bph = symptom("b", "N40.1", 900)
    for code in ("R15.9", "N31.9"):
        facts, _ = rate(record(10, symptom("x", code, 3), bph))
        assert facts.cauda_equina.value is Tri.YES, code
    facts, _ = rate(record(10, bph), reasons=("M54.50", "R33.9"))  # the clinician's indication
    assert facts.cauda_equina.value is Tri.YES
    resolved = symptom("b", "N40.1", 900, status="resolved")  # a benign cause no longer there
    facts, _ = rate(record(10, symptom("r", "R33.9", 3), resolved))
    assert facts.cauda_equina.value is Tri.YES


@pytest.mark.parametrize("code,fact", [("R33.9", "cauda_equina"), ("R50.9", "infection"),
                                       ("M21.372", "neuro_deficit"), ("R63.4", "cancer"),
                                       ("S39.012A", "trauma")])
def test_a_symptom_before_the_episode_or_undated_is_unknown_in_it_yes(code: str,
                                                                      fact: str) -> None:
    before, _ = rate(record(21, symptom("x", code, 77)))  # 11 weeks ago, pain for 3
    assert before.fact(fact).value is Tri.UNKNOWN
    assert before.fact(fact).missing == ["not dated in this episode"]
    undated, _ = rate(record(21, symptom("x", code, None)))
    assert undated.fact(fact).value is Tri.UNKNOWN
    within, _ = rate(record(21, symptom("x", code, 20)))  # within the grace period
    assert within.fact(fact).value is Tri.YES
    gone, _ = rate(record(21, symptom("x", code, 77, status="resolved")))
    assert gone.fact(fact).value is Tri.NO


def test_an_undated_entry_the_service_cannot_read_leaves_symptoms_unknown() -> None:
    text_only = symptom("t", "R33.9", None)
    text_only["code"] = {"text": "Urinary retention"}  # no code the service reads
    facts, _ = rate(record(10, text_only))
    assert facts.cauda_equina.value is Tri.UNKNOWN and facts.infection.value is Tri.UNKNOWN


def test_with_no_dated_episode_symptoms_count_within_the_recent_window() -> None:
    facts, _ = rate(record(None, symptom("f", "R50.9", 30)))
    assert facts.infection.value is Tri.YES
    facts, _ = rate(record(None, symptom("f", "R50.9", 200)))
    assert facts.infection.value is Tri.UNKNOWN


def test_long_standing_conditions_count_whatever_their_date() -> None:
    for code, fact in (("C61", "cancer"), ("D84.9", "immunosuppression"),
                       ("M81.0", "osteoporosis"), ("Z95.0", "mri_safety")):
        facts, _ = rate(record(10, symptom("x", code, 3000)))
        assert facts.fact(fact).value is Tri.YES, code


def test_cauda_equina_before_the_episode_treated_by_lumbar_surgery_is_history() -> None:
    """Cauda equina two years ago, decompressed days later (the G83.4 still active on the list):
    history, not a finding to ask about; untreated, or treated before it was recorded, it is
    unknown; in this episode it counts whatever was done before."""
    ces = symptom("ces", "G83.4", 730)
    decompressed = procedure("decomp", "63005", day(NOW, 725))
    facts, _ = rate(record(10, ces, procedures=[decompressed]), "xr-lumbar")
    assert facts.cauda_equina.value is Tri.NO and facts.prior_surgery.value is Tri.YES
    facts, _ = rate(record(10, copy.deepcopy(ces)), "xr-lumbar")
    assert facts.cauda_equina.value is Tri.UNKNOWN
    earlier = procedure("decomp", "63005", day(NOW, 900))  # the surgery before the finding
    facts, _ = rate(record(10, copy.deepcopy(ces), procedures=[earlier]), "xr-lumbar")
    assert facts.cauda_equina.value is Tri.UNKNOWN
    now_ces = symptom("ces", "G83.4", 2)
    facts, _ = rate(record(10, now_ces, procedures=[decompressed]), "xr-lumbar")
    assert facts.cauda_equina.value is Tri.YES


def test_a_clinicians_no_settles_an_undated_symptom_never_an_order_reason() -> None:
    undated = record(10, symptom("i", "R32", None, "Urinary incontinence"))
    assert rated(undated).facts.cauda_equina.value is Tri.UNKNOWN
    undated["questionnaireresponses"] = bundle(response({"cauda-equina": False}))
    result = rated(undated)
    assert result.facts.cauda_equina.value is Tri.NO
    assert result.decision.variants == frozenset({"V1"})
    on_order = record(10)
    on_order["questionnaireresponses"] = bundle(response({"cauda-equina": False}))
    result = rated(on_order, reasons=("M54.50", "R33.9"))
    assert result.facts.cauda_equina.value is Tri.YES  # the order's reason still counts
    dated = record(10, symptom("r", "R33.9", 3))
    dated["questionnaireresponses"] = bundle(response({"cauda-equina": False}))
    assert rated(dated).facts.cauda_equina.value is Tri.YES  # dated in this episode


def test_candidacy_counts_in_the_episode_and_an_undated_one_is_unknown() -> None:
    def esi(days: int | None) -> dict[str, Any]:
        sr = order("esi", cpt="62323")
        sr["status"] = "completed"
        if days is not None:
            sr["authoredOn"] = day(NOW, days)
        return sr
    facts, _ = rate(record(140, servicerequests=[esi(1278)]))  # 3.5 years ago
    assert facts.intervention_candidate.value is Tri.NO
    facts, _ = rate(record(140, servicerequests=[esi(20)]))
    assert facts.intervention_candidate.value is Tri.YES
    facts, _ = rate(record(140, servicerequests=[esi(None)]))
    assert facts.intervention_candidate.value is Tri.UNKNOWN


# ------------------------------------------------------------------ 8. care for the back


def pt(pid: str, days_ago: int, **extra: Any) -> dict[str, Any]:
    return {**procedure(pid, "97110", day(NOW, days_ago)), **extra}


def test_weeks_of_care_are_documented_weeks_from_first_to_latest() -> None:
    facts, _ = rate(record(140, procedures=[pt("a", 56)]))  # a single visit: one day
    assert facts.care_weeks == pytest.approx(1 / 7) and facts.care_states == ("under-way",)
    facts, _ = rate(record(140, procedures=[pt("a", 56), pt("b", 49)]))
    assert facts.care_weeks == pytest.approx(8 / 7) and facts.care_states == ("under-way",)
    facts, d = rate(record(140, procedures=[pt("a", 56), pt("b", 7)]))
    assert facts.care_weeks == pytest.approx(50 / 7) and facts.care_states == ("done",)
    assert d.variants == frozenset({"V3"})


def test_a_medication_course_counts_its_documented_supply() -> None:
    course = medication("ibu", "Ibuprofen 600 mg tablet", 56, "completed", **supply(10))
    facts, d = rate(record(140, medications=[course]))
    assert facts.care_weeks == pytest.approx(10 / 7, abs=0.15)  # not 8 weeks
    assert d.variants == frozenset({"V2"}) and not facts.candidate_assumed
    refills = medication("ibu", "Ibuprofen 600 mg tablet", 56, "completed", **supply(10, 3))
    facts, _ = rate(record(140, medications=[refills]))
    assert facts.care_weeks == pytest.approx(40 / 7, abs=0.15)
    ended = medication("nap", "Naproxen 500 mg tablet", 70, "active", dispenseRequest={
        "validityPeriod": {"start": day(NOW, 70), "end": day(NOW, 42)}})
    facts, _ = rate(record(140, medications=[ended]))
    assert facts.care_weeks == pytest.approx(4.0, abs=0.15)
    ongoing = medication("nap", "Naproxen 500 mg tablet", 63)  # active, no end: being taken
    facts, _ = rate(record(140, medications=[ongoing]))
    assert facts.care_weeks == pytest.approx(9.0, abs=0.15)
    once = medication("nap", "Naproxen 500 mg tablet", 63, "completed")  # no end: one day
    facts, _ = rate(record(140, medications=[once]))
    assert facts.care_weeks == pytest.approx(1 / 7)


def test_weeks_counted_up_to_today_on_an_active_order_are_said_to_be() -> None:
    """An order still active with no end date is taken as care up to today: the weeks claim
    more than any date on record, so the card names the order and says so."""
    ongoing = medication("nap", "Naproxen 500 mg tablet", 63)

    def said(facts: Any) -> list[tuple[str, dict[str, Any]]]:
        return [a for a in facts.assumptions if a[0].startswith("care-order")]

    facts, _ = rate(record(140, medications=[ongoing]))
    assert said(facts) == [("care-order-still-active-alone", {
        "date": day(NOW, 63), "first": day(NOW, 63), "last": day(NOW, 63), "count": 1})]
    # after documented visits: the care on record, to the open order's date
    facts, _ = rate(record(140, procedures=[pt("a", 84)], medications=[ongoing]))
    assert said(facts) == [("care-order-still-active", {
        "date": day(NOW, 63), "first": day(NOW, 84), "last": day(NOW, 63), "count": 1})]
    # the open order is the oldest care and dated visits follow it: it is not the only care,
    # and the care on record runs to the latest visit
    facts, _ = rate(record(140, procedures=[pt("a", 49), pt("b", 21)], medications=[ongoing]))
    assert said(facts) == [("care-order-still-active", {
        "date": day(NOW, 63), "first": day(NOW, 63), "last": day(NOW, 21), "count": 1})]
    # two open orders (the Synthea patient whose 2014 order was never closed, beside a 2024
    # one): both are counted, the latest named, and it is the latest care in the findings
    later = medication("ibu", "Ibuprofen 400 mg tablet", 28)
    facts, _ = rate(record(140, procedures=[pt("b", 42)], medications=[ongoing, later]))
    assert said(facts) == [("care-orders-still-active", {
        "date": day(NOW, 28), "first": day(NOW, 63), "last": day(NOW, 28), "count": 2})]
    assert facts.conservative_care.evidence[-1].resource == "MedicationRequest/ibu"
    ended = medication("nap", "Naproxen 500 mg tablet", 70, "active", dispenseRequest={
        "validityPeriod": {"start": day(NOW, 70), "end": day(NOW, 42)}})
    once = medication("nap", "Naproxen 500 mg tablet", 63, "completed")
    visits = [pt("a", 56), pt("b", 7)]
    for care in ([ended], [once]):
        facts, _ = rate(record(140, medications=care))
        assert not said(facts), care
    facts, _ = rate(record(140, procedures=visits))
    assert not said(facts)
    # an older active order, and a later dated visit that ends the span: nothing counted to
    # today, nothing said
    facts, _ = rate(record(140, procedures=[pt("b", 7)], medications=[
        medication("nap", "Naproxen 500 mg tablet", 63, "active", dispenseRequest={
            "validityPeriod": {"start": day(NOW, 63), "end": day(NOW, 35)}})]))
    assert not said(facts)


def test_care_is_never_longer_than_the_episode() -> None:
    facts, _ = rate(record(20, medications=[medication("nap", "Naproxen 500 mg tablet", 30)]))
    # 20 days and a half: the onset's day began at midnight, the clock is at noon
    assert facts.care_weeks is not None and facts.care_weeks <= 20.5 / 7 + 1e-9


def test_care_for_another_body_part_or_condition_is_not_back_care() -> None:
    knee = [pt("a", 63, bodySite=[{"text": "Right knee"}]), pt("b", 7, bodySite=[
        {"text": "Right knee"}])]
    facts, d = rate(record(140, procedures=knee))
    assert facts.conservative_care.value is Tri.NO and d.variants == frozenset({"V2"})
    back = [pt("a", 63, bodySite=[{"text": "Lumbar spine"}]), pt("b", 7)]
    facts, _ = rate(record(140, procedures=back))
    assert facts.conservative_care.value is Tri.YES
    dpn = symptom("dpn", "E11.40", 900, "Type 2 diabetes with diabetic neuropathy")
    gaba = medication("g", "Gabapentin 300 mg capsule", 90,
                      reasonReference=[{"reference": "Condition/dpn"}])
    facts, _ = rate(record(140, dpn, medications=[gaba]))
    assert facts.conservative_care.value is Tri.NO and facts.care_weeks is None
    for_back = medication("g", "Gabapentin 300 mg capsule", 90,
                          reasonReference=[{"reference": "Condition/c-lbp"}])
    facts, _ = rate(record(140, medications=[for_back]))
    assert facts.conservative_care.value is Tri.YES


def referral(code: str, text: str) -> dict[str, Any]:
    sr = order("ref", cpt=code, reason="M54.50")
    sr.update(status="active", authoredOn=day(NOW, 10), category=[{"text": "Referral"}])
    sr["code"]["text"] = text
    return sr


def test_a_therapy_referral_is_care_and_a_spine_referral_candidacy() -> None:
    facts, d = rate(record(140, servicerequests=[referral("97161", "Referral to physical "
                                                                   "therapy")]))
    assert facts.intervention_candidate.value is Tri.NO
    assert facts.conservative_care.value is Tri.NO and facts.care_states == ("under-way",)
    assert d.variants == frozenset({"V2"})
    by_text = referral("X-LOCAL-1", "Referral to physiotherapy")
    facts, _ = rate(record(140, servicerequests=[by_text]))
    assert facts.intervention_candidate.value is Tri.NO
    assert facts.care_weeks == pytest.approx(1 / 7)
    spine = referral("X-LOCAL-2", "Referral to spine surgery")
    facts, d = rate(record(140, servicerequests=[spine]))
    assert facts.intervention_candidate.value is Tri.YES and facts.care_weeks is None


# ------------------------------------------------------------------ 10. the answers' author


def test_the_author_decides_whether_answers_are_a_clinicians() -> None:
    assert by_clinician({"author": {"reference": "Practitioner/1"}})
    assert by_clinician({"author": {"reference": "https://ehr.example/fhir/PractitionerRole/r"}})
    for author in ({"reference": "Patient/pt-seed"}, {"reference": "RelatedPerson/1"},
                   {"reference": "Device/app"}, {"display": "Dr Who"}, None):
        assert not by_clinician({"author": author} if author else {})


CARE_ANSWERS = {"conservative-care": True, "conservative-care-weeks": 10,
                "intervention-candidate": True, "pain-duration": "chronic"}


def test_a_patients_answers_settle_neither_candidacy_nor_care() -> None:
    p = record(140)
    before = rated(p)
    assert before.decision.variants == frozenset({"V2"})
    for author in (f"Patient/{PATIENT}", "RelatedPerson/mum", None):
        p["questionnaireresponses"] = bundle(response(CARE_ANSWERS, author=author))
        after = rated(p)
        assert after.facts.intervention_candidate == before.facts.intervention_candidate
        assert after.facts.conservative_care == before.facts.conservative_care
        assert after.decision.variants == frozenset({"V2"}), author
    p["questionnaireresponses"] = bundle(response(CARE_ANSWERS))  # a practitioner's
    assert rated(p).decision.variants == frozenset({"V3"})


def test_a_patients_yes_to_a_red_flag_is_asked_never_yes_and_their_no_settles_nothing(
) -> None:
    p = record(10)
    p["questionnaireresponses"] = bundle(response({"cauda-equina": True}, author=None))
    result = rated(p)
    assert result.facts.cauda_equina.value is Tri.UNKNOWN
    assert result.decision.category is None  # not rated either way: the clinician is asked
    undated = record(10, symptom("i", "R32", None))
    undated["questionnaireresponses"] = bundle(
        response({"cauda-equina": False}, author=f"Patient/{PATIENT}"))
    assert rated(undated).facts.cauda_equina.value is Tri.UNKNOWN


def test_a_practitioners_answer_outranks_a_later_patients() -> None:
    p = record(140)
    p["questionnaireresponses"] = bundle(
        response(CARE_ANSWERS, days_ago=3),
        response({**CARE_ANSWERS, "intervention-candidate": False}, author=None, days_ago=1))
    assert rated(p).facts.intervention_candidate.value is Tri.YES


def test_the_app_names_the_practitioner_signed_in_as_the_author() -> None:
    # (the id_token's signature, issuer and audience: tests/test_smart_app.py)
    assert practitioner_named("Practitioner/7") == "Practitioner/7"
    assert practitioner_named("https://ehr.example/fhir/PractitionerRole/r-1") == \
        "PractitionerRole/r-1"
    for user in ("Patient/1", "Practitioner/../x y", None, 7):
        assert practitioner_named(user) is None
    qr = build_response(QUESTIONS, DEV_BASE_URL, {"cauda-equina": False}, PATIENT, NOW,
                        author="Practitioner/7")
    assert qr["author"] == {"reference": "Practitioner/7"} and by_clinician(qr)


# ------------------------------------------------------------------ 15. answers vs the record


def test_answers_that_disagree_with_the_onset_are_said_and_care_is_capped() -> None:
    p = record(10)
    p["questionnaireresponses"] = bundle(response(
        {"pain-duration": "chronic", "conservative-care": True,
         "conservative-care-weeks": 20}))
    result = rated(p)
    facts = result.facts
    assert facts.duration_categories == frozenset({"acute"})  # the record's onset is used
    assert facts.care_weeks is not None and facts.care_weeks <= 10.5 / 7 + 1e-9
    assert [code for code, _ in facts.conflicts] == ["conflict-duration", "conflict-care"]
    assert result.decision.variants == frozenset({"V1"})
    card = ENGINE.answer([result]).orders[0].cards[0]
    assert "disagrees with the onset on record (10 days ago)" in card.detail
    assert "(20 weeks of conservative care) is more than the 10 days" in card.detail
    consistent = record(140)
    consistent["questionnaireresponses"] = bundle(response(
        {"pain-duration": "chronic", "conservative-care": True,
         "conservative-care-weeks": 10}))
    facts = rated(consistent).facts
    assert facts.conflicts == [] and facts.care_weeks == 10


def test_answered_weeks_capped_at_the_episode_leave_care_under_way() -> None:
    p = record(35)
    p["questionnaireresponses"] = bundle(response({"conservative-care": True,
                                                   "conservative-care-weeks": 20}))
    result = rated(p)
    assert result.facts.care_weeks == pytest.approx(5.0, abs=0.15)
    assert result.facts.care_states == ("under-way",) and not result.facts.candidate_assumed
    assert result.decision.variants == frozenset({"V2"})


# ------------------------------------------------------------------ properties

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def stale_symptoms(draw: st.DrawFn) -> dict[str, Any]:
    """Back pain of a dated onset, and cauda equina symptoms that are undated or dated before
    the episode (less the grace period), beside other history; the order names none of them."""
    onset = draw(st.sampled_from([3, 10, 40, 112, 400]))
    grace = ClinicalParams().episode_grace_days
    conds = []
    for i in range(draw(st.integers(1, 4))):
        days = draw(st.one_of(st.none(), st.integers(onset + grace + 1, onset + 3000)))
        conds.append(symptom(f"s{i}", draw(st.sampled_from(CES_SYMPTOMS)), days,
                             draw(st.sampled_from(["", "Saddle anaesthesia", "Retention"])),
                             draw(st.sampled_from(["active", "active", "resolved"]))))
    for i in range(draw(st.integers(0, 2))):
        conds.append(symptom(f"o{i}", draw(st.sampled_from(["I10", "N40.1", "C61", "M81.0"])),
                             draw(st.integers(1, 3000))))
    return record(onset, *conds, care=draw(st.booleans()))


@SETTINGS
@given(stale_symptoms(), st.sampled_from(["mri-wo", "xr-lumbar", "ct-wo"]))
def test_property_a_stale_or_undated_ces_symptom_never_makes_cauda_equina_yes(
        prefetch: dict[str, Any], proc: str) -> None:
    facts, decision = rate(prefetch, proc, reasons=("M54.50",))
    assert facts.cauda_equina.value is not Tri.YES
    assert decision.variants is None or "V4" not in decision.variants


@st.composite
def care_records(draw: st.DrawFn) -> tuple[dict[str, Any], int, float]:
    """A dated episode and care (therapy visits, medication orders with or without a supply)
    at any dates; with the documented span of the care that falls in the episode."""
    onset = draw(st.sampled_from([10, 30, 60, 112, 400]))
    cutoff = onset + ClinicalParams().episode_grace_days
    procs, meds, spans = [], [], []
    for i in range(draw(st.integers(0, 4))):
        days = draw(st.integers(0, 700))
        procs.append(pt(f"p{i}", days))
        spans.append((days, days))
    for i in range(draw(st.integers(0, 3))):
        days = draw(st.integers(0, 700))
        status = draw(st.sampled_from(["active", "completed"]))
        length = draw(st.one_of(st.none(), st.integers(1, 120)))
        extra = supply(length) if length else {}
        meds.append(medication(f"m{i}", "Naproxen 500 mg tablet", days, status, **extra))
        end = max(0, days - length) if length else (0 if status == "active" else days)
        spans.append((days, end))
    # days ago of the first start and the latest end of the care that reaches the episode
    inside = [(s, e) for s, e in spans if e <= cutoff]
    documented = (min(max(s for s, _ in inside), cutoff) - min(e for _, e in inside)
                  if inside else 0)
    prefetch = record(onset, procedures=procs, medications=meds)
    return prefetch, onset, documented / 7


@SETTINGS
@given(care_records())
def test_property_weeks_of_care_never_exceed_the_episode_nor_the_documented_span(
        case: tuple[dict[str, Any], int, float]) -> None:
    prefetch, onset, documented = case
    facts, _ = rate(prefetch, "mri-wo")
    if facts.care_weeks is None:
        return
    slack = 2 / 7  # dates are days: a day's start to another's end, and the clock at noon
    assert facts.care_weeks <= onset / 7 + slack  # the episode
    assert facts.care_weeks <= documented + slack


@st.composite
def patient_answers(draw: st.DrawFn) -> dict[str, Any]:
    items: dict[str, Any] = {}
    if draw(st.booleans()):
        items["pain-duration"] = draw(st.sampled_from(["acute", "subacute", "chronic"]))
    if draw(st.booleans()):
        items["conservative-care"] = draw(st.booleans())
        items["conservative-care-weeks"] = draw(st.integers(0, 60))
    if draw(st.booleans()):
        items["intervention-candidate"] = draw(st.booleans())
    for link in ("cauda-equina", "infection", "cancer", "trauma"):
        if draw(st.booleans()):
            items[link] = draw(st.booleans())
    return items


@SETTINGS
@given(hook_calls(), patient_answers(),
       st.sampled_from([f"Patient/{PATIENT}", "RelatedPerson/1", None]))
def test_property_a_patient_authored_response_never_changes_candidacy_or_care(
        body: dict[str, Any], items: dict[str, Any], author: str | None) -> None:
    def results(b: dict[str, Any]) -> list[Rated]:
        request = HookRequest.model_validate(b)
        rec = record_from_prefetch(request.prefetch, request.context.patientId)
        return ENGINE.rate(request, rec, NOW)
    with_answers = copy.deepcopy(body)
    with_answers.setdefault("prefetch", {})["questionnaireresponses"] = bundle(
        response(items, author=author))
    for before, after in zip(results(body), results(with_answers), strict=True):
        for name in ("intervention_candidate", "conservative_care", "duration"):
            assert after.facts.fact(name) == before.facts.fact(name), name
        assert after.facts.care_weeks == before.facts.care_weeks
        assert after.facts.care_states == before.facts.care_states
        for flag in before.facts.red_flags():  # a patient's answer never settles one to no
            if flag.value is not Tri.NO:
                assert after.facts.fact(flag.name).value is flag.value
