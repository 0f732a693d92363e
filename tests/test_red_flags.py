"""Red flags from symptoms, their time scope, the order's own indication, care (issue 10).

The fixtures cover the reported situations end to end; these tests pin each rule on its own.
"""

from __future__ import annotations

import json
from typing import Any

from cds_service.app import create_app
from cds_service.clinical.facts import Tri
from tests.builders import ICD, bundle, condition, day, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, FIXTURES, SELECT, ValidatingClient, dev_settings
from tests.test_clinical import KNOWLEDGE, rate

NOW = FIXTURE_NOW


def with_conditions(*conds: dict[str, Any], onset: int = 10,
                    therapy: bool = False) -> dict[str, Any]:
    p = seed_prefetch(NOW)
    p["conditions"]["entry"][0]["resource"]["onsetDateTime"] = day(NOW, onset)
    p["conditions"]["entry"] += [{"resource": c} for c in conds]
    if not therapy:
        p["procedures"] = bundle()
    return p


def symptom(cid: str, code: str, text: str, days_ago: int | None,
            status: str = "active") -> dict[str, Any]:
    c = condition(cid, code, day(NOW, days_ago) if days_ago is not None else None, status)
    c["code"]["text"] = text
    return c


def test_bladder_symptom_alone_is_suspected_cauda_equina() -> None:
    facts, d = rate(with_conditions(symptom("r", "R33.9", "Urinary retention", 1)), "mri-wo")
    assert facts.cauda_equina.value is Tri.YES and d.variants == frozenset({"V4"})


def test_skin_anaesthesia_counts_only_beside_bladder_or_bowel_or_named_saddle() -> None:
    leg = symptom("p", "R20.2", "Paraesthesia of the left leg", 2)
    facts, d = rate(with_conditions(leg), "mri-wo")
    assert facts.cauda_equina.value is Tri.NO and d.variants == frozenset({"V1"})
    saddle = symptom("s", "R20.0", "Saddle anaesthesia", 2)
    facts, _ = rate(with_conditions(saddle), "mri-wo")
    assert facts.cauda_equina.value is Tri.YES
    facts, _ = rate(with_conditions(leg, symptom("b", "R15.9", "Faecal incontinence", 1)),
                    "mri-wo")
    assert {e.code for e in facts.cauda_equina.evidence} == {"R20.2", "R15.9"}


def test_red_flag_symptom_before_this_episode_or_undated_is_unknown_never_yes() -> None:
    """Issue 21: a symptom still active from before this episode, or undated, is asked about
    (unknown), never a current red flag; resolved, it is history (no)."""
    old = symptom("r", "R33.9", "Urinary retention", 400)
    facts, d = rate(with_conditions(old), "mri-wo")
    assert facts.cauda_equina.value is Tri.UNKNOWN and d.category is None  # not rated: ask
    undated = symptom("r", "R33.9", "Urinary retention", None)
    facts, _ = rate(with_conditions(undated), "mri-wo")
    assert facts.cauda_equina.value is Tri.UNKNOWN
    assert [e.resource for e in facts.cauda_equina.evidence] == ["Condition/r"]
    resolved = symptom("r", "R33.9", "Urinary retention", 3, status="resolved")
    facts, _ = rate(with_conditions(resolved), "mri-wo")
    assert facts.cauda_equina.value is Tri.NO


def test_symptom_within_a_long_episode_still_counts() -> None:
    fever = symptom("f", "R50.9", "Fever", 150)
    facts, _ = rate(with_conditions(fever, onset=200), "mri-wo")
    assert facts.infection.value is Tri.YES  # in this episode (onset 200 days ago)


def test_drug_use_counts_towards_infection_only_beside_fever() -> None:
    oud = symptom("o", "F11.20", "Opioid use disorder", 900)
    facts, _ = rate(with_conditions(oud), "mri-wo")
    assert facts.infection.value is Tri.UNKNOWN  # alone: neither yes nor no (issue 21: ask)
    assert [e.code for e in facts.infection.evidence] == ["F11.20"]  # shown, not counted
    remission = symptom("o", "F11.21", "Opioid dependence, in remission", 900)
    facts, _ = rate(with_conditions(remission), "mri-wo")
    assert facts.infection.value is Tri.NO  # in remission: not current drug use
    facts, d = rate(with_conditions(oud, symptom("f", "R50.9", "Fever", 2)), "mri-wwo")
    assert {e.code for e in facts.infection.evidence} == {"R50.9", "F11.20"}
    assert d.category == "UA" and d.variants == frozenset({"V7"})


def test_foot_drop_puts_the_patient_outside_v1_to_v3() -> None:
    facts, d = rate(with_conditions(symptom("fd", "M21.371", "Foot drop", 3)), "mri-wo")
    assert facts.neuro_deficit.value is Tri.YES
    assert d.pama == "no-criteria-apply"
    _, d = rate(with_conditions(symptom("fd", "M21.371", "Foot drop", 3)), "mri-w")
    assert d.pama == "not-appropriate"  # but never a study that no variant supports


def test_red_flag_symptom_on_the_order_counts() -> None:
    facts, d = rate(with_conditions(), "mri-wo", reason="R33.9")
    assert facts.cauda_equina.value is Tri.YES and d.category == "UA"
    assert facts.cauda_equina.evidence[0].role == "reason for this order"


