"""The facts declared once (``cds_service.clinical.registry``): everything that names a fact agrees
with the registry, and each coded row reads as its row says (evidence gives yes, whole sources
give no, a missing source gives unknown, evidence out of the row's scope gives no)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from cds_service.clinical.model import Facts, Tri
from cds_service.clinical.registry import (
    ASKED,
    CODED,
    DECISION_FACTS,
    FACTS,
    GROUPS,
    NAMES,
    RED_FLAGS,
    VALUESETS_READ,
    FactSpec,
    Scope,
)
from cds_service.clinical.scenario import STATES, WORLD_FACTS
from cds_service.engine import Engine
from cds_service.knowledge import KNOWLEDGE_DIR, load_knowledge
from cds_service.questionnaire import load_questions
from cds_service.render import TemplateProblem, load_templates
from tests.builders import bundle, condition, day, seed_prefetch
from tests.conftest import FIXTURE_NOW, ROOT, dev_settings
from tests.test_clinical import rate

NOW = FIXTURE_NOW
VALUESETS = yaml.safe_load((KNOWLEDGE_DIR / "valuesets.yaml").read_text())["valuesets"]


def test_facts_holds_every_registry_fact_under_its_name() -> None:
    fields = [f.name for f in dataclasses.fields(Facts)]
    assert fields[:len(NAMES)] == list(NAMES)
    facts, _ = rate(seed_prefetch(NOW), "mri-wo")
    assert all(facts.fact(name).name == name for name in NAMES)


def test_red_flags_groups_and_decision_facts_derive_from_the_registry() -> None:
    assert RED_FLAGS == ("cauda_equina", "neuro_deficit", "cancer", "infection",
                         "immunosuppression", "prior_surgery", "trauma", "osteoporosis",
                         "elderly", "steroids")
    assert GROUPS == {"v7": ("cancer", "infection", "immunosuppression"),
                      "v6": ("trauma", "osteoporosis", "elderly", "steroids")}
    grouped = {m for members in GROUPS.values() for m in members}
    assert set(WORLD_FACTS) == (set(DECISION_FACTS) - grouped) | set(GROUPS) | set(STATES)


def test_every_question_settles_a_fact_a_question_may_settle() -> None:
    questions = load_questions()
    assert {q.fact for q in questions.items} <= ASKED
    assert ASKED <= {q.fact for q in questions.items}  # and each such fact has a question


def test_every_value_set_the_rules_read_is_defined() -> None:
    assert VALUESETS_READ <= set(load_knowledge().valueset_descriptions)


def test_every_fact_has_its_wording_and_a_missing_label_is_refused(tmp_path: Path) -> None:
    templates = load_templates(ROOT / "cards")
    assert set(NAMES) <= set(templates.facts)
    trimmed = dataclasses.replace(templates, facts={
        k: v for k, v in templates.facts.items() if k != "intervention_candidate"})
    with pytest.raises(TemplateProblem, match="facts lacks intervention_candidate"):
        Engine(load_knowledge(), trimmed, dev_settings())


def test_the_cards_name_every_red_flag_as_checked() -> None:
    templates = load_templates(ROOT / "cards")
    engine = Engine(load_knowledge(), templates, dev_settings())
    facts, _ = rate(seed_prefetch(NOW), "mri-w")
    why = engine.cards._why(facts, NOW)
    # trauma, osteoporosis and steroid use as "fracture risk"; prior lumbar surgery and age
    # set the scenario: they are not called red flags
    fracture = GROUPS["v6"]
    assert all(templates.fact_short(name) in why for name in RED_FLAGS
               if name not in fracture and name != "prior_surgery"), why
    assert "fracture risk" in why
    assert "prior lumbar surgery" not in why and "age" not in why


def test_beside_an_age_that_is_fracture_risk_the_line_names_what_was_checked() -> None:
    """A patient of 94 is rated by fracture risk (V6) for her age: the line must not also say
    that fracture risk was checked and not found; it names trauma, osteoporosis and steroid
    use, and the age on record."""
    templates = load_templates(ROOT / "cards")
    engine = Engine(load_knowledge(), templates, dev_settings())
    prefetch = seed_prefetch(NOW)
    prefetch["patient"] = {**prefetch["patient"], "birthDate": day(NOW, 94 * 365 + 40)}
    facts, decision = rate(prefetch, "mri-w")
    assert facts.fact("elderly").value is Tri.YES and "V6" in (decision.variants or ())
    why = engine.cards._why(facts, NOW)
    checked = why.split("no red flags recorded (checked: ", 1)[1].split(")", 1)[0]
    assert "fracture risk" not in checked, why
    assert all(templates.fact_short(n) in checked for n in ("trauma", "osteoporosis", "steroids"))
    assert "on record: age 94" in why


# ------------------------------------------------------------------ each coded row


def _first_code(row: FactSpec) -> tuple[str, str, Scope]:
    """An ICD-10-CM code of the row's first value set that counts by itself."""
    for vs, scope in row.sets:
        if VALUESETS[vs].get("needs_companion") or VALUESETS[vs].get("text_terms"):
            continue
        entries = [e for e in VALUESETS[vs].get("entries") or [] if e["system"] == "icd10cm"]
        for entry in sorted(entries, key=lambda e: "code" not in e):  # exact codes first
            return vs, str(entry.get("code", entry.get("prefix"))), scope
    raise AssertionError(f"{row.name}: no ICD-10-CM code to test with")


