"""Unknown facts flip the answer as the design says; random records never break the engine."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.engine import Engine
from cds_service.knowledge import load_knowledge
from cds_service.protocol import HookRequest
from cds_service.record import record_from_prefetch
from cds_service.render import load_templates
from tests.builders import bundle, condition, day, hook_request, order, procedure, seed_prefetch
from tests.conftest import FIXTURE_NOW, ROOT, dev_settings

NOW = FIXTURE_NOW
ENGINE = Engine(load_knowledge(), load_templates(ROOT / "cards"), dev_settings())


def run(prefetch: dict[str, Any] | None, cpt: str, reason: str | None = "M54.16") -> Any:
    body = hook_request(order(cpt=cpt, reason=reason), prefetch=prefetch)
    request = HookRequest.model_validate(body)
    record = record_from_prefetch(request.prefetch, request.context.patientId)
    results = ENGINE.answer(ENGINE.rate(request, record, NOW)).orders
    assert len(results) <= 1
    return results[0] if results else None


def without(*keys: str) -> dict[str, Any]:
    p = seed_prefetch(NOW)
    for k in keys:
        del p[k]
    return p


def test_unknown_therapy_makes_mri_without_contrast_undecidable() -> None:
    r = run(without("procedures"), "72148")
    assert not r.decision.determinate and r.decision.pama is None
    assert r.kinds == ["missing-data"]
    assert "conservative_care" in r.decision.deciding


def test_unknown_problem_list_makes_mri_without_contrast_undecidable() -> None:
    r = run(without("conditions"), "72148")
    assert not r.decision.determinate and r.kinds == ["missing-data"]


def test_mri_with_contrast_is_rated_with_no_history_at_all() -> None:
    r = run(None, "72149")
    assert r.decision.pama == "not-appropriate" and r.decision.category == "UNA"
    assert r.kinds == ["not-appropriate"]
    assert not r.cards[0].suggestions  # the scenario, and so the right study, is unknown


def test_unknown_age_same_code_no_card_when_categories_differ() -> None:
    # V3 (CT without contrast MBA) or V6 (UA): both "appropriate"; the card would differ: none.
    r = run(without("patient"), "72131")
    assert r.decision.pama == "appropriate" and r.decision.category is None
    assert r.kinds == []


def test_unknown_age_keeps_mri_without_contrast_appropriate() -> None:
    r = run(without("patient"), "72148")
    assert r.decision.pama == "appropriate" and r.decision.category == "UA"


def test_unknown_age_still_suggests_when_every_world_agrees() -> None:
    r = run(without("patient"), "72158")  # MBA in V3 and V6, MRI without contrast UA in both
    assert r.decision.category == "MBA" and r.kinds == ["better-alternative"]


def test_unknown_referrals_do_not_matter_when_care_is_documented() -> None:
    r = run(without("servicerequests"), "72148")
    assert r.decision.pama == "appropriate" and r.decision.variants == frozenset({"V3"})


def test_acute_or_subacute_unknown_rated_but_never_cancelled() -> None:
    # LBP from the order reason only, no dated condition, no therapy: V1 or V2, both UNA. The
    # duration is not from a dated condition, so no cancel: the card asks for the onset.
    p = seed_prefetch(NOW)
    p["conditions"] = bundle()
    p["procedures"] = bundle()
    r = run(p, "72148")
    assert r.decision.pama == "not-appropriate"
    assert r.decision.alternatives == "cancel"
    assert r.kinds == ["not-appropriate"]
    assert not r.cards[0].suggestions
    assert "when the current episode of low back pain began" in r.cards[0].detail


def test_dated_acute_pain_gets_a_cancel_that_is_not_recommended() -> None:
    p = seed_prefetch(NOW)
    p["conditions"]["entry"][0]["resource"]["onsetDateTime"] = day(NOW, 10)
    p["procedures"] = bundle()
    r = run(p, "72148")
    assert r.kinds == ["not-appropriate"]
    (suggestion,) = r.cards[0].suggestions
    delete = suggestion.actions[0]
    assert delete.type == "delete" and delete.resourceId == "ServiceRequest/draft-1"
    assert not suggestion.isRecommended


# ------------------------------------------------------------------ properties

EXTRA_CODES = ["G83.4", "C79.51", "Z85.46", "M46.26", "D84.9", "M96.1", "S32.010A", "M81.0",
               "Z79.52", "M54.50", "M54.16", "M51.16", "I10", "E11.9"]
CPTS = ["72100", "72148", "72149", "72158", "72131", "72132", "72133", "78306", "78816",
        "72295", "36415"]
STATUSES = ["active", "resolved", "inactive", "recurrence"]


@st.composite
def records(draw: st.DrawFn, allow_mri_safety: bool) -> tuple[dict[str, Any], str, str]:
    prefetch = seed_prefetch(NOW)
    codes = EXTRA_CODES + (["Z95.0"] if allow_mri_safety else [])
    for i in range(draw(st.integers(0, 4))):
        code = draw(st.sampled_from(codes))
        onset = draw(st.one_of(st.none(), st.integers(-10, 3000)))
        cond = condition(f"x{i}", code, day(NOW, onset) if onset is not None else None,
                         status=draw(st.sampled_from(STATUSES)))
        if draw(st.booleans()):
            cond["recordedDate"] = day(NOW, draw(st.integers(0, 400)))
        prefetch["conditions"]["entry"].append({"resource": cond})
    keep = draw(st.lists(st.integers(0, 10), max_size=3))
    prefetch["procedures"]["entry"] += [
        {"resource": procedure(f"pp{k}", draw(st.sampled_from(["97110", "63030", "72148"])),
                               day(NOW, draw(st.integers(0, 900))))} for k in keep]
    for key in list(prefetch):
        mode = draw(st.sampled_from(["keep", "keep", "drop", "null", "outcome", "shuffle"]))
        if mode == "drop":
            del prefetch[key]
        elif mode == "null":
            prefetch[key] = None
        elif mode == "outcome":
            prefetch[key] = {"resourceType": "OperationOutcome", "issue": []}
        elif mode == "shuffle" and isinstance(prefetch[key], dict) and "entry" in prefetch[key]:
            entries = copy.deepcopy(prefetch[key]["entry"])
            prefetch[key]["entry"] = draw(st.permutations(entries))
    cpt = draw(st.sampled_from(CPTS))
    reason = draw(st.sampled_from(["M54.16", "M54.50", "N20.0", "G83.4", "C79.51", None]))
    return prefetch, cpt, reason  # type: ignore[return-value]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records(allow_mri_safety=True))
def test_random_records_never_crash(case: tuple[dict[str, Any], str, str]) -> None:
    prefetch, cpt, reason = case
    r = run(prefetch, cpt, reason)
    if r is not None:
        for card in r.cards:
            assert len(card.summary) < 140
            if card.suggestions:
                assert card.selectionBehavior == "at-most-one"
                assert sum(bool(s.isRecommended) for s in card.suggestions) <= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records(allow_mri_safety=False))
def test_no_warning_for_an_appropriate_order(case: tuple[dict[str, Any], str, str]) -> None:
    prefetch, cpt, reason = case
    r = run(prefetch, cpt, reason)
    if r is not None and r.decision.category == "UA":
        assert all(c.indicator != "warning" for c in r.cards)
    if r is not None and r.decision.pama != "not-appropriate":
        assert "not-appropriate" not in r.kinds
