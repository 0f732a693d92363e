"""Every ICD-10-CM code in the knowledge exists in the official tabular (simple-icd-10-cm).

A clinician editing valuesets.yaml cannot add a typo: an exact code must be a real code, a prefix
must be a real category or subcategory (a one-letter chapter prefix must open real codes), and
the same holds for the exclusions. Every entry also names its source (the loader refuses it
otherwise; see test_startup).
"""

from __future__ import annotations

from typing import Any

import pytest
import simple_icd_10_cm as icd
import yaml

from cds_service.knowledge import KNOWLEDGE_DIR, load_knowledge

DOC = yaml.safe_load((KNOWLEDGE_DIR / "valuesets.yaml").read_text())
ALL_CODES = icd.get_all_codes(with_dots=True)


def icd_entries() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for vs_id, vs in DOC["valuesets"].items():
        for kind in ("entries", "excludes"):
            for entry in vs.get(kind) or []:
                if entry["system"] == "icd10cm":
                    out.append((vs_id, kind, entry))
    return out


ENTRIES = icd_entries()


def test_there_are_icd10cm_entries_to_check() -> None:
    assert len(ENTRIES) >= 80


@pytest.mark.parametrize(("vs_id", "kind", "entry"), ENTRIES,
                         ids=[f"{v}:{e.get('code', e.get('prefix'))}" for v, _, e in ENTRIES])
def test_icd10cm_code_is_in_the_official_tabular(vs_id: str, kind: str,
                                                 entry: dict[str, Any]) -> None:
    assert entry.get("source"), f"{vs_id}: {entry} has no source"
    if "code" in entry:
        assert icd.is_valid_item(entry["code"]), f"{vs_id} {kind}: {entry['code']} is not ICD-10-CM"
        return
    prefix = entry["prefix"]
    if len(prefix) == 1:  # a chapter letter: it must open real codes
        assert any(c.startswith(prefix) for c in ALL_CODES if c[0].isalpha())
    else:
        assert icd.is_valid_item(prefix), f"{vs_id} {kind}: prefix {prefix} is not ICD-10-CM"


@pytest.mark.parametrize(("code", "counts"), [
    ("C44.91", False), ("C61", True), ("C43.9", True), ("Z85.828", False), ("Z85.820", True),
    ("Z85.46", True)])
def test_non_melanoma_skin_cancer_is_excluded_and_melanoma_counts(code: str,
                                                                  counts: bool) -> None:
    sets = load_knowledge().valuesets_of("http://hl7.org/fhir/sid/icd-10-cm", code)
    assert ("cancer" in sets) is counts
