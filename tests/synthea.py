"""The four real-shaped Synthea records (tests/data/synthea/, MIT licence, see its README) as a
FHIR server would serve them: ``urn:uuid:`` references resolved to ``Type/id`` as a server does
when it loads a bundle, and each patient's resources as prefetch search Bundles."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

FILE = Path(__file__).resolve().parent / "data" / "synthea" / "four-back-pain-patients.ndjson.gz"
PREFETCH_KEYS = {"Condition": "conditions", "Procedure": "procedures",
                 "ServiceRequest": "servicerequests", "MedicationRequest": "medications"}


def _resolve(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: ids.get(v, v) if k == "reference" and isinstance(v, str) else _resolve(v, ids)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, ids) for v in value]
    return value


@cache
def resources() -> dict[str, list[dict[str, Any]]]:
    """Patient id -> the patient's resources (the Patient first)."""
    with gzip.open(FILE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ids = {f"urn:uuid:{r['id']}": f"{r['resourceType']}/{r['id']}" for r in rows}
    by_patient: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in (_resolve(r, ids) for r in rows):
        if r["resourceType"] == "Patient":
            by_patient[r["id"]].insert(0, r)
            continue
        ref = (r.get("subject") or r.get("patient") or {}).get("reference", "")
        if ref.startswith("Patient/"):
            by_patient[ref.split("/", 1)[1]].append(r)
    return dict(by_patient)


def prefetch(patient_id: str) -> dict[str, Any]:
    """The patient's record as the service's prefetch keys hold it."""
    found = resources()[patient_id]
    out: dict[str, Any] = {"patient": found[0]}
    for rtype, key in PREFETCH_KEYS.items():
        out[key] = {"resourceType": "Bundle", "type": "searchset",
                    "entry": [{"resource": r} for r in found if r["resourceType"] == rtype]}
    return out
