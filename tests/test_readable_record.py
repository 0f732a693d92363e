"""Closed world only over what the service can read, and the record's own dates (issue 20).

A record entry the service cannot read (text only, a local code) may be anything: the facts it
could carry are unknown, never no. Care and candidacy count within the episode (or a window when
its start is unknown), never the whole history; weeks of care never exceed the episode.
"""

from __future__ import annotations

from typing import Any

from cds_service.app import create_app
from cds_service.clinical.facts import Tri, derive_facts, scan_record
from cds_service.clinical.model import ClinicalParams
from cds_service.record import record_from_prefetch
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
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient, dev_settings
from tests.test_clinical import KNOWLEDGE, rate

NOW = FIXTURE_NOW


def acute(*extra: dict[str, Any], onset: int = 10) -> dict[str, Any]:
    """The seed patient with low back pain for ``onset`` days and no therapy."""
    p = seed_prefetch(NOW)
    p["conditions"]["entry"][0]["resource"]["onsetDateTime"] = day(NOW, onset)
    p["conditions"]["entry"] += [{"resource": c} for c in extra]
    p["procedures"] = bundle()
    return p


def text_only(cid: str, text: str, days_ago: int, status: str = "active") -> dict[str, Any]:
    c = condition(cid, "x", day(NOW, days_ago), status)
    c["code"] = {"text": text}
    return c


def local_code(cid: str, code: str, text: str, days_ago: int) -> dict[str, Any]:
    c = condition(cid, code, day(NOW, days_ago))
    c["code"] = {"coding": [{"system": "urn:oid:1.2.840.114350.1.13.0.1.7.2.728286",
                             "code": code, "display": text}], "text": text}
    return c


def test_a_text_only_problem_makes_red_flags_unknown_never_no() -> None:
    facts, d = rate(acute(text_only("t", "Breast cancer, on treatment", 30)), "mri-wo")
    assert facts.cancer.value is Tri.UNKNOWN and facts.cauda_equina.value is Tri.UNKNOWN
    assert not d.determinate  # V1 (no imaging) or V7 (cancer): the clinician is asked


def test_a_local_code_is_read_as_unknown_as_text_is() -> None:
    facts, _ = rate(acute(local_code("l", "12345", "Malignant neoplasm of breast", 30)), "mri-wo")
    assert facts.cancer.value is Tri.UNKNOWN


def test_an_unreadable_entry_out_of_a_facts_scope_leaves_it_no() -> None:
    """An unreadable problem resolved years ago cannot be a current symptom (but may be a
    history of cancer)."""
    facts, _ = rate(acute(text_only("t", "old problem", 2000, "resolved")), "mri-wo")
    assert facts.cauda_equina.value is Tri.NO and facts.infection.value is Tri.NO
    assert facts.cancer.value is Tri.UNKNOWN  # cancer history counts resolved


def test_readable_codes_keep_the_closed_world() -> None:
    """A coded problem in a system the service reads, in no value set, is not a red flag."""
    facts, d = rate(acute(condition("h", "I10", day(NOW, 400))), "mri-wo")  # hypertension
    assert facts.cancer.value is Tri.NO and d.determinate and d.pama == "not-appropriate"


def test_no_cancel_and_no_reassurance_beside_an_unreadable_entry() -> None:
    body = hook_request(order(cpt="72148", reason="M54.50"),
                        prefetch=acute(text_only("t", "Metastatic disease", 20)))
    with ValidatingClient(create_app(dev_settings(), clock=lambda: NOW)) as c:
        cards = c.post(SELECT, json=body).json()["cards"]
    assert cards, "the order cannot be rated: the clinician is asked"
    for card in cards:
        assert "no red flags recorded" not in card.get("detail", "")
        assert not any(a["type"] == "delete" for s in card.get("suggestions", [])
                       for a in s["actions"])


def test_an_order_reason_that_cannot_be_read_is_an_unknown_indication() -> None:
    p = acute()
    p["conditions"] = bundle()  # no back pain on the problem list
    draft = order(cpt="72148")
    draft["reasonCode"] = [{"coding": [{"system": "urn:oid:1.2.3.4", "code": "LBP1"}],
                            "text": "lumbago"}]
    record = record_from_prefetch(p, PATIENT)
    facts = derive_facts(scan_record(record, KNOWLEDGE), draft, [draft], KNOWLEDGE, NOW)
    assert facts.indication.value is Tri.UNKNOWN and not facts.other_indication


