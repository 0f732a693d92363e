"""The fixed vocabularies of the knowledge files: variants, categories, modalities, regions."""

from __future__ import annotations

from cds_service.clinical.registry import ASKED, NAMES

VARIANTS = ("V1", "V2", "V3", "V4", "V5", "V6", "V7")
CATEGORIES = ("UA", "MBA", "MBA(D)", "UNA")
# Higher is better: a patient in two scenarios may have the study either one supports.
CATEGORY_RANK = {"UA": 3, "MBA": 2, "MBA(D)": 1, "UNA": 0}
PAMA_CODE = {"UA": "appropriate", "MBA": "appropriate", "MBA(D)": "appropriate",
             "UNA": "not-appropriate"}
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
MODALITIES = {"XR", "CT", "MR", "NM", "PET"}
REGIONS = {"lumbar", "whole-body"}
CONTRASTS = ("none", "iv", "iv-wo-w", "intrathecal", "intradiscal", "radiotracer")
# The facts a question may settle, in the registry's order (cds_service/clinical/registry.py)
QUESTION_FACTS = tuple(name for name in NAMES if name in ASKED)
QUESTION_TYPES = ("boolean", "integer", "choice")
