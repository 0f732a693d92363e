"""Real-shaped records (issue 20): four Synthea patients with chronic low back pain, SNOMED CT
problem lists, years of history, RxNorm medications, served over a real socket.

Back pain is seen in every one, and MRI with contrast is rated not appropriate for each from the
record as coded (no reason on the order: the indication is the problem list's)."""

from __future__ import annotations

import copy
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest

from cds_service.app import create_app
from cds_service.clinical.facts import Tri, derive_facts, scan_record
from cds_service.record import record_from_prefetch
from tests.builders import hook_request, order
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient, dev_settings
from tests.fhir_server import FhirTestServer
from tests.served import served
from tests.synthea import prefetch, resources
from tests.test_clinical import KNOWLEDGE
from tests.test_fetch_real_server import AUTH
from tests.test_fhir_integration import comparable

PATIENTS = sorted(resources())


def lumbar_order(patient: str, cpt: str) -> dict[str, Any]:
    draft = order(f"draft-{cpt}", cpt=cpt, reason=None)
    draft["subject"] = {"reference": f"Patient/{patient}"}
    return draft


def test_the_four_records_are_there_and_code_back_pain_in_snomed_ct_only() -> None:
    assert len(PATIENTS) == 4
    for pid in PATIENTS:
        codes = {(c["system"], c["code"]) for r in resources()[pid]
                 if r["resourceType"] == "Condition" for c in r["code"]["coding"]}
        assert ("http://snomed.info/sct", "278860009") in codes  # Chronic low back pain
        assert all(system == "http://snomed.info/sct" for system, _ in codes)


@pytest.mark.parametrize("patient", PATIENTS)
def test_back_pain_is_seen_and_its_duration_dated(patient: str) -> None:
    draft = lumbar_order(patient, "72149")
    record = record_from_prefetch(prefetch(patient), patient)
    facts = derive_facts(scan_record(record, KNOWLEDGE), draft, [draft], KNOWLEDGE, FIXTURE_NOW)
    assert facts.indication.value is Tri.YES
    assert facts.duration.value is Tri.YES and facts.duration_categories == {"chronic"}
    if facts.care_weeks is not None:  # never longer than the episode
        onset = date.fromisoformat(min(e.date for e in facts.duration.evidence if e.date))
        assert facts.care_weeks * 7 <= (FIXTURE_NOW.date() - onset).days + 1


def test_mri_with_contrast_is_rated_not_appropriate_for_each_over_http(tmp_path: Path) -> None:
    """`cds-service serve` on a socket, today's date: no 5xx on any study, and MRI with
    contrast a warning rated not appropriate for every patient."""
    with served(tmp_path) as base:
        for pid in PATIENTS:
            for cpt in ("72149", "72148", "72100"):
                body = hook_request(lumbar_order(pid, cpt), prefetch=prefetch(pid), patient=pid)
                r = httpx.post(base + SELECT, json=body, timeout=30)
                assert r.status_code == 200, (pid, cpt, r.text)
                answer = r.json()
                if cpt == "72149":
                    rating = answer["systemActions"][0]["resource"]["extension"][0]
                    codes = [c["code"] for c in rating["valueCodeableConcept"]["coding"]]
                    assert codes[0] == "not-appropriate", (pid, codes)
                    assert [c["indicator"] for c in answer["cards"]] == ["warning"], pid


@pytest.mark.parametrize("max_count", [200, None], ids=["hapi", "pages-of-20"])
def test_the_records_read_through_the_fetch_give_the_prefetch_answer(
        max_count: int | None) -> None:
    """Through a FHIR server answering in 100 ms with pages of 20 (HAPI's default; 'hapi'
    honours _count up to 200): no 412, and the answer the whole record as prefetch gives."""
    with FhirTestServer(20, latency=0.1, max_count=max_count) as fhir:
        settings = dev_settings(fhir_allowed_servers=fhir.base)
        with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
            for pid in PATIENTS:
                body = hook_request(lumbar_order(pid, "72149"), prefetch=prefetch(pid),
                                    patient=pid)
                expected = c.post(SELECT, json=body)
                assert expected.status_code == 200, expected.text
                fhir.data[pid] = copy.deepcopy(body.pop("prefetch"))
                body["fhirServer"], body["fhirAuthorization"] = fhir.base, AUTH
                r = c.post(SELECT, json=body)
                assert r.status_code == 200, (pid, r.text)
                assert comparable(r.json()) == comparable(expected.json()), pid
