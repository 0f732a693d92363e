"""The FHIR resources the service publishes at its canonical URLs: the CodeSystems its cards and
ratings name (ACR categories, override reasons, the answers) and the Questionnaire of the
questions that decide a rating."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cds_service.codesystems import SystemUrls, code_systems
from cds_service.questionnaire import Questions, answers_code_system, build_questionnaire
from cds_service.render import CardTemplates


@dataclass(frozen=True)
class Published:
    code_systems: dict[str, dict[str, Any]]  # id -> CodeSystem
    questionnaire: dict[str, Any]


def publish(systems: SystemUrls, templates: CardTemplates, questions: Questions,
            canonical_root: str, version: str) -> Published:
    """Every resource, built once at start-up."""
    # our own reasons, today's and former ones (feedback may still name those): the HL7
    # Non-Adherence Reason codes the cards also offer are HL7's, not published here
    reasons = [r for k in templates.kinds.values() for r in k.override_reasons]
    reasons += templates.former_reasons
    systems_by_id = code_systems(systems, templates.categories, reasons, version)
    systems_by_id[questions.answers_system_id] = answers_code_system(
        questions, canonical_root, version)
    return Published(systems_by_id, build_questionnaire(questions, canonical_root))
