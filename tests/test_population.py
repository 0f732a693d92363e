"""Issue 21, classes 1, 2, 3, 11 and 13: who the criteria are for (adults; not high-energy
trauma), which variant rates the order when several apply (V4 alone; V7's own study), trauma in
an ankylosed spine, a new deficit with an X-ray or CT, dorsalgia. Unit tests on the rules and the
policy, and properties over generated records."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cds_service.clinical.facts import Tri
from cds_service.clinical.model import ClinicalParams
from cds_service.knowledge import PAMA_CODE
from tests.builders import ICD, condition, day, seed_prefetch
from tests.conftest import FIXTURE_NOW
from tests.test_alert_policy import V1, V3, choice, facts, rated, suggested
from tests.test_clinical import rate
from tests.test_safety_properties import (
    ENGINE,
    KNOWLEDGE,
    PROPERTY_SETTINGS,
    evaluate,
    hook_calls,
)

NOW = FIXTURE_NOW
LUMBAR = [p for p in KNOWLEDGE.procedures.values() if p.region == "lumbar"]


def aged(years: int, days: int = 40) -> dict[str, Any]:
    prefetch = seed_prefetch(NOW)
    prefetch["patient"]["birthDate"] = day(NOW, years * 365 + days)
    return prefetch


def with_conditions(prefetch: dict[str, Any], *conditions: dict[str, Any]) -> dict[str, Any]:
    prefetch["conditions"]["entry"] += [{"resource": c} for c in conditions]
    return prefetch


# ------------------------------------------------------------------ 1. children


@pytest.mark.parametrize(("years", "value"), [(12, Tri.YES), (17, Tri.YES), (18, Tri.NO),
                                              (58, Tri.NO)])
def test_the_child_fact_follows_the_adult_age(years: int, value: Tri) -> None:
    f, _ = rate(aged(years), "mri-wo")
    assert f.child.value is value


def test_a_birth_year_that_straddles_18_or_no_patient_leaves_the_age_unknown() -> None:
    prefetch = seed_prefetch(NOW)
    prefetch["patient"]["birthDate"] = str(NOW.year - 18)  # 17 or 18 today
    f, _ = rate(prefetch, "mri-wo")
    assert f.child.value is Tri.UNKNOWN
    prefetch = seed_prefetch(NOW)
    del prefetch["patient"]
    f, _ = rate(prefetch, "mri-wo")
    assert f.child.value is Tri.UNKNOWN and f.child.missing == ["patient"]


def test_the_adult_age_is_a_setting() -> None:
    f, decision = rate(aged(19), "xr-lumbar", params=ClinicalParams(adult_age=21))
    assert f.child.value is Tri.YES and decision.pama == "no-criteria-apply"


@pytest.mark.parametrize("proc", [p.id for p in LUMBAR])
def test_a_child_is_outside_the_criteria_with_no_card(proc: str) -> None:
    f = facts(child=Tri.YES, **V1)
    assert rated(proc, f).decision.pama == "no-criteria-apply"
    assert choice(proc, f) is None
    f = facts(child=Tri.YES, cauda_equina=Tri.YES)
    assert choice(proc, f) is None


def test_an_unknown_age_is_rated_as_an_adult_but_never_offered_a_cancel() -> None:
    known = choice("mri-wo", facts(**V1))
    unknown = choice("mri-wo", facts(child=Tri.UNKNOWN, **V1))
    assert known is not None and known.kind == "not-appropriate" and known.cancel
    assert unknown is not None and unknown.kind == "not-appropriate" and not unknown.cancel
    assert rated("mri-wo", facts(child=Tri.UNKNOWN, **V1)).decision.determinate


def test_the_card_says_the_age_is_not_recorded_where_it_withholds_the_cancel() -> None:
    f = facts(child=Tri.UNKNOWN, **V1)
    r = rated("mri-wo", f)
    c = choice("mri-wo", f)
    assert c is not None
    card = ENGINE.cards.card(r, c)
    assert "adult age not confirmed" in (card.detail or "")
    adult = rated("mri-wo", facts(**V1))
    card = ENGINE.cards.card(adult, choice("mri-wo", facts(**V1)))  # type: ignore[arg-type]
    assert "adult age not confirmed" not in (card.detail or "")


# ------------------------------------------------------------------ 2. variant precedence


@pytest.mark.parametrize("proc", [p.id for p in LUMBAR])
def test_with_cauda_equina_the_order_is_rated_by_v4_alone(proc: str) -> None:
    f = facts(cauda_equina=Tri.YES, elderly=Tri.YES, prior_surgery=Tri.YES, cancer=Tri.YES)
    decision = rated(proc, f).decision
    category = KNOWLEDGE.ratings[proc]["V4"]
    assert (decision.pama, decision.category) == (PAMA_CODE[category], category)


def test_cauda_equina_at_75_with_an_x_ray_is_critical_and_not_appropriate() -> None:
    f = facts(cauda_equina=Tri.YES, elderly=Tri.YES, duration_categories=frozenset({"acute"}))
    r = rated("xr-lumbar", f)
    assert (r.decision.pama, r.decision.category) == ("not-appropriate", "UNA")
    c = choice("xr-lumbar", f)
    assert c is not None and c.kind == "cauda-equina" and suggested(c) == ["mri-wo"]
    card = ENGINE.cards.card(r, c)
    assert "Usually not appropriate" in (card.detail or "")


@pytest.mark.parametrize(("red_flags", "variants"), [
    ({"cancer": Tri.YES, "elderly": Tri.YES}, {"V6", "V7"}),
    ({"infection": Tri.YES, "prior_surgery": Tri.YES}, {"V5", "V7"}),
    ({"immunosuppression": Tri.YES, "osteoporosis": Tri.YES}, {"V6", "V7"}),
])
def test_an_x_ray_appropriate_by_another_variant_but_not_for_v7_points_to_mri(
        red_flags: dict[str, Tri], variants: set[str]) -> None:
    f = facts(**red_flags)
    r = rated("xr-lumbar", f)
    assert r.decision.variants == variants
    assert (r.decision.pama, r.decision.category) == ("appropriate", "UA")
    c = choice("xr-lumbar", f)
    assert c is not None and c.kind == "suspicion" and suggested(c) == ["mri-wo"]
    assert all(KNOWLEDGE.ratings["mri-wo"][v] == "UA" for v in variants)


def test_the_suspicion_card_names_the_suspicion_and_the_study_in_its_summary() -> None:
    f = facts(cancer=Tri.YES, elderly=Tri.YES)
    r = rated("xr-lumbar", f)
    card = ENGINE.cards.card(r, choice("xr-lumbar", f))  # type: ignore[arg-type]
    assert card.indicator == "info"
    assert "cancer" in card.summary and "MRI without contrast" in card.summary
    assert card.suggestions and card.suggestions[0].isRecommended


def test_no_suspicion_card_where_the_order_is_ua_for_v7_or_the_study_is_drafted() -> None:
    f = facts(cancer=Tri.YES, elderly=Tri.YES)
    assert choice("mri-wo", f) is None
    assert choice("mri-wwo", f) is None  # UA in V7 (MBA in V6): the best category, no card
    assert choice("xr-lumbar", f, drafted=frozenset({"mri-wo"})) is None
    ct = choice("ct-wo", f)  # UA in V6, MBA in V7
    assert ct is not None and ct.kind == "suspicion" and suggested(ct) == ["mri-wo"]


def test_no_suspicion_card_suggests_mri_when_mri_is_unsafe() -> None:
    f = facts(cancer=Tri.YES, elderly=Tri.YES, mri_safety=Tri.YES)
    c = choice("xr-lumbar", f)
    assert c is None or "mri-wo" not in suggested(c)


# ------------------------------------------------------------------ 3. trauma


def test_a_fall_from_standing_is_low_velocity_trauma() -> None:
    f, decision = rate(with_conditions(seed_prefetch(NOW),
                                       condition("fall", "W01.0XXA", day(NOW, 2))), "ct-wo")
    assert f.trauma.value is Tri.YES and decision.variants == {"V6"}


def test_an_unstated_fall_counts_only_in_an_ankylosed_spine() -> None:
    fall = condition("fall", "W19.XXXA", day(NOW, 2))
    f, _ = rate(with_conditions(seed_prefetch(NOW), copy.deepcopy(fall)), "xr-lumbar")
    assert f.trauma.value is Tri.UNKNOWN  # an unstated fall alone: asked, never no
    for spine in ("M45.9", "M45.6", "M48.16"):
        f, decision = rate(with_conditions(seed_prefetch(NOW), copy.deepcopy(fall),
                                           condition("as", spine, day(NOW, 4000))), "xr-lumbar")
        assert f.trauma.value is Tri.YES and decision.variants == {"V6"}, spine
        assert {e.code for e in f.trauma.evidence} == {"W19.XXXA", spine}
    # non-radiographic axial spondyloarthritis is not an ankylosed spine: as without one
    f, _ = rate(with_conditions(seed_prefetch(NOW), copy.deepcopy(fall),
                                condition("nr", "M45.A6", day(NOW, 4000))), "xr-lumbar")
    assert f.trauma.value is Tri.UNKNOWN
    # an old fall (still active on the list) is not this episode's trauma: unknown (asked),
    # never yes, ankylosed spine or not
    f, _ = rate(with_conditions(seed_prefetch(NOW), condition("fall", "W19.XXXA", day(NOW, 400)),
                                condition("as", "M45.9", day(NOW, 4000))), "xr-lumbar")
    assert f.trauma.value is Tri.UNKNOWN


@pytest.mark.parametrize("code", ["V43.52XA", "V28.4XXA", "W11.XXXA", "W13.4XXA", "W17.89XA"])
def test_recent_high_energy_trauma_is_outside_the_criteria(code: str) -> None:
    prefetch = with_conditions(seed_prefetch(NOW), condition("hit", code, day(NOW, 1)))
    for proc in ("xr-lumbar", "ct-wo", "mri-wo", "mri-w"):
        f, decision = rate(copy.deepcopy(prefetch), proc)
        assert f.high_energy_trauma.value is Tri.YES
        assert decision.pama == "no-criteria-apply", proc


def test_high_energy_trauma_on_the_order_counts_and_an_old_crash_does_not() -> None:
    f, decision = rate(seed_prefetch(NOW), "xr-lumbar", reason="W11.XXXA")
    assert f.high_energy_trauma.value is Tri.YES and decision.pama == "no-criteria-apply"
    f, decision = rate(with_conditions(seed_prefetch(NOW),
                                       condition("old", "V43.52XA", day(NOW, 900))), "xr-lumbar")
    # not of this episode: unknown, which is rated as no (never outside the criteria by it)
    assert f.high_energy_trauma.value is not Tri.YES and decision.variants == {"V3"}


def test_unknown_high_energy_trauma_leaves_the_order_rated() -> None:
    prefetch = seed_prefetch(NOW)
    prefetch["conditions"] = {"resourceType": "OperationOutcome", "issue": []}
    f, _ = rate(prefetch, "mri-w")
    assert f.high_energy_trauma.value is Tri.UNKNOWN
    r = rated("mri-wo", facts(high_energy_trauma=Tri.UNKNOWN, **V3))
    assert r.decision.determinate and r.decision.pama == "appropriate"
    assert choice("mri-wo", facts(high_energy_trauma=Tri.UNKNOWN, **V1)).cancel is False  # type: ignore[union-attr]


def test_high_energy_trauma_never_gets_a_card() -> None:
    for proc in LUMBAR:
        f = facts(high_energy_trauma=Tri.YES, urgent=True, **V1)
        assert choice(proc.id, f) is None, proc.id


# ------------------------------------------------------------------ 11. a new deficit


@pytest.mark.parametrize("proc", ["xr-lumbar", "ct-wo", "ct-w"])
def test_a_new_deficit_with_an_x_ray_or_ct_points_to_mri(proc: str) -> None:
    f = facts(neuro_deficit=Tri.YES, **V1)
    assert rated(proc, f).decision.pama == "no-criteria-apply"
    c = choice(proc, f)
    assert c is not None and c.kind == "neuro-deficit" and suggested(c) == ["mri-wo"]
    card = ENGINE.cards.card(rated(proc, f), c)
    assert card.indicator == "info" and "MRI without contrast" in card.summary


@pytest.mark.parametrize("proc", ["mri-wo", "mri-wwo", "ct-myelo"])
def test_a_new_deficit_with_mri_or_ct_myelography_gets_no_card(proc: str) -> None:
    assert choice(proc, facts(neuro_deficit=Tri.YES, **V1)) is None


def test_no_deficit_card_when_mri_is_unsafe_or_the_mri_is_drafted_or_another_variant() -> None:
    assert choice("xr-lumbar", facts(neuro_deficit=Tri.YES, mri_safety=Tri.YES)) is None
    assert choice("xr-lumbar", facts(neuro_deficit=Tri.YES),
                  drafted=frozenset({"mri-wo"})) is None
    # with V6 the X-ray is rated (usually appropriate): no deficit card
    assert choice("xr-lumbar", facts(neuro_deficit=Tri.YES, elderly=Tri.YES)) is None


# ------------------------------------------------------------------ 13. dorsalgia


@pytest.mark.parametrize("code", ["M54.9", "M54.89"])
def test_dorsalgia_on_a_lumbar_study_is_back_pain(code: str) -> None:
    f, decision = rate(seed_prefetch(NOW), "mri-wo", reason=code)
    assert f.indication.value is Tri.YES and not f.other_indication
    assert decision.pama == "appropriate"


def test_occipital_neuralgia_is_not_back_pain() -> None:
    f, decision = rate(seed_prefetch(NOW), "mri-wo", reason="M54.81")
    assert f.other_indication and decision.pama == "no-criteria-apply"


# ------------------------------------------------------------------ properties


@st.composite
def population_calls(draw: st.DrawFn) -> dict[str, Any]:
    """The safety properties' records, with an age, trauma and an ankylosed spine drawn."""
    body = draw(hook_calls())
    prefetch = body.setdefault("prefetch", {})
    patient = prefetch.get("patient")
    if isinstance(patient, dict) and patient.get("resourceType") == "Patient":
        years = draw(st.sampled_from([4, 12, 17, 18, 40, 75]))
        patient["birthDate"] = draw(st.sampled_from([day(NOW, years * 365 + 40),
                                                     str(NOW.year - years)]))
    conditions = prefetch.get("conditions")
    if isinstance(conditions, dict) and conditions.get("resourceType") == "Bundle":
        for i, code in enumerate(draw(st.lists(st.sampled_from(
                ["V43.52XA", "W11.XXXA", "W01.0XXA", "W19.XXXA", "M45.9", "M48.16",
                 "G83.4", "R33.9", "M21.372", "C79.51"]), max_size=3))):
            onset = draw(st.sampled_from([1, 30, 400]))
            conditions.setdefault("entry", []).append(
                {"resource": condition(f"pop{i}", code, day(NOW, onset))})
    drafts = body["context"]["draftOrders"]["entry"]
    if draw(st.booleans()):
        first = drafts[0]["resource"]
        first.setdefault("reasonCode", []).append(
            {"coding": [{"system": ICD, "code": draw(st.sampled_from(
                ["V43.52XA", "W11.XXXA", "G83.4", "M54.9"]))}]})
    return body