def test_cancer_reason_on_a_whole_body_study_is_another_indication() -> None:
    facts, d = rate(seed_prefetch(NOW), "bone-scan", reason="C61")
    assert facts.other_indication and d.pama == "no-criteria-apply"
    facts, d = rate(seed_prefetch(NOW), "mri-wo", reason="C61")  # lumbar MRI, LBP on record
    assert not facts.other_indication and d.variants == frozenset({"V7"})


def test_fusion_without_site_leaves_prior_surgery_unknown_until_confirmed() -> None:
    p = seed_prefetch(NOW)
    p["conditions"]["entry"].append({"resource": condition("z", "Z98.1", day(NOW, 900))})
    facts, _ = rate(p, "mri-w")
    assert facts.prior_surgery.value is Tri.UNKNOWN
    p["procedures"]["entry"].append({"resource": {
        "resourceType": "Procedure", "id": "fusion", "status": "completed",
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "22612"}]},
        "subject": {"reference": "Patient/pt-seed"}, "performedDateTime": day(NOW, 900)}})
    facts, d = rate(p, "mri-w")
    assert facts.prior_surgery.value is Tri.YES and d.variants == frozenset({"V5"})


def medication(mid: str, text: str, days_ago: int, reason: str | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "MedicationRequest", "id": mid, "status": "active",
                           "intent": "order", "subject": {"reference": "Patient/pt-seed"},
                           "medicationCodeableConcept": {"text": text},
                           "authoredOn": day(NOW, days_ago)}
    if reason:
        res["reasonCode"] = [{"coding": [{"system": ICD, "code": reason}]}]
    return res


def test_medication_for_back_pain_is_conservative_care() -> None:
    p = seed_prefetch(NOW)
    p["procedures"] = bundle()
    p["medications"] = bundle(medication("n", "Naproxen 500 mg tablet", 60))
    facts, d = rate(p, "mri-wo")
    assert facts.conservative_care.value is Tri.YES and d.variants == frozenset({"V3"})
    # prescribed for another indication: not back-pain care
    p["medications"] = bundle(medication("g", "Gabapentin 300 mg", 60, reason="E11.40"))
    facts, d = rate(p, "mri-wo")
    assert facts.conservative_care.value is Tri.NO and d.variants == frozenset({"V2"})
    p["medications"] = bundle(medication("x", "Atorvastatin 20 mg", 60, reason="M54.50"))
    facts, _ = rate(p, "mri-wo")
    assert facts.conservative_care.value is Tri.YES  # its reason is low back pain


def test_missing_medication_key_leaves_care_unknown_without_therapy() -> None:
    p = seed_prefetch(NOW)
    p["procedures"] = bundle()
    del p["medications"]
    facts, d = rate(p, "mri-wo")
    assert facts.conservative_care.value is Tri.UNKNOWN and not d.determinate
    assert "conservative_care" in d.deciding


def test_care_under_way_needs_a_candidate_on_record_for_v3() -> None:
    p = seed_prefetch(NOW)
    p["procedures"]["entry"] = p["procedures"]["entry"][:1]
    p["procedures"]["entry"][0]["resource"]["performedDateTime"] = day(NOW, 20)
    facts, d = rate(p, "mri-wo")
    assert facts.care_states == ("under-way",) and d.variants == frozenset({"V2"})
    injection = order("inj", cpt="62323")
    injection.update(status="active", authoredOn=day(NOW, 2))
    p["servicerequests"] = bundle(injection)
    _, d = rate(p, "mri-wo")
    assert d.variants == frozenset({"V3"}) and d.category == "UA"


def test_ct_myelography_from_its_companion_code() -> None:
    ct = KNOWLEDGE.procedures["ct-w"]
    codings = [{"system": "http://www.ama-assn.org/go/cpt", "code": "72132"}]
    assert KNOWLEDGE.combined_procedure(ct, codings).id == "ct-w"
    codings.append({"system": "http://www.ama-assn.org/go/cpt", "code": "62284"})
    assert KNOWLEDGE.combined_procedure(ct, codings).id == "ct-myelo"
    loinc = [{"system": "http://loinc.org", "code": "44114-7"}]
    assert KNOWLEDGE.procedure_of(loinc).id == "ct-myelo"


def test_outside_every_scenario_the_card_says_so_not_that_history_is_missing() -> None:
    """A severe neurological deficit alone fits no variant; MRI with contrast is not
    appropriate in any: the card says the findings fit none, never that history is missing."""
    body = json.loads((FIXTURES / "requests" / "neuro-deficit-foot-drop-mri-wo.json").read_text())
    body["context"]["draftOrders"]["entry"][0]["resource"]["code"]["coding"] = [
        {"system": "http://www.ama-assn.org/go/cpt", "code": "72149"}]
    with ValidatingClient(create_app(dev_settings(), clock=lambda: FIXTURE_NOW)) as c:
        card = c.post(SELECT, json=body).json()["cards"][0]
    assert "the recorded findings fit none of them" in card["detail"]
    assert "every scenario of these criteria" in card["detail"]
    assert "not documented" not in card["detail"] and "leaves open" not in card["detail"]
