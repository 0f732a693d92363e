"""Every SNOMED CT code in the knowledge is in the SNOMED CT IPS Free Set, with the same meaning.

The free set (CC BY 4.0, copied with its attribution into ``tests/data/snomed-ct-ips-free-set/``)
is to SNOMED CT what the official tabular is to ICD-10-CM (``test_knowledge_codes.py``): a code in
``valuesets.yaml`` or ``procedures.yaml`` must be one of its concepts, its display (where the
knowledge gives one) must be the free set's term, and its source must name the free-set file that
holds it. The few codes the free set lacks cite another published source, listed with its term in
``other-sources.csv``. A concept in neither is unverified and stays out.

The set has no hierarchy, so each value set lists every code a rule needs; the tests below also
pin what real-shaped records (the four Synthea patients of ``shared/examples/synthea``) are read as.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from cds_service.knowledge import KNOWLEDGE_DIR, KnowledgeError, load_knowledge

DATA = Path(__file__).parent / "data" / "snomed-ct-ips-free-set"
SCT = "http://snomed.info/sct"
FREE_SET_FILES = ("problems.csv", "procedures.csv", "medical-devices.csv")


def read_csv(name: str) -> list[dict[str, str]]:
    with (DATA / name).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


FREE_SET = {row["code"]: (name, row["display"]) for name in FREE_SET_FILES
            for row in read_csv(name)}
OTHER = {row["code"]: row for row in read_csv("other-sources.csv")}
SEMANTIC_TAG = re.compile(r" \((procedure|finding|disorder|situation|regime/therapy)\)$")


def snomed_entries() -> list[tuple[str, dict[str, Any]]]:
    """(where, entry) of every SNOMED CT code in valuesets.yaml and procedures.yaml."""
    out: list[tuple[str, dict[str, Any]]] = []
    vs_doc = yaml.safe_load((KNOWLEDGE_DIR / "valuesets.yaml").read_text())
    for vs_id, vs in vs_doc["valuesets"].items():
        for kind in ("entries", "excludes"):
            for entry in vs.get(kind) or []:
                if entry["system"] in ("snomed", SCT):
                    out.append((f"valuesets.{vs_id}.{kind}", entry))
    proc_doc = yaml.safe_load((KNOWLEDGE_DIR / "procedures.yaml").read_text())
    for p in proc_doc["procedures"]:
        for kind in ("codes", "order_codes"):
            for entry in p.get(kind) or []:
                if entry["system"] in ("snomed", SCT):
                    out.append((f"procedures.{p['id']}.{kind}", entry))
    for i, combo in enumerate(proc_doc.get("combinations") or []):
        for entry in combo["with_any"]:
            if entry["system"] in ("snomed", SCT):
                out.append((f"combinations[{i}]", entry))
    return out


ENTRIES = snomed_entries()


def test_the_free_set_copy_is_whole() -> None:
    assert len(FREE_SET) == 5622 + 690 + 72


def test_there_are_snomed_entries_to_check() -> None:
    assert len(ENTRIES) >= 400


@pytest.mark.parametrize(("where", "entry"), ENTRIES,
                         ids=[f"{w}:{e.get('code', e.get('prefix'))}" for w, e in ENTRIES])
def test_snomed_code_is_in_the_free_set_with_its_meaning(where: str,
                                                         entry: dict[str, Any]) -> None:
    assert "code" in entry, f"{where}: SNOMED CT has no prefixes (the free set has no hierarchy)"
    code = str(entry["code"])
    source = str(entry.get("source", ""))
    if code in FREE_SET:
        name, display = FREE_SET[code]
        assert source == f"SNOMED CT IPS Free Set ({name})", (
            f"{where}: {code} is in the free set's {name}; cite it so: {source!r}")
        if "display" in entry:
            assert entry["display"] == display, (
                f"{where}: {code} is {display!r} in the free set, not {entry['display']!r}")
        return
    assert code in OTHER, (f"{where}: SNOMED CT {code} is neither in the IPS Free Set nor in "
                           "other-sources.csv: unverified, leave it out")
    row = OTHER[code]
    assert source == row["source"], f"{where}: {code} must cite {row['source']!r}"
    assert entry.get("display") == SEMANTIC_TAG.sub("", row["display"]), (
        f"{where}: {code} is {row['display']!r} in its source")


def test_the_other_sources_are_not_in_the_free_set() -> None:
    assert not set(OTHER) & set(FREE_SET)  # a free-set code cites the free set


# ------------------------------------------------------------------ what the codes are read as

SYNTHEA_READ = {  # code in the four Synthea records -> value sets it is in
    "278860009": {"low_back_pain"},  # Chronic low back pain
    "52052004": {"physical_therapy"},  # Rehabilitation therapy (care only as care for the back)
}
# Every other Condition and Procedure code of the four records is read as nothing, among them on
# purpose: 82423001 Chronic pain (any site), 1121000119107 Chronic neck pain, 6525002 Dependent drug
# abuse (not in the free set: unverified), 1149222004 Overdose, 278588009 Fractured dental filling,
# 762993000 Assessment using Morse Fall Scale (a fall risk, not a fall), dental X-ray and care.
SYNTHEA_UNREAD = (
    "473461003 40055000 59621000 431855005 127013003 266948004 82423001 423315002 422650009 "
    "160903007 706893006 314529007 73595000 430193006 710824005 710841007 171207006 "
    "428211000124100 763302001 103697008 18718003 34043003 225362009 1260009003 1260010008 "
    "274788003 81733005 3802001 64544008 456191000124101 68071007 243085009 866148006 241046008 "
    "66383009 160904001 713106006 73438004 424393004 224299000 162864005 161744009 1121000119107 "
    "414545008 274531002 399261000 39898005 73430006 103750000 278588009 1259293006 741062008 "
    "10939881000119105 160968000 224295006 37320007 714628002 271737000 195967001 444814009 "
    "196416002 124171000119105 6525002 446654005 1149222004 762993000").split()


@pytest.fixture(scope="module")
def knowledge() -> Any:
    return load_knowledge()


def test_synthea_records_are_read(knowledge: Any) -> None:
    for code, sets in SYNTHEA_READ.items():
        assert knowledge.valuesets_of(SCT, code) == sets, code
    for code in SYNTHEA_UNREAD:
        assert knowledge.valuesets_of(SCT, code) == frozenset(), code


@pytest.mark.parametrize(("code", "vs", "counts"), [
    ("279039007", "low_back_pain", True), ("161891005", "low_back_pain", True),
    ("134407002", "low_back_pain", True), ("279038004", "low_back_pain", False),  # thoracic
    ("128196005", "radiculopathy", True), ("52585001", "radiculopathy", False),
    ("12454008", "cauda_equina", True), ("236648008", "ces_bladder_bowel", True),
    ("22220005", "ces_bladder_bowel", False),  # genuine stress incontinence: a benign cause
    ("6077001", "neuro_deficit", True), ("26544005", "neuro_deficit", False),  # muscle weakness
    ("254837009", "cancer", True), ("94602001", "cancer", True), ("161432005", "cancer", True),
    ("254701007", "cancer", False), ("254651007", "cancer", False),  # basal / squamous of skin
    ("428053000", "cancer", False), ("109266006", "cancer", False),  # skin history; in situ
    ("275937001", "cancer", False), ("92102001", "cancer", False),  # family history; benign
    ("721104000", "systemic_infection", True), ("386661006", "systemic_infection", True),
    ("203241002", "spinal_infection", True), ("28769004", "spinal_infection", False),  # foot
    ("5602001", "drug_use", True), ("191821007", "drug_use", False),  # in remission
    ("161665007", "immunosuppression", True), ("86406008", "immunosuppression", True),
    ("64859006", "osteoporosis", True), ("312894000", "osteoporosis", False),  # osteopenia
    ("207957008", "recent_trauma", True), ("217154006", "recent_trauma", True),
    ("23406007", "recent_trauma", False), ("86591008", "recent_trauma", False),  # limb; ladder
    ("125606003", "recent_trauma", False),  # cervical fracture
    ("441509002", "mri_safety", True), ("43252007", "mri_safety", True),
    ("91251008", "physical_therapy", True), ("50172003", "lumbar_surgery_procedure", True),
    ("3418002", "lumbar_surgery_procedure", False),  # discectomy of spine: names no level
    ("202725007", "prior_lumbar_surgery", True),
])
def test_snomed_concepts_are_read_as_their_fact(knowledge: Any, code: str, vs: str,
                                                counts: bool) -> None:
    assert (vs in knowledge.valuesets_of(SCT, code)) is counts


# ------------------------------------------------------------------ medications


@pytest.mark.parametrize(("text", "classes"), [
    ("predniSONE 20 MG Oral Tablet", {"systemic_corticosteroids"}),
    ("methylPREDNISolone 4 MG Oral Tablet", {"systemic_corticosteroids"}),
    ("dexamethasone 4 MG/ML Injectable Solution", {"systemic_corticosteroids"}),
    ("Hydrocortisone 10 MG/ML Topical Cream", set()),
    ("fluticasone propionate 0.11 MG/ACTUAT Metered Dose Inhaler", set()),
    ("budesonide 0.5 MG/ML Inhalation Suspension", set()),
    ("Dexamethasone 1 MG/ML Ophthalmic Suspension", set()),
    ("triamcinolone acetonide 0.055 MG/ACTUAT Metered Dose Nasal Spray", set()),
    ("tacrolimus 1 MG Oral Capsule", {"immunosuppressive_drugs"}),
    ("cycloSPORINE, modified 100 MG Oral Capsule", {"immunosuppressive_drugs"}),
    ("ciclosporin 0.5 MG/ML Ophthalmic Emulsion", set()),
    ("tacrolimus 0.001 MG/MG Topical Ointment", set()),
    ("mycophenolate mofetil 500 MG Oral Tablet", {"immunosuppressive_drugs"}),
    ("Methotrexate 2.5 MG Oral Tablet", {"immunosuppressive_drugs"}),
    ("adalimumab 40 MG/0.4ML Auto-Injector [Humira]", {"immunosuppressive_drugs"}),
    ("prednisoLONE 5 MG and azathioprine 50 MG",
     {"systemic_corticosteroids", "immunosuppressive_drugs"}),
    ("Ibuprofen 400 MG Oral Tablet", set()),
    ("hydroxychloroquine sulfate 200 MG Oral Tablet", set()),
    ("", set()),
])
def test_medication_classes_of(knowledge: Any, text: str, classes: set[str]) -> None:
    assert knowledge.medication_classes_of(text) == classes
    assert knowledge.medication_classes_of(text) == classes  # (cached) the same


def test_medication_classes_are_exposed(knowledge: Any) -> None:
    assert set(knowledge.medication_classes) == {"systemic_corticosteroids",
                                                 "immunosuppressive_drugs",
                                                 "iodinated_contrast", "gadolinium_contrast"}
    for mc in knowledge.medication_classes.values():
        assert mc.source and mc.description and mc.terms
        assert all(t == t.lower() for t in mc.terms + mc.exclude_terms)


@pytest.mark.parametrize(("text", "counts"), [
    ("fentanyl 25 MCG/HR Transdermal System", True),
    ("Acetaminophen 325 MG / Oxycodone Hydrochloride 5 MG Oral Tablet", True),
    ("Acetaminophen 300 MG / Codeine Phosphate 15 MG Oral Tablet", True),
    ("tramadol hydrochloride 50 MG Oral Tablet", True),
    ("Ibuprofen 400 MG Oral Tablet [Ibu]", True), ("naproxen sodium 220 MG Oral Tablet", True),
    ("meloxicam 15 MG Oral Tablet", True), ("cyclobenzaprine hydrochloride 10 MG", True),
    ("gabapentin 300 MG Oral Capsule", True),
    ("Acetaminophen 325 MG Oral Tablet [Tylenol]", False),  # plain analgesic: see valuesets.yaml
    ("amLODIPine 2.5 MG Oral Tablet", False),
])
def test_back_pain_medication_terms(knowledge: Any, text: str, counts: bool) -> None:
    # (read as the scan reads them: an ingredient named in the medication's text)
    assert any(term in text.lower() for term in knowledge.medication_terms) is counts


@pytest.mark.parametrize(("old", "new", "match"), [
    ("terms: [prednisone,", "terms: [prednisone, topical,", "also an exclude term"),
    ("terms: [prednisone,", "terms: [predniso.*,", "not a word"),
    ("  immunosuppressive_drugs:\n    description:", "  immunosuppressive_drugs:\n    descr:",
     "descr"),
])
def test_medication_classes_are_checked(tmp_path: Path, old: str, new: str, match: str) -> None:
    know = tmp_path / "knowledge"
    shutil.copytree(KNOWLEDGE_DIR, know)
    path = know / "valuesets.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(KnowledgeError, match=match):
        load_knowledge(know)