@PROPERTY_SETTINGS
@given(population_calls())
def test_under_18_no_criteria_apply_and_no_card_whatever_the_record(
        body: dict[str, Any]) -> None:
    for r in evaluate(body):
        if r.facts.child.value is Tri.YES:
            assert not r.cards, r.kind
            if r.procedure.region == "lumbar":
                assert r.decision.pama == "no-criteria-apply"


@PROPERTY_SETTINGS
@given(population_calls())
def test_with_cauda_equina_the_pama_code_is_the_v4_category_of_the_study(
        body: dict[str, Any]) -> None:
    for r in evaluate(body):
        f = r.facts
        if (f.cauda_equina.value is Tri.YES and f.indication.value is Tri.YES
                and f.child.value is not Tri.YES and f.high_energy_trauma.value is not Tri.YES):
            v4 = KNOWLEDGE.ratings[r.procedure.id]["V4"]
            assert (r.decision.pama, r.decision.category) == (PAMA_CODE[v4], v4)
            assert r.kind in (None, "cauda-equina", "mri-safety", "duplicate")


@PROPERTY_SETTINGS
@given(population_calls())
def test_high_energy_trauma_coded_never_a_card_that_says_no_red_flag(
        body: dict[str, Any]) -> None:
    for r in evaluate(body):
        if r.facts.high_energy_trauma.value is Tri.YES:
            assert not r.cards, r.kind
            if r.procedure.region == "lumbar":
                assert r.decision.pama in ("no-criteria-apply", None)


@PROPERTY_SETTINGS
@given(population_calls())
def test_no_cancel_unless_the_patient_is_known_to_be_an_adult(body: dict[str, Any]) -> None:
    for r in evaluate(body):
        if r.facts.child.value is not Tri.NO or r.facts.high_energy_trauma.value is not Tri.NO:
            assert not any(a.type == "delete" for c in r.cards for s in c.suggestions or []
                           for a in s.actions)
