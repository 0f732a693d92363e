"""The alert policy (``cds_service.answer.policy.choose_card``), one test per row of the card table
of the design (shared/design/product.md, "Cards (alert policy)"), on facts set by hand and the
decision the clinical core makes of them.

Rows the policy does not build yet, because the facts they need are not read yet, come with the
clinical precision issue; they are not faked here. The duplicate row (issue 21) is tested on a Rated
carrying the duplicate by hand. The rows of issue 21's population and precedence (a child,
high-energy trauma, V4 alone, V7's study, a new deficit with an X-ray or CT) are tested in
tests/test_population.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cds_service.answer.policy import CardChoice, choose_card, may_cancel
from cds_service.answer.rating import Duplicate, Rated
from cds_service.clinical.model import Evidence, Fact, Facts, Tri
from cds_service.clinical.registry import NAMES
from cds_service.clinical.scenario import decide
from cds_service.knowledge import load_knowledge
from cds_service.render import load_templates
from tests.conftest import ROOT

KNOWLEDGE = load_knowledge()
NOW = datetime(2026, 12, 3, tzinfo=UTC)
ONSET = Evidence("Condition/lbp", "http://hl7.org/fhir/sid/icd-10-cm", "M54.50", "Low back pain",
                 "2026-08-01", "onset of low back pain")


def facts(**values: Any) -> Facts:
    """Every fact no (the indication and a dated chronic onset yes) unless given: a fact name
    takes a Tri, any other field of Facts its value."""
    made = {name: Fact(name, Tri.NO) for name in NAMES}
    made["indication"] = Fact("indication", Tri.YES)
    made["duration"] = Fact("duration", Tri.YES, [ONSET])
    extra: dict[str, Any] = {"duration_categories": frozenset({"chronic"}),
                             "duration_dated": True}
    for key, value in values.items():
        if key in made:
            made[key] = Fact(key, value)
        else:
            extra[key] = value
    return Facts(**made, **extra)


def rated(procedure: str, f: Facts, drafted: frozenset[str] = frozenset()) -> Rated:
    proc = KNOWLEDGE.procedures[procedure]
    order = {"resourceType": "ServiceRequest", "id": "o1", "status": "draft"}
    return Rated(order, proc, f, decide(f, KNOWLEDGE, proc), (), drafted, NOW)


def choice(procedure: str, f: Facts, drafted: frozenset[str] = frozenset()) -> CardChoice | None:
    return choose_card(rated(procedure, f, drafted), KNOWLEDGE)


def suggested(c: CardChoice | None) -> list[str]:
    assert c is not None
    return [a.procedure.id for a in c.options]


V3 = {"conservative_care": Tri.YES, "care_weeks": 8.0, "care_states": ("done",),
      "intervention_candidate": Tri.YES}
V1 = {"duration_categories": frozenset({"acute"})}


def test_every_kind_has_an_indicator_as_the_table_says() -> None:
    kinds = load_templates(ROOT / "cards").kinds
    assert {k: v.indicator for k, v in kinds.items()} == {
        "not-appropriate": "warning", "better-alternative": "info", "cauda-equina": "critical",
        "mri-safety": "warning", "recent-mri": "info", "missing-data": "info",
        "urgent-order": "info", "duplicate": "info", "suspicion": "info",
        "neuro-deficit": "info", "contrast-risk": "info", "mri-scanned": "info"}


def test_order_una_gets_a_warning_with_the_closest_ua_alternative() -> None:
    c = choice("mri-w", facts(**V3))  # MRI with contrast in V3: MRI without contrast
    assert c is not None and c.kind == "not-appropriate" and not c.cancel
    assert suggested(c) == ["mri-wo"]


def test_the_alternative_keeps_the_contrast_intent_across_modalities() -> None:
    c = choice("ct-w", facts(**V3, cancer=Tri.YES))  # V7: CT with contrast is MBA, not UNA
    assert c is None or c.kind != "not-appropriate"
    c = choice("ct-wwo", facts(**V3, prior_surgery=Tri.YES))  # V5: MRI without and with
    assert c is not None and c.kind == "not-appropriate" and suggested(c) == ["mri-wwo"]


def test_never_radiography_in_place_of_a_cross_sectional_study() -> None:
    c = choice("ct-wwo", facts(**V3, trauma=Tri.YES))  # V6: X-ray is UA there, CT is not
    assert c is not None and "xr-lumbar" not in suggested(c)


def test_una_with_no_appropriate_study_offers_a_cancel_only_under_the_rule() -> None:
    c = choice("mri-wo", facts(**V1))  # acute, no red flags, routine, dated: cancel
    assert c == CardChoice("not-appropriate", [], True)


@pytest.mark.parametrize("values", [
    {"urgent": True},
    {"cancer": Tri.UNKNOWN},
    {"elderly": Tri.UNKNOWN},
    {"duration_dated": False},
    {"care_weeks": 2.0, "care_states": ("under-way",)},
], ids=["urgent", "red-flag-unknown", "age-unknown", "onset-undated", "care-under-way"])
def test_no_cancel_unless_routine_with_red_flags_absent_dated_and_no_care(
        values: dict[str, Any]) -> None:
    f = facts(**V1, **values)
    assert not may_cancel(f)
    c = choice("mri-wo", f)
    assert c is None or not c.cancel


def test_an_urgent_order_is_never_told_to_cancel() -> None:
    c = choice("mri-wo", facts(**V1, urgent=True))
    assert c == CardChoice("urgent-order", [], False)


def test_order_mba_with_a_ua_alternative_gets_info_with_that_suggestion() -> None:
    c = choice("xr-lumbar", facts(**V3))  # X-ray is MBA in V3
    assert c is not None and c.kind == "better-alternative" and suggested(c) == ["mri-wo"]


def test_order_mba_whose_alternative_is_already_drafted_gets_no_card() -> None:
    assert choice("xr-lumbar", facts(**V3), drafted=frozenset({"mri-wo"})) is None


def test_order_ua_gets_no_card() -> None:
    r = rated("mri-wo", facts(**V3))
    assert r.decision.pama == "appropriate" and r.decision.category == "UA"
    assert choose_card(r, KNOWLEDGE) is None


@pytest.mark.parametrize("procedure", ["xr-lumbar", "ct-wo"])
def test_cauda_equina_with_a_study_not_ua_for_v4_is_critical_with_mri(procedure: str) -> None:
    f = facts(**V3, cauda_equina=Tri.YES, elderly=Tri.YES)  # age must not make it "fine"
    c = choice(procedure, f)
    assert c is not None and c.kind == "cauda-equina" and suggested(c) == ["mri-wo"]


def test_cauda_equina_with_mri_unsafe_suggests_ct_myelography_first() -> None:
    c = choice("xr-lumbar", facts(**V3, cauda_equina=Tri.YES, mri_safety=Tri.YES))
    assert c is not None and c.kind == "cauda-equina" and suggested(c) == ["ct-myelo"]


@pytest.mark.parametrize("procedure", ["mri-wo", "mri-wwo"])
def test_cauda_equina_with_mri_ordered_gets_no_card(procedure: str) -> None:
    assert choice(procedure, facts(**V3, cauda_equina=Tri.YES)) is None


def test_cauda_equina_with_mri_ordered_and_a_device_gets_the_safety_warning() -> None:
    c = choice("mri-wo", facts(**V3, cauda_equina=Tri.YES, mri_safety=Tri.YES))
    assert c is not None and c.kind == "mri-safety"


def test_mri_with_a_safety_concern_gets_a_warning_offering_ct() -> None:
    c = choice("mri-wo", facts(**V3, prior_surgery=Tri.YES, mri_safety=Tri.YES))
    assert c is not None and c.kind == "mri-safety"
    assert all(not a.procedure.id.startswith("mri") for a in c.options)


def test_undecidable_gets_info_naming_what_decides() -> None:
    r = rated("mri-wo", facts(**{**V3, "duration": Tri.UNKNOWN,  # V1 or V3: UNA or UA
                                 "duration_categories": frozenset({"acute", "chronic"})}))
    assert not r.decision.determinate and "duration" in r.decision.deciding
    assert choose_card(r, KNOWLEDGE) == CardChoice("missing-data", [], False)


def test_mri_with_contrast_is_rated_even_when_the_history_is_unknown() -> None:
    unknown = {name: Tri.UNKNOWN for name in NAMES if name not in ("indication", "duration")}
    c = choice("mri-w", facts(**unknown))
    assert c is not None and c.kind == "not-appropriate"


def test_a_recent_mri_is_said_on_an_appropriate_mri() -> None:
    c = choice("mri-wo", facts(**V3, recent_mri=Tri.YES))
    assert c == CardChoice("recent-mri", [], False)


@pytest.mark.parametrize("values", [
    {"indication": Tri.NO, "other_indication": True},
    {"neuro_deficit": Tri.YES},  # outside V1-V3 with none of V4-V7: no criteria apply
], ids=["another-indication", "deficit-alone"])
def test_no_card_steers_away_when_no_criteria_apply(values: dict[str, Any]) -> None:
    # (a deficit with an X-ray or CT gets an info card pointing to MRI: tests/test_population.py)
    c = choice("mri-wo" if "neuro_deficit" in values else "xr-lumbar", facts(**values))
    assert c is None


# ------------------------------------------------------------------ duplicates (issue 21)


def with_duplicate(procedure: str, f: Facts, drafted: bool = False) -> Rated:
    r = rated(procedure, f)
    dup = Duplicate("ServiceRequest/earlier", KNOWLEDGE.procedures[procedure],
                    None if drafted else "2026-12-01", drafted)
    return Rated(r.order, r.procedure, r.facts, r.decision, r.missing, r.drafted, r.now, dup)


def test_the_same_study_already_ordered_gets_info_with_a_cancel_not_recommended() -> None:
    c = choose_card(with_duplicate("mri-wo", facts(**V3)), KNOWLEDGE)  # UA: no card otherwise
    assert c == CardChoice("duplicate", [], True)


def test_a_duplicate_replaces_an_info_card() -> None:
    c = choose_card(with_duplicate("xr-lumbar", facts(**V3)), KNOWLEDGE)  # MBA: better study
    assert c is not None and c.kind == "duplicate" and c.options == []


@pytest.mark.parametrize("values", [
    {"cancer": Tri.YES}, {"infection": Tri.UNKNOWN}, {"urgent": True}],
    ids=["red-flag", "red-flag-unknown", "urgent"])
def test_a_duplicate_never_comes_with_a_cancel_where_a_red_flag_is_possible_or_urgent(
        values: dict[str, Any]) -> None:
    c = choose_card(with_duplicate("mri-wwo", facts(**V3, **values)), KNOWLEDGE)
    assert c is not None and c.kind == "duplicate" and not c.cancel


def test_a_warning_or_critical_card_stays_when_the_order_is_a_duplicate() -> None:
    c = choose_card(with_duplicate("mri-w", facts(**V3)), KNOWLEDGE)  # UNA in V3
    assert c is not None and c.kind == "not-appropriate" and suggested(c) == ["mri-wo"]
    c = choose_card(with_duplicate("xr-lumbar", facts(cauda_equina=Tri.YES)), KNOWLEDGE)
    assert c is not None and c.kind == "cauda-equina"


def test_no_duplicate_card_where_no_criteria_apply() -> None:
    r = with_duplicate("mri-wo", facts(indication=Tri.NO, other_indication=True))
    assert choose_card(r, KNOWLEDGE) is None