def test_care_without_a_dated_episode_counts_only_within_the_window() -> None:
    p = seed_prefetch(NOW)
    p["conditions"]["entry"][0]["resource"].pop("onsetDateTime", None)
    p["procedures"] = bundle(procedure("old-pt", "97110", day(NOW, 4000)))
    facts, _ = rate(p, "mri-wo")
    assert facts.care_weeks is None  # eleven years ago is not this episode's care
    # therapy from 60 to 4 days ago: 8 documented weeks (issue 21: first to latest)
    p["procedures"] = bundle(procedure("pt", "97110", day(NOW, 60)),
                             procedure("pt2", "97110", day(NOW, 4)))
    facts, _ = rate(p, "mri-wo")
    assert facts.care_weeks is not None and 8 <= facts.care_weeks <= 9
    narrow, _ = rate(p, "mri-wo", params=ClinicalParams(care_window_days=30))
    assert narrow.care_weeks is not None and narrow.care_weeks < 1  # the last visit only


def test_weeks_of_care_never_exceed_the_episode() -> None:
    p = seed_prefetch(NOW)
    p["conditions"]["entry"][0]["resource"]["onsetDateTime"] = day(NOW, 30)
    p["procedures"] = bundle(procedure("pt", "97110", day(NOW, 40)))  # within the grace days
    facts, _ = rate(p, "mri-wo")
    assert facts.care_weeks is not None and facts.care_weeks <= 31 / 7  # not 40 days


def test_a_referral_from_an_earlier_episode_is_not_candidacy() -> None:
    p = seed_prefetch(NOW)
    referral = {"resourceType": "ServiceRequest", "id": "ref-old", "status": "completed",
                "intent": "order", "subject": {"reference": f"Patient/{PATIENT}"},
                "category": [{"text": "referral"}],
                "code": {"text": "Referral to spine surgery"},
                "reasonCode": [{"coding": [{"system": ICD, "code": "M54.50"}]}],
                "authoredOn": day(NOW, 3000)}
    p["servicerequests"] = bundle(referral)
    facts, _ = rate(p, "mri-wo")
    assert facts.intervention_candidate.value is Tri.NO
    referral["authoredOn"] = day(NOW, 20)
    facts, _ = rate(p, "mri-wo")
    assert facts.intervention_candidate.value is Tri.YES


def test_a_card_does_not_claim_an_assumption_the_record_leaves_open() -> None:
    """Candidacy is assumed after care that is on record as done, never while the record leaves
    the care open (the card asks for it instead)."""
    p = seed_prefetch(NOW)
    p["procedures"] = bundle()  # no therapy on record, and a medication of this episode that
    p["medications"] = bundle({"resourceType": "MedicationRequest", "id": "m", "status":  # ...
                               "completed", "intent": "order", "authoredOn": day(NOW, 30),
                               "subject": {"reference": f"Patient/{PATIENT}"},  # cannot be read
                               "medicationReference": {"reference": "Medication/m"}})
    body = hook_request(order(cpt="72100", reason="M54.50"), prefetch=p)
    with ValidatingClient(create_app(dev_settings(), clock=lambda: NOW)) as c:
        cards = c.post(SELECT, json=body).json()["cards"]
    assert cards and all("Assumed" not in card.get("detail", "") for card in cards), cards


def _therapy(**extra: Any) -> dict[str, Any]:
    p = seed_prefetch(NOW)
    p["conditions"]["entry"].append({"resource": condition("c-knee", "M25.561", day(NOW, 200))})
    for entry in p["procedures"]["entry"]:
        entry["resource"].update(extra)
    return p


def test_therapy_for_another_reason_or_site_is_not_back_care() -> None:
    """A finding counts in its context: rehabilitation for a knee, by its reason or body site,
    is not conservative care for back pain; with a back-pain reason, or none, it is."""
    knee_code = {"reasonCode": [{"coding": [{"system": ICD, "code": "M25.561"}]}]}
    knee_ref = {"reasonReference": [{"reference": "Condition/c-knee"}]}
    knee_site = {"bodySite": [{"text": "Right knee"}]}
    for extra in (knee_code, knee_ref, knee_site):
        facts, _ = rate(_therapy(**extra), "mri-wo")
        assert facts.care_weeks is None, extra
    for extra in ({"reasonReference": [{"reference": "Condition/c-lbp"}]},
                  {"bodySite": [{"text": "Lumbar region"}]}, {}):
        facts, _ = rate(_therapy(**extra), "mri-wo")
        assert facts.care_weeks is not None and facts.care_weeks >= 6, extra
