"""The pure clinical core: facts, scenario, rating, possible worlds."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from cds_service.clinical.facts import ClinicalParams, Tri, derive_facts, scan_record
from cds_service.clinical.scenario import CANCEL, decide
from cds_service.knowledge import load_knowledge
from cds_service.record import record_from_prefetch
from tests.builders import PATIENT, bundle, condition, day, order, procedure, seed_prefetch
from tests.conftest import FIXTURE_NOW

KNOWLEDGE = load_knowledge()
NOW = FIXTURE_NOW

# The ACR Low Back Pain rating matrix as the reference page gives it (V1..V7).
MATRIX = {
    "xr-lumbar": "UNA UNA MBA UNA UA UA MBA(D)",
    "mri-wo": "UNA UNA UA UA UA UA UA",
    "mri-wwo": "UNA UNA MBA UA UA MBA UA",
    "mri-w": "UNA UNA UNA UNA UNA UNA UNA",
    "ct-wo": "UNA UNA MBA MBA MBA UA MBA",
    "ct-w": "UNA UNA UNA UNA UNA UNA MBA",
    "ct-wwo": "UNA UNA UNA UNA UNA UNA UNA",
    "ct-myelo": "UNA UNA MBA MBA MBA MBA MBA",
    "discography": "UNA UNA UNA UNA UNA UNA UNA",
    "bone-scan": "UNA UNA MBA UNA UNA UNA UNA",
    "fdg-pet": "UNA UNA UNA UNA UNA UNA UNA",
}
VARIANTS = ["V1", "V2", "V3", "V4", "V5", "V6", "V7"]
PAMA = {"UA": "appropriate", "MBA": "appropriate", "MBA(D)": "appropriate",
        "UNA": "not-appropriate"}


def variant_prefetch(variant: str) -> dict[str, Any]:
    """A record that puts the patient in exactly one variant."""
    p = seed_prefetch(NOW)
    conditions = p["conditions"]["entry"]
    if variant == "V1":
        conditions[0]["resource"]["onsetDateTime"] = day(NOW, 10)
        p["procedures"] = bundle()
    elif variant == "V2":
        p["procedures"] = bundle()
    extra = {"V4": "G83.4", "V5": "M96.1", "V6": "M81.0", "V7": "C79.51"}.get(variant)
    if extra:
        conditions.append({"resource": condition("c-extra", extra, day(NOW, 20))})
    return p


def rate(prefetch: dict[str, Any] | None, cpt_or_proc: str, reason: str | None = "M54.16",
         params: ClinicalParams | None = None) -> Any:
    proc = KNOWLEDGE.procedures[cpt_or_proc]
    draft = order(cpt="0")
    draft["code"] = {"coding": [dict(proc.order_codes[0])]}
    if reason is None:
        draft.pop("reasonCode")
    else:
        draft["reasonCode"][0]["coding"][0]["code"] = reason
    record = record_from_prefetch(prefetch, PATIENT)
    facts = derive_facts(scan_record(record, KNOWLEDGE), draft, [draft], KNOWLEDGE, NOW, params,
                         lumbar=proc.region == "lumbar")
    return facts, decide(facts, KNOWLEDGE, proc)


def test_knowledge_matrix_matches_reference() -> None:
    for proc, row in MATRIX.items():
        assert KNOWLEDGE.ratings[proc] == dict(zip(VARIANTS, row.split(), strict=True)), proc


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("proc", list(MATRIX))
def test_rating_matrix_end_to_end(variant: str, proc: str) -> None:
    """Every cell: a record built for the variant rates the procedure as the matrix says."""
    facts, decision = rate(variant_prefetch(variant), proc)
    expected = MATRIX[proc].split()[VARIANTS.index(variant)]
    assert decision.variants == frozenset({variant})
    assert decision.determinate
    assert decision.category == expected
    assert decision.pama == PAMA[expected]


def test_best_category_over_two_variants() -> None:
    # Prior surgery (V5: X-ray UA) and cancer (V7: X-ray MBA(D)) -> UA.
    p = seed_prefetch(NOW)
    p["conditions"]["entry"] += [{"resource": condition("a", "M96.1", day(NOW, 400))},
                                 {"resource": condition("b", "C79.51", day(NOW, 30))}]
    _, d = rate(p, "xr-lumbar")
    assert d.variants == frozenset({"V5", "V7"}) and d.category == "UA"


def test_seed_alternatives() -> None:
    _, d = rate(seed_prefetch(NOW), "mri-w")
    assert [a.procedure.id for a in d.alternatives] == ["mri-wo"]
    _, d = rate(seed_prefetch(NOW), "ct-wwo")
    assert [a.procedure.id for a in d.alternatives] == ["mri-wo"]


def test_prior_surgery_keeps_contrast_intent() -> None:
    _, d = rate(variant_prefetch("V5"), "mri-w")
    assert d.category == "UNA"
    assert [a.procedure.id for a in d.alternatives] == ["mri-wwo"]


def test_fracture_risk_same_modality_first() -> None:
    _, d = rate(variant_prefetch("V6"), "ct-w")
    assert [a.procedure.id for a in d.alternatives] == ["ct-wo"]


def test_acute_pain_suggests_cancelling() -> None:
    _, d = rate(variant_prefetch("V1"), "mri-wo")
    assert d.pama == "not-appropriate" and d.alternatives == CANCEL


def test_mri_safety_skips_mri_and_offers_ct_first() -> None:
    p = seed_prefetch(NOW)
    p["conditions"]["entry"].append({"resource": condition("pm", "Z95.0", day(NOW, 900))})
    facts, d = rate(p, "mri-w")
    assert facts.mri_safety.value is Tri.YES
    assert d.fallback
    # never radiography in place of a cross-sectional study
    assert [a.procedure.id for a in d.alternatives][:2] == ["ct-wo", "ct-myelo"]


def test_recorded_date_is_a_lower_bound_on_duration() -> None:
    p = seed_prefetch(NOW)
    lbp = p["conditions"]["entry"][0]["resource"]
    del lbp["onsetDateTime"]
    lbp["recordedDate"] = day(NOW, 140)
    facts, d = rate(p, "mri-wo")
    assert facts.duration_categories == frozenset({"chronic"})
    assert d.category == "UA"
    assert ("duration-from-recorded-date", {}) in facts.assumptions


def test_recent_recorded_date_leaves_duration_open() -> None:
    p = seed_prefetch(NOW)
    lbp = p["conditions"]["entry"][0]["resource"]
    del lbp["onsetDateTime"]
    lbp["recordedDate"] = day(NOW, 7)
    facts, _ = rate(p, "mri-wo")
    assert facts.duration_categories == frozenset({"acute", "subacute", "chronic"})


def test_onset_age_and_period() -> None:
    p = seed_prefetch(NOW)
    lbp = p["conditions"]["entry"][0]["resource"]
    del lbp["onsetDateTime"]
    lbp["onsetPeriod"] = {"start": day(NOW, 200)}
    facts, _ = rate(p, "mri-wo")
    assert facts.duration_categories == frozenset({"chronic"})
    del lbp["onsetPeriod"]
    p["patient"]["birthDate"] = day(NOW, 58 * 365)
    lbp["onsetAge"] = {"value": 58, "unit": "a", "system": "http://unitsofmeasure.org",
                       "code": "a"}
    facts, _ = rate(p, "mri-wo")
    assert "acute" in facts.duration_categories


def test_therapy_from_an_earlier_episode_does_not_count() -> None:
    p = seed_prefetch(NOW)
    p["conditions"]["entry"][0]["resource"]["onsetDateTime"] = day(NOW, 35)
    p["conditions"]["entry"].append({"resource": condition("old", "M54.50", day(NOW, 900),
                                                           status="resolved")})
    p["procedures"] = bundle(procedure("old-pt", "97110", day(NOW, 800)))
    facts, d = rate(p, "mri-wo")
    assert facts.conservative_care.value is Tri.NO
    assert d.variants == frozenset({"V2"}) and d.category == "UNA"


def test_refuted_and_entered_in_error_conditions_never_count() -> None:
    p = seed_prefetch(NOW)
    ces = condition("ces", "G83.4", day(NOW, 3))
    ces["verificationStatus"] = {"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
        "code": "refuted"}]}
    p["conditions"]["entry"].append({"resource": ces})
    facts, d = rate(p, "mri-w")
    assert facts.cauda_equina.value is Tri.NO and d.variants == frozenset({"V3"})


def test_resolved_cancer_counts_as_history_but_resolved_infection_does_not() -> None:
    p = seed_prefetch(NOW)
    p["conditions"]["entry"] += [
        {"resource": condition("ca", "C50.911", day(NOW, 2000), status="resolved")},
        {"resource": condition("inf", "M46.26", day(NOW, 1000), status="resolved")}]
    facts, _ = rate(p, "mri-w")
    assert facts.cancer.value is Tri.YES and facts.infection.value is Tri.NO


def test_non_lbp_reason_gives_no_criteria_apply() -> None:
    _, d = rate(seed_prefetch(NOW), "mri-wo", reason="N20.0")
    assert d.pama == "no-criteria-apply"


def test_no_reason_falls_back_to_problem_list() -> None:
    _, d = rate(seed_prefetch(NOW), "mri-w", reason=None)
    assert d.pama == "not-appropriate" and d.variants == frozenset({"V3"})


def test_assumption_can_be_switched_off() -> None:
    params = ClinicalParams(assume_candidate_after_failed_care=False)
    facts, d = rate(seed_prefetch(NOW), "mri-wo", params=params)
    assert d.variants == frozenset({"V2"}) and d.category == "UNA"
    assert not facts.candidate_assumed


def test_referral_in_drafts_makes_candidate_without_assumption() -> None:
    params = ClinicalParams(assume_candidate_after_failed_care=False)
    p = seed_prefetch(NOW)
    draft = order(cpt="0")
    draft["code"] = {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "72148"}]}
    injection = order("inj", cpt="62323")
    record = record_from_prefetch(p, PATIENT)
    facts = derive_facts(scan_record(record, KNOWLEDGE), draft, [draft, injection], KNOWLEDGE,
                         NOW, params)
    assert facts.intervention_candidate.value is Tri.YES
    d = decide(facts, KNOWLEDGE, KNOWLEDGE.procedures["mri-wo"])
    assert d.variants == frozenset({"V3"}) and d.category == "UA"


def test_elderly_from_birth_date_and_partial_birth_year() -> None:
    p = seed_prefetch(NOW)
    p["patient"]["birthDate"] = str(NOW.year - 72)  # 71 or 72: over 70
    facts, d = rate(p, "xr-lumbar")
    assert facts.elderly.value is Tri.YES and d.variants == frozenset({"V6"})
    p["patient"]["birthDate"] = str(NOW.year - 71)  # 70 or 71 depending on the day
    facts, _ = rate(p, "xr-lumbar")
    assert facts.elderly.value is Tri.UNKNOWN
    p["patient"]["birthDate"] = str(NOW.year - 70)  # 69 or 70: not over 70
    facts, _ = rate(p, "xr-lumbar")
    assert facts.elderly.value is Tri.NO
    facts, _ = rate(p, "xr-lumbar", params=ClinicalParams(elderly_over_age=65))
    assert facts.elderly.value is Tri.YES


def test_recent_trauma_only_when_recent() -> None:
    """Trauma counts when dated in this episode; an active code from before it is unknown (ask),
    a resolved one is history (no)."""
    p = seed_prefetch(NOW)
    p["conditions"]["entry"].append({"resource": condition("fx", "S32.010A",
                                                           day(NOW, 400))})
    facts, _ = rate(p, "mri-w")
    assert facts.trauma.value is Tri.UNKNOWN
    p["conditions"]["entry"][-1]["resource"]["clinicalStatus"]["coding"][0]["code"] = "resolved"
    facts, _ = rate(p, "mri-w")
    assert facts.trauma.value is Tri.NO
    p["conditions"]["entry"][-1]["resource"]["clinicalStatus"]["coding"][0]["code"] = "active"
    p["conditions"]["entry"][-1]["resource"]["onsetDateTime"] = day(NOW, 20)
    facts, _ = rate(p, "mri-w")
    assert facts.trauma.value is Tri.YES


def test_recent_mri_window() -> None:
    p = seed_prefetch(NOW)
    p["procedures"]["entry"].append({"resource": procedure("mri", "72148", day(NOW, 120))})
    facts, _ = rate(p, "mri-wo")
    assert facts.recent_mri.value is Tri.YES
    p["procedures"]["entry"][-1]["resource"]["performedDateTime"] = day(NOW, 500)
    facts, _ = rate(p, "mri-wo")
    assert facts.recent_mri.value is Tri.NO


def test_evaluation_time_is_an_input() -> None:
    """The same record is acute now and subacute five weeks later."""
    p = variant_prefetch("V1")
    record = record_from_prefetch(p, PATIENT)
    draft = order(cpt="72148")
    scan = scan_record(record, KNOWLEDGE)
    early = derive_facts(scan, draft, [draft], KNOWLEDGE, NOW)
    later = derive_facts(scan, draft, [draft], KNOWLEDGE, NOW + timedelta(weeks=5))
    assert early.duration_categories == frozenset({"acute"})
    assert later.duration_categories == frozenset({"subacute"})


def test_completed_spine_referral_in_history_makes_candidate() -> None:
    params = ClinicalParams(assume_candidate_after_failed_care=False)
    p = seed_prefetch(NOW)
    referral = order("ref-1", cpt="0", reason="M54.16")
    referral.update(status="completed", intent="order", authoredOn=day(NOW, 20),
                    category=[{"text": "Referral"}])
    referral["code"] = {"text": "Referral to spine surgery"}
    p["servicerequests"] = bundle(referral)
    facts, d = rate(p, "mri-wo", params=params)
    assert facts.intervention_candidate.value is Tri.YES
    assert d.variants == frozenset({"V3"}) and d.category == "UA"
    referral["status"] = "revoked"
    facts, d = rate(p, "mri-wo", params=params)
    assert facts.intervention_candidate.value is Tri.NO
    assert d.variants == frozenset({"V2"})
