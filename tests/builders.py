"""Small hook-request builders for protocol tests (the clinical cases live in fixtures/)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

CPT = "http://www.ama-assn.org/go/cpt"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
PATIENT = "pt-seed"


def day(now: datetime, days_ago: int) -> str:
    return (now - timedelta(days=days_ago)).date().isoformat()


def order(oid: str = "draft-1", cpt: str = "72149", reason: str | None = "M54.16",
          patient: str = PATIENT) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "ServiceRequest", "id": oid, "status": "draft", "intent": "order",
        "code": {"coding": [{"system": CPT, "code": cpt}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    if reason:
        res["reasonCode"] = [{"coding": [{"system": ICD, "code": reason}]}]
    return res


def condition(cid: str, code: str, onset: str | None, status: str = "active",
              patient: str = PATIENT) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Condition", "id": cid,
        "clinicalStatus": {"coding": [{"system": CLINICAL, "code": status}]},
        "code": {"coding": [{"system": ICD, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    if onset:
        res["onsetDateTime"] = onset
    return res


def procedure(pid: str, cpt: str, performed: str, patient: str = PATIENT) -> dict[str, Any]:
    return {"resourceType": "Procedure", "id": pid, "status": "completed",
            "code": {"coding": [{"system": CPT, "code": cpt}]},
            "subject": {"reference": f"Patient/{patient}"}, "performedDateTime": performed}


def bundle(*resources: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r} for r in resources], **extra}


def seed_prefetch(now: datetime) -> dict[str, Any]:
    """58-year-old, chronic radicular LBP for 16 weeks, PT from 8 weeks to 1 week ago (7
    documented weeks of care): scenario V3."""
    return {
        "patient": {"resourceType": "Patient", "id": PATIENT, "birthDate": day(now, 58 * 365 + 40)},
        "conditions": bundle(condition("c-lbp", "M54.16", day(now, 112)),
                             condition("c-htn", "I10", day(now, 2000))),
        "procedures": bundle(procedure("p-pt1", "97161", day(now, 56)),
                             procedure("p-pt2", "97110", day(now, 7))),
        "servicerequests": bundle(),
        "medications": bundle(),
        "questionnaireresponses": bundle(),  # no answers given (the key is optional)
        "allergies": bundle(),  # no allergies recorded (the key is optional)
    }


def service_request(sid: str, cpt: str, authored: str,
                    patient: str = PATIENT) -> dict[str, Any]:
    return {"resourceType": "ServiceRequest", "id": sid, "status": "completed",
            "intent": "order", "code": {"coding": [{"system": CPT, "code": cpt}]},
            "subject": {"reference": f"Patient/{patient}"}, "authoredOn": authored}


def large_record(now: datetime, conditions: int, procedures: int,
                 requests: int) -> dict[str, Any]:
    """The seed patient's prefetch grown to these counts with unrelated resources (blood
    pressure, diabetes, office visits, blood draws, lab orders), the patient's own resources
    last: a fetch that stops early misses what rates the order."""
    record = seed_prefetch(now)
    noise = {
        "conditions": [condition(f"n-c{i}", ("I10", "E11.9", "E78.5")[i % 3],
                                 day(now, 400 + i)) for i in range(conditions - 2)],
        "procedures": [procedure(f"n-p{i}", ("99213", "36415")[i % 2], day(now, 30 + i))
                       for i in range(procedures - 2)],
        "servicerequests": [service_request(f"n-s{i}", "80053", day(now, 20 + i))
                            for i in range(requests)],
    }
    for key, resources in noise.items():
        record[key]["entry"] = [{"resource": r} for r in resources] + record[key]["entry"]
    return record


def hook_request(*drafts: dict[str, Any], hook: str = "order-select",
                 selections: list[str] | None = None, prefetch: dict[str, Any] | None = None,
                 patient: str = PATIENT) -> dict[str, Any]:
    context: dict[str, Any] = {
        "userId": "Practitioner/example", "patientId": patient,
        "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": d} for d in drafts]},
    }
    if hook == "order-select":
        context["selections"] = (selections if selections is not None
                                 else [f"ServiceRequest/{drafts[0]['id']}"] if drafts else [])
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body
