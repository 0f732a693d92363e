"""Medication lists as facts (issue 20): an active immunosuppressive is immunosuppression (V7);
a systemic corticosteroid used 3 months or more is chronic steroid use (V6); a medication the
service cannot read leaves both unknown, never no."""

from __future__ import annotations

from typing import Any

import pytest

from cds_service.clinical.facts import Tri
from tests.builders import PATIENT, bundle, day, seed_prefetch
from tests.conftest import FIXTURE_NOW
from tests.test_clinical import rate

NOW = FIXTURE_NOW
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def med(mid: str, text: str | None, days_ago: int | None, status: str = "active") -> dict[str, Any]:
    m: dict[str, Any] = {"resourceType": "MedicationRequest", "id": mid, "status": status,
                         "intent": "order", "subject": {"reference": f"Patient/{PATIENT}"}}
    if text is None:
        m["medicationReference"] = {"reference": f"Medication/{mid}"}  # nothing to read it by
    else:
        m["medicationCodeableConcept"] = {"coding": [{"system": RXNORM, "code": "0",
                                                      "display": text}], "text": text}
    if days_ago is not None:
        m["authoredOn"] = day(NOW, days_ago)
    return m


def with_meds(*meds: dict[str, Any]) -> dict[str, Any]:
    p = seed_prefetch(NOW)
    p["medications"] = bundle(*meds)
    return p


def test_an_active_immunosuppressive_is_immunosuppression() -> None:
    facts, d = rate(with_meds(med("t", "tacrolimus 1 MG Oral Capsule", 400)), "xr-lumbar")
    assert facts.immunosuppression.value is Tri.YES and "V7" in d.variants
    assert facts.immunosuppression.evidence[0].resource == "MedicationRequest/t"


def test_a_finished_course_years_ago_is_not() -> None:
    facts, _ = rate(with_meds(med("t", "methotrexate 2.5 MG Oral Tablet", 2000, "completed")),
                    "xr-lumbar")
    assert facts.immunosuppression.value is Tri.NO


@pytest.mark.parametrize(("orders", "value"), [
    ([("p1", "predniSONE 5 MG Oral Tablet", 240, "completed"),
      ("p2", "predniSONE 5 MG Oral Tablet", 30, "active")], Tri.YES),  # 8 months
    # still ordered, for fewer days than chronic use so far: not ruled out (asked)
    ([("p", "predniSONE 20 MG Oral Tablet", 10, "active")], Tri.UNKNOWN),
    ([("p", "predniSONE 5 MG Oral Tablet", 430, "active")], Tri.YES),  # active for 14 months
    ([("p1", "predniSONE 20 MG Oral Tablet", 900, "completed"),
      ("p2", "predniSONE 20 MG Oral Tablet", 20, "active")], Tri.UNKNOWN),  # old, then new
    ([("p", "predniSONE 5 MG Oral Tablet", None, "active")], Tri.UNKNOWN),  # since when?
    ([("p", "predniSONE 20 MG Oral Tablet", 40, "completed")], Tri.NO),  # a finished course
    ([("f", "120 ACTUAT fluticasone propionate 0.11 MG/ACTUAT Metered Dose Inhaler", 400,
       "active")], Tri.NO),  # inhaled: not systemic
], ids=["eight-months", "ten-days", "active-14-months", "old-course-then-new", "undated",
        "finished-course", "inhaled"])
def test_systemic_corticosteroids_for_three_months_are_chronic_use(
        orders: list[tuple[str, str, int | None, str]], value: Tri) -> None:
    facts, _ = rate(with_meds(*(med(i, t, d, s) for i, t, d, s in orders)), "xr-lumbar")
    assert facts.steroids.value is value


def test_an_active_medication_that_cannot_be_read_leaves_them_unknown() -> None:
    facts, d = rate(with_meds(med("x", None, 30)), "xr-lumbar")
    assert facts.immunosuppression.value is Tri.UNKNOWN
    assert facts.steroids.value is Tri.UNKNOWN
    assert not d.determinate or d.pama != "not-appropriate"


def test_a_finished_unreadable_medication_outside_the_episode_changes_nothing() -> None:
    facts, _ = rate(with_meds(med("x", None, 3000, "completed")), "xr-lumbar")
    assert facts.immunosuppression.value is Tri.NO and facts.steroids.value is Tri.NO
