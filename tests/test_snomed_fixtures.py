"""Every scenario V1-V7 read from a SNOMED CT-only record (issue 20): each ``v*`` fixture with its
ICD-10-CM problem list and order reasons recoded in SNOMED CT (as real FHIR servers send them)
gets the same rating, scenario and card kind as the fixture itself.

Each SNOMED CT code below is in the SNOMED CT IPS Free Set (tests/data/snomed-ct-ips-free-set/,
checked here too) and means the ICD-10-CM concept it stands for; where the free set has no exact
match the nearest concept is named in the comment.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import pytest

from cds_service.engine import Engine
from cds_service.knowledge import load_knowledge
from cds_service.protocol import HookRequest
from cds_service.record import record_from_prefetch
from cds_service.render import load_templates
from tests.conftest import FIXTURE_NOW, FIXTURES, ROOT, dev_settings

ICD = "http://hl7.org/fhir/sid/icd-10-cm"
SCT = "http://snomed.info/sct"
FREE_SET = Path(__file__).resolve().parent / "data" / "snomed-ct-ips-free-set" / "problems.csv"
ICD_TO_SNOMED = {
    "M54.16": ("128196005", "Lumbar radiculopathy"),
    "M54.50": ("279039007", "Low back pain"),
    "G83.4": ("192970008", "Cauda equina syndrome"),
    "R33.9": ("267064002", "Retention of urine"),
    "R15.9": ("72042002", "Incontinence of feces"),
    "R20.0": ("44077006", "Numbness"),  # anaesthesia of skin: the free set's nearest, numbness
    "R20.2": ("91019004", "Paresthesia"),
    "C44.91": ("254701007", "Basal cell carcinoma of skin"),
    "D84.9": ("234532001", "Immunodeficiency disorder"),
    "F11.20": ("75544000", "Opioid dependence"),
    "M81.0": ("64859006", "Osteoporosis"),
    "M96.1": ("202725007", "Lumbar post-laminectomy syndrome"),
    "R50.9": ("386661006", "Fever"),
    "R63.4": ("267024001", "Abnormal weight loss"),
    "Z85.46": ("428262008", "History of malignant neoplasm of prostate"),
    "Z95.0": ("441509002", "Cardiac pacemaker in situ"),
    "E11.9": ("44054006", "Type 2 diabetes mellitus"),
    "E78.5": ("55822004", "Hyperlipidemia"),
    "I10": ("38341003", "Hypertensive disorder"),
    "J45.909": ("195967001", "Asthma"),
    "M46.26": ("203241002", "Osteomyelitis of vertebra"),  # the free set names no region
    "F11.21": ("191821007", "Opioid dependence in remission"),
    "Z94.0": ("161665007", "History of renal transplant"),
    # issue 21: dorsalgia with no region is backache; trauma; an ankylosed spine; metastases
    "M54.9": ("161891005", "Backache"),
    "M54.89": ("161891005", "Backache"),
    "C79.51": ("94222008", "Metastatic malignant neoplasm to bone"),
    "R50.82": ("386661006", "Fever"),  # postprocedural fever: the free set's nearest, fever
    "M45.9": ("9631008", "Ankylosing spondylitis"),
    "M48.16": ("31487001", "Disseminated idiopathic skeletal hyperostosis"),
    "W01.0XXA": ("217154006", "Fall on same level from slipping, tripping or stumbling"),
    "W19.XXXA": ("1912002", "Fall"),
    "Z33.1": ("77386006", "Pregnancy"),
    "Z3A.20": ("77386006", "Pregnancy"),  # weeks of gestation: the free set's, pregnancy
    "N18.6": ("46177005", "End-stage renal disease"),
    "Z99.2": ("428982002", "Dependence on hemodialysis due to end stage renal disease"),
}
SCENARIO_FIXTURES = sorted(p.stem for p in (FIXTURES / "requests").glob("v[1-7]-*.json"))
ENGINE = Engine(load_knowledge(), load_templates(ROOT / "cards"), dev_settings())


def recode(value: Any) -> Any:
    """A copy with every ICD-10-CM coding replaced by its SNOMED CT concept."""
    if isinstance(value, list):
        return [recode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if value.get("system") == ICD and "code" in value:
        code, display = ICD_TO_SNOMED[value["code"]]
        return {**value, "system": SCT, "code": code, "display": display}
    return {k: recode(v) for k, v in value.items()}


def outcome(body: dict[str, Any]) -> list[tuple[Any, ...]]:
    request = HookRequest.model_validate(body)
    record = record_from_prefetch(request.prefetch, request.context.patientId)
    answer = ENGINE.answer(ENGINE.rate(request, record, FIXTURE_NOW))
    return [(r.procedure.id, r.decision.pama, r.decision.category,
             sorted(r.decision.variants or []), r.kinds) for r in answer.orders]


def test_the_map_is_the_free_sets() -> None:
    with FREE_SET.open(encoding="utf-8") as f:
        terms = {row["code"]: row["display"] for row in csv.DictReader(f)}
    assert {code: terms.get(code) for code, _ in ICD_TO_SNOMED.values()} == {
        code: display for code, display in ICD_TO_SNOMED.values()}


def test_every_variant_has_a_fixture() -> None:
    assert {name[:2] for name in SCENARIO_FIXTURES} == {f"v{i}" for i in range(1, 8)}


@pytest.mark.parametrize("name", SCENARIO_FIXTURES)
def test_a_snomed_only_record_is_rated_as_its_icd_fixture(name: str) -> None:
    body = json.loads((FIXTURES / "requests" / f"{name}.json").read_text())
    snomed = recode(copy.deepcopy(body))
    assert ICD not in json.dumps(snomed)
    assert outcome(snomed) == outcome(body)
