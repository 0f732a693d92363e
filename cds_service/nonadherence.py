"""The HL7 Non-Adherence Reason codes: the override reasons CDS Hooks 3.0 suggests, so that
override analytics compare across services and sites.

Source: HL7 CDS Hooks 3.0.0, CodeSystem ``non-adherence-reason-codes``
(github.com/HL7/cds-hooks, ``input/vocabulary/CodeSystem-non-adherence-reason-codes.json`` at
commit 16b2bfc7; published at https://build.fhir.org/ig/HL7/cds-hooks/en/CodeSystem-non-adherence-reason-codes.html),
itself from the AHRQ CDSiC taxonomy "Approaches to Standardizing Override Reasons for
Patient-Centered Clinical Decision Support" (2025). Six categories, each with sub-codes; every
display below is the code system's, character for character (a service SHALL send it). The
cards name the codes they offer (``cards/<kind>.yaml``, ``non_adherence_reasons``); the
displays come from here only.
"""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM = "http://terminology.hl7.org/CodeSystem/non-adherence-reason-codes"
SOURCE = ("HL7 CDS Hooks 3.0.0, CodeSystem non-adherence-reason-codes "
          "(github.com/HL7/cds-hooks input/vocabulary, commit 16b2bfc7)")


@dataclass(frozen=True)
class NonAdherenceReason:
    code: str
    display: str
    category: str  # the category's own code for a category


def _group(category: str, display: str,
           codes: tuple[tuple[str, str], ...]) -> tuple[NonAdherenceReason, ...]:
    return (NonAdherenceReason(category, display, category),
            *(NonAdherenceReason(code, shown, category) for code, shown in codes))


CODES: tuple[NonAdherenceReason, ...] = (
    *_group("cds-not-applicable", "PC CDS does not apply to patient", (
        ("patient-ineligible", "Patient does not meet eligibility for recommended action"),
        ("indication-order-exists", "Patient has indication/order for intended action"),
        ("action-completed", "Recommended action was already completed"),
        ("action-unsuccessful", "Recommended action was previously unsuccessful"),
        ("action-performed-no-adverse-effect",
         "Intended action was performed previously without adverse effect"),
        ("action-not-priority",
         "Recommended action is not relevant or a priority in current state of health"))),
    *_group("cds-suboptimal-context", "PC CDS delivered in suboptimal context", (
        ("limited-time", "Could not address recommended action due to limited time"),
        ("wrong-time-workflow", "PC CDS delivered at wrong time in workflow or patient lifecycle"),
        ("inappropriate-recipient", "PC CDS delivered to inappropriate recipient/role"),
        ("need-more-info", "Could not address recommended action due to need for more "
                           "information/pending results/pending consult"))),
    *_group("recipient-disagrees-evidence",
            "Recipient disagrees with recommendation because of issues with the evidence", (
                ("does-not-align-latest-evidence",
                 "Recommended action does not align with the latest evidence"),
                ("expert-contradicts", "Advice from expert contradicts the recommended action"),
                ("policy-contradicts",
                 "Institutional policy/guideline contradicts the recommended action"),
                ("recipient-does-not-trust",
                 "Recipient does not agree with or trust the recommended action"))),
    *_group("recipient-concerns-outcomes",
            "Recipient has concerns regarding potential health outcomes", (
                ("risk-benefit-ratio", "Recipient assessment of risk/benefit ratio"),
                ("mitigate-risk-negative-outcome",
                 "Action taken to mitigate risk of negative outcome"),
                ("likely-negative-health-outcomes",
                 "Recommended action likely to have negative health outcomes"),
                ("patient-contraindication",
                 "Patient has contraindication to recommended action"))),
    *_group("does-not-align-preferences",
            "Recommendation does not align with patient preferences or values", (
                ("patient-fears-discomfort",
                 "Patient fears discomfort from complying with recommended action"),
                ("patient-does-not-want-change", "Patient does not want to change behavior or "
                                                 "believes the change is unnecessary"),
                ("cultural-religious-reason", "Patient has a cultural or religious reason for "
                                              "not following recommended action"),
                ("prefers-alternative", "Patient prefers an alternative approach or treatment"),
                ("patient-refuses", "Patient refuses/declines (no context given)*"))),
    *_group("not-convenient-feasible", "Recommendation is not convenient or feasible", (
        ("inadequate-support", "Patient has inadequate caregiver/social support"),
        ("service-not-available", "Treatment or service is not practically available"),
        ("implementation-challenges",
         "Recommended action cannot be implemented due to technology/challenges"),
        ("too-costly-uncovered", "Recommended action is too costly or not covered by insurance"),
        ("recipient-does-not-understand", "Recipient does not understand the recommended action "
                                          "or know how to perform the recommended action"),
        ("comorbidity-disability", "Patient has co-morbidity or disability that hinders them "
                                   "from completing recommended action"))),
)

BY_CODE: dict[str, NonAdherenceReason] = {r.code: r for r in CODES}
CATEGORIES: tuple[str, ...] = tuple(r.code for r in CODES if r.code == r.category)


def display_of(code: str | None) -> str | None:
    """The code system's display of a code, None if it is not one of its codes."""
    found = BY_CODE.get(code or "")
    return found.display if found else None


def category_of(code: str | None) -> str | None:
    """The category a code belongs to (a category is its own), None if not a code here."""
    found = BY_CODE.get(code or "")
    return found.category if found else None