# (gadolinium_allergy: its only code counts only with its text; tests/test_contrast_safety.py)
CODED_ROWS = [row for row in FACTS if row.rule == CODED
              and row.name not in ("radiculopathy", "gadolinium_allergy")]


def _with(*conds: dict[str, Any]) -> dict[str, Any]:
    p = seed_prefetch(NOW)
    p["conditions"]["entry"] += [{"resource": c} for c in conds]
    return p


@pytest.mark.parametrize("row", CODED_ROWS, ids=[r.name for r in CODED_ROWS])
def test_a_coded_row_reads_as_declared(row: FactSpec) -> None:
    _, code, scope = _first_code(row)
    found, _ = rate(_with(condition("x", code, day(NOW, 3))), "mri-wo")
    assert found.fact(row.name).value is Tri.YES, code
    whole, _ = rate(seed_prefetch(NOW), "mri-wo")
    assert whole.fact(row.name).value is Tri.NO
    missing = seed_prefetch(NOW)
    del missing["conditions"]
    unknown, _ = rate(missing, "mri-wo", reason="M54.50")
    assert unknown.fact(row.name).value is Tri.UNKNOWN
    if scope is Scope.HISTORY:  # resolved still counts (a history of cancer)
        old, _ = rate(_with(condition("x", code, day(NOW, 2000), "resolved")), "mri-wo")
        assert old.fact(row.name).value is Tri.YES
    elif scope is Scope.RELAPSE:  # treated in the relapse window counts; long before, not
        recent, _ = rate(_with(condition("x", code, day(NOW, 100), "resolved")), "mri-wo")
        assert recent.fact(row.name).value is Tri.YES
        ended = condition("x", code, day(NOW, 900), "resolved")
        ended["abatementDateTime"] = day(NOW, 800)
        resolved, _ = rate(_with(ended), "mri-wo")
        assert resolved.fact(row.name).value is Tri.NO
        active, _ = rate(_with(condition("x", code, day(NOW, 2000))), "mri-wo")
        assert active.fact(row.name).value is Tri.YES  # not resolved: still an infection
    else:  # resolved, or out of the row's time scope, does not
        resolved, _ = rate(_with(condition("x", code, day(NOW, 3), "resolved")), "mri-wo")
        assert resolved.fact(row.name).value is Tri.NO
    if scope in (Scope.CURRENT, Scope.RECENT):
        # a symptom from before this episode, or undated, is unknown (ask), never yes; the
        # same resolved is history (no)
        for onset in (day(NOW, 2000), None):
            old, _ = rate(_with(condition("x", code, onset)), "mri-wo")
            assert old.fact(row.name).value is Tri.UNKNOWN, (code, onset)
            assert old.fact(row.name).missing == ["not dated in this episode"]
        gone, _ = rate(_with(condition("x", code, day(NOW, 2000), "resolved")), "mri-wo")
        assert gone.fact(row.name).value is Tri.NO
    if scope is Scope.GESTATION:  # a pregnancy code older than a pregnancy lasts: no
        old, _ = rate(_with(condition("x", code, day(NOW, 2000))), "mri-wo")
        assert old.fact(row.name).value is Tri.NO


def test_the_procedures_source_missing_leaves_only_its_facts_unknown() -> None:
    p = seed_prefetch(NOW)
    p["procedures"] = bundle()
    del p["procedures"]
    facts, _ = rate(p, "mri-wo")
    assert facts.prior_surgery.value is Tri.UNKNOWN  # surgery is read from procedures too
    assert facts.cancer.value is Tri.NO  # the problem list came whole
