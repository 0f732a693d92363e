"""The benchmark's requests, built from the fixtures (dates relative to now)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
CPT = "http://www.ama-assn.org/go/cpt"
NOISE_CONDITIONS = ["I10", "E11.9", "E78.5", "J45.909"]
NOISE_PROCEDURES = ["99213", "36415", "45378"]


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "fixtures" / "requests" / f"{name}.json").read_text())


def _shift(body: dict[str, Any]) -> dict[str, Any]:
    """Move the fixture's dates so that its anchor is today (text replace of YYYY-MM-DD)."""
    anchor = datetime(2026, 11, 1, tzinfo=UTC).date()
    delta = datetime.now(UTC).date() - anchor
    text = json.dumps(body)
    out = []
    i = 0
    while i < len(text):
        chunk = text[i:i + 10]
        if (len(chunk) == 10 and chunk[4] == "-" and chunk[7] == "-" and chunk[:4].isdigit()
                and text[i - 1] == '"'):
            try:
                day = datetime.strptime(chunk, "%Y-%m-%d").date() + delta
                out.append(day.isoformat())
                i += 10
                continue
            except ValueError:
                pass
        out.append(text[i])
        i += 1
    return json.loads("".join(out))


def _grow(body: dict[str, Any], conditions: int, procedures: int, requests: int) -> dict[str, Any]:
    body = copy.deepcopy(body)
    pre = body["prefetch"]
    pid = body["context"]["patientId"]
    now = datetime.now(UTC)

    def day(n: int) -> str:
        return (now - timedelta(days=n)).date().isoformat()

    conds = pre["conditions"]["entry"]
    i = 0
    while len(conds) < conditions:
        conds.append({"resource": {
            "resourceType": "Condition", "id": f"bench-c{i}", "subject": {"reference":
                                                                         f"Patient/{pid}"},
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                           "condition-clinical", "code": "active"}]},
            "code": {"coding": [{"system": ICD, "code": NOISE_CONDITIONS[i % 4]}],
                     "text": "noise"}, "onsetDateTime": day(100 + i)}})
        i += 1
    procs = pre["procedures"]["entry"]
    i = 0
    while len(procs) < procedures:
        procs.append({"resource": {
            "resourceType": "Procedure", "id": f"bench-p{i}", "status": "completed",
            "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": CPT, "code": NOISE_PROCEDURES[i % 3]}]},
            "performedDateTime": day(10 + i)}})
        i += 1
    srs = pre["servicerequests"]["entry"]
    for i in range(requests - len(srs)):
        srs.append({"resource": {
            "resourceType": "ServiceRequest", "id": f"bench-s{i}", "status": "completed",
            "intent": "order", "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": CPT, "code": "80053"}]}, "authoredOn": day(30 + i)}})
    for key in ("conditions", "procedures", "servicerequests"):
        pre[key]["total"] = len(pre[key]["entry"])
    return body


def build() -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (hook, body)."""
    seed = _shift(_fixture("v3-seed-mri-w"))
    sign = _shift(_fixture("order-sign-three"))
    drafts = sign["context"]["draftOrders"]["entry"]
    for i, cpt in enumerate(("72148", "72131")):
        extra = copy.deepcopy(drafts[0])
        extra["resource"]["id"] = f"order-extra-{i}"
        extra["resource"]["code"] = {"coding": [{"system": CPT, "code": cpt}]}
        drafts.insert(2, extra)
    sandbox = json.loads((ROOT / "fixtures" / "examples" / "sandbox" /
                          "sandbox-ui-captured-order-select-72133-lbp.request.json").read_text())
    return {
        "a-seed-100": ("order-select", _grow(seed, 40, 60, 4)),
        "b-heavy-1000": ("order-select", _grow(seed, 300, 650, 50)),
        "c-sandbox": ("order-select", sandbox),
        "d-sign-5": ("order-sign", _grow(sign, 40, 60, 4)),
    }
