"""Clinical-safety properties over generated records (issue 10).

Records mix red-flag diagnoses and symptoms (recent, old, resolved, undated), care (therapy,
medication), referrals, order reasons and priorities, and prefetch keys that are absent or
broken. Whatever the record, the answer must hold:

1. no cancel (``delete``) where a red flag is recorded or unknown, or the order is urgent;
2. no warning on an order that is Usually Appropriate in any variant that may apply;
3. at most one card per order;
4. every suggested study is UA or MBA in every possible world.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.clinical.facts import Tri
from cds_service.clinical.scenario import possible_worlds, variants_of
from cds_service.engine import Engine, OrderResult
from cds_service.knowledge import load_knowledge
from cds_service.protocol import HookRequest
from cds_service.record import record_from_prefetch
from cds_service.render import load_templates
from tests.builders import ICD, condition, day, hook_request, order, procedure, seed_prefetch
from tests.conftest import FIXTURE_NOW, ROOT, dev_settings

NOW = FIXTURE_NOW
KNOWLEDGE = load_knowledge()
ENGINE = Engine(KNOWLEDGE, load_templates(ROOT / "cards"), dev_settings())

# (code, text) pairs: red flags as diagnoses and as symptoms, look-alikes that are not red flags.
CODES = [("G83.4", "Cauda equina syndrome"), ("R33.9", "Urinary retention"),
         ("R20.0", "Saddle anaesthesia"), ("R20.2", "Tingling in the leg"),
         ("R15.9", "Faecal incontinence"), ("M21.372", "Foot drop"), ("R50.9", "Fever"),
         ("F11.20", "Opioid use disorder"), ("R78.81", "Bacteraemia"), ("C61", "Prostate cancer"),
         ("C44.91", "Basal cell carcinoma"), ("Z85.828", "History of skin cancer"),
         ("R63.4", "Weight loss"), ("D84.9", "Immunodeficiency"), ("M96.1", "Postlaminectomy"),
         ("Z98.1", "Arthrodesis status"), ("S32.010A", "Lumbar fracture"),
         ("M81.0", "Osteoporosis"), ("Z79.52", "Steroids"), ("Z95.0", "Pacemaker"),
         ("M54.50", "Low back pain"), ("M54.16", "Radiculopathy"), ("I10", "Hypertension")]
REASONS = ["M54.16", "M54.50", "R33.9", "R20.0", "M21.372", "R50.9", "C61", "N20.0", "Z98.1"]
CPTS = ["72100", "72148", "72149", "72158", "72131", "72132", "72133", "78306", "78816",
        "72295"]
PRIORITIES = [None, "routine", "urgent", "stat", "asap"]
RED_FLAG_FACTS = ("cauda_equina", "neuro_deficit", "cancer", "infection", "immunosuppression",
                  "prior_surgery", "trauma", "osteoporosis", "elderly", "steroids")


@st.composite
def hook_calls(draw: st.DrawFn, allow_mri_safety: bool = True) -> dict[str, Any]:
    prefetch = seed_prefetch(NOW)
    lbp = prefetch["conditions"]["entry"][0]["resource"]
    lbp["onsetDateTime"] = day(NOW, draw(st.sampled_from([3, 20, 45, 112, 400])))
    codes = [c for c in CODES if allow_mri_safety or c[0] != "Z95.0"]
    for i in range(draw(st.integers(0, 4))):
        code, text = draw(st.sampled_from(codes))
        onset = draw(st.one_of(st.none(), st.sampled_from([1, 10, 60, 200, 900])))
        cond = condition(f"x{i}", code, day(NOW, onset) if onset is not None else None,
                         status=draw(st.sampled_from(["active", "active", "resolved"])))
        cond["code"]["text"] = text
        prefetch["conditions"]["entry"].append({"resource": cond})
    prefetch["procedures"]["entry"] = [
        {"resource": procedure(f"p{i}", draw(st.sampled_from(["97110", "98940", "63030",
                                                               "72148", "62323"])),
                               day(NOW, draw(st.sampled_from([5, 20, 50, 90, 700]))))}
        for i in range(draw(st.integers(0, 3)))]
    if draw(st.booleans()):
        prefetch["medications"]["entry"].append({"resource": {
            "resourceType": "MedicationRequest", "id": "rx", "status": "active",
            "intent": "order", "subject": {"reference": "Patient/pt-seed"},
            "medicationCodeableConcept": {"text": "Naproxen 500 mg tablet"},
            "authoredOn": day(NOW, draw(st.sampled_from([10, 30, 60])))}})
    if draw(st.booleans()):
        referral = order("ref", cpt="62323")
        referral.update(status="active", authoredOn=day(NOW, 5))
        prefetch["servicerequests"]["entry"].append({"resource": referral})
    for key in list(prefetch):
        mode = draw(st.sampled_from(["keep", "keep", "keep", "drop", "outcome"]))
        if mode == "drop":
            del prefetch[key]
        elif mode == "outcome":
            prefetch[key] = {"resourceType": "OperationOutcome", "issue": []}
    drafts = []
    for i in range(draw(st.integers(1, 3))):
        draft = order(f"d{i}", cpt=draw(st.sampled_from(CPTS)), reason=None)
        reasons = draw(st.lists(st.sampled_from(REASONS), max_size=2, unique=True))
        if reasons:
            draft["reasonCode"] = [{"coding": [{"system": ICD, "code": r}]} for r in reasons]
        priority = draw(st.sampled_from(PRIORITIES))
        if priority:
            draft["priority"] = priority
        drafts.append(draft)
    hook = draw(st.sampled_from(["order-select", "order-sign"]))
    return hook_request(*drafts, hook=hook, prefetch=prefetch)


def evaluate(body: dict[str, Any]) -> list[OrderResult]:
    request = HookRequest.model_validate(body)
    record = record_from_prefetch(request.prefetch, request.context.patientId)
    return ENGINE.answer(ENGINE.rate(request, record, NOW)).orders


def possible_variants(result: OrderResult) -> list[frozenset[str]]:
    facts = result.facts
    return [variants_of(w, facts.assume_candidate) for w in possible_worlds(facts)]


def suggested_procedures(result: OrderResult) -> list[str]:
    out = []
    for card in result.cards:
        for suggestion in card.suggestions or []:
            for action in suggestion.actions:
                if action.type == "update" and action.resource is not None:
                    proc = KNOWLEDGE.procedure_of(action.resource["code"]["coding"])
                    assert proc is not None
                    out.append(proc.id)
    return out


def deletes(result: OrderResult) -> int:
    return sum(a.type == "delete" for c in result.cards for s in c.suggestions or []
               for a in s.actions)


PROPERTY_SETTINGS = settings(max_examples=300, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(hook_calls())
def test_no_cancel_with_a_red_flag_recorded_or_unknown_or_an_urgent_order(
        body: dict[str, Any]) -> None:
    for r in evaluate(body):
        flags = [getattr(r.facts, n).value for n in RED_FLAG_FACTS]
        if any(v is not Tri.NO for v in flags) or r.facts.urgent:
            assert deletes(r) == 0, (flags, r.facts.urgent)
        for card in r.cards:
            for s in card.suggestions or []:
                if any(a.type == "delete" for a in s.actions):
                    assert not s.isRecommended


@PROPERTY_SETTINGS
@given(hook_calls(allow_mri_safety=False))
def test_no_warning_on_an_order_usually_appropriate_in_a_variant_that_may_apply(
        body: dict[str, Any]) -> None:
    for r in evaluate(body):
        ratings = KNOWLEDGE.ratings[r.procedure.id]
        may_apply = set().union(*possible_variants(r))
        if any(ratings[v] == "UA" for v in may_apply):
            assert all(c.indicator != "warning" for c in r.cards), (may_apply, r.kinds)


@PROPERTY_SETTINGS
@given(hook_calls())
def test_at_most_one_card_per_order(body: dict[str, Any]) -> None:
    results = evaluate(body)
    for r in results:
        assert len(r.cards) <= 1, r.kinds
    assert len({r.order["id"] for r in results}) == len(results)


@PROPERTY_SETTINGS
@given(hook_calls())
def test_every_suggested_study_is_ua_or_mba_in_every_possible_world(
        body: dict[str, Any]) -> None:
    for r in evaluate(body):
        suggested = suggested_procedures(r)
        if not suggested:
            continue
        for variants in possible_variants(r):
            if not variants:
                continue  # a world where no criteria apply rates nothing
            for pid in suggested:
                assert KNOWLEDGE.category(pid, variants) != "UNA", (pid, variants)
