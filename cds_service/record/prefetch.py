"""Turn the prefetch object of a hook request into a :class:`PatientRecord`.

Each prefetch key arrives in one of four states: absent, ``null``, an ``OperationOutcome`` or a
resource / Bundle. A source that was received is a closed world (absent there means absent in the
patient); a missing one leaves the facts it would give unknown. A Bundle with a ``next`` link that
was not followed is partial: what it holds counts, what it lacks is not proof of absence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# key -> (resource type, FHIR query). Type searches without filters: the service filters itself.
PREFETCH_TEMPLATES: dict[str, tuple[str, str]] = {
    "patient": ("Patient", "Patient/{{context.patientId}}"),
    "conditions": ("Condition", "Condition?patient={{context.patientId}}"),
    "procedures": ("Procedure", "Procedure?patient={{context.patientId}}"),
    "servicerequests": ("ServiceRequest", "ServiceRequest?patient={{context.patientId}}"),
    "medications": ("MedicationRequest", "MedicationRequest?patient={{context.patientId}}"),
    # the clinician's answers to the service's Questionnaire (the SMART app writes them)
    "questionnaireresponses": ("QuestionnaireResponse",
                               "QuestionnaireResponse?patient={{context.patientId}}"),
    # allergies and intolerances (contrast media): optional; without them a contrast allergy is
    # unknown, which avoids nothing and asks for nothing
    "allergies": ("AllergyIntolerance", "AllergyIntolerance?patient={{context.patientId}}"),
}
# prefetch key -> PatientRecord attribute
SOURCE_ATTRS = {"patient": "patient", "conditions": "conditions", "procedures": "procedures",
                "servicerequests": "service_requests", "medications": "medications",
                "questionnaireresponses": "questionnaire_responses", "allergies": "allergies"}
# Sources that only add (answers, allergies): without them nothing the rating reads is unknown,
# so nothing is asked for
OPTIONAL_KEYS = frozenset({"questionnaireresponses", "allergies"})


class SourceState(StrEnum):
    COMPLETE = "complete"
    PARTIAL = "partial"
    MISSING = "missing"


@dataclass
class Source:
    """The resources of one kind received for the patient, and whether the list is whole."""

    state: SourceState
    resources: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None
    next_url: str | None = None

    # (written out: a compiled class's own __init__ is native; the one @dataclass makes is not)
    def __init__(self, state: SourceState, resources: list[dict[str, Any]] | None = None,
                 note: str | None = None, next_url: str | None = None) -> None:
        self.state = state
        self.resources = [] if resources is None else resources
        self.note = note
        self.next_url = next_url

    @property
    def received(self) -> bool:
        return self.state is not SourceState.MISSING


@dataclass
class PatientRecord:
    """Everything known about the patient for one hook call (plain dicts, not yet validated)."""

    patient_id: str
    patient: Source
    conditions: Source
    procedures: Source
    service_requests: Source
    medications: Source = field(default_factory=lambda: Source(SourceState.MISSING,
                                                               note="not prefetched"))
    questionnaire_responses: Source = field(
        default_factory=lambda: Source(SourceState.MISSING, note="not prefetched"))
    allergies: Source = field(
        default_factory=lambda: Source(SourceState.MISSING, note="not prefetched"))

    def sources(self) -> dict[str, Source]:
        return {key: getattr(self, attr) for key, attr in SOURCE_ATTRS.items()}

    def replace_source(self, key: str, source: Source) -> None:
        """Put ``source`` in place of the source of prefetch key ``key`` (what a fetch from the
        FHIR server read, or a fetched source that is not to be used)."""
        setattr(self, SOURCE_ATTRS[key], source)

    def missing_keys(self) -> list[str]:
        """Prefetch keys whose data did not arrive (or arrived only in part), the optional
        ones (answers) aside."""
        return [k for k, s in self.sources().items()
                if s.state is not SourceState.COMPLETE and k not in OPTIONAL_KEYS]


def as_list(value: Any) -> list[Any]:
    """A JSON array as a list; anything else (a client's mistake) as an empty one."""
    return value if isinstance(value, list) else []


def _belongs_to(resource: Mapping[str, Any], patient_id: str) -> bool:
    """False only when the resource names another patient (EHR filters are not trusted)."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid is None or rid == patient_id
    subject = resource.get("subject") or resource.get("patient")
    if not isinstance(subject, dict):
        return True
    ref = subject.get("reference")
    if not isinstance(ref, str) or not ref:
        return True
    return ref.rstrip("/").rsplit("/", 1)[-1] == patient_id if "/" in ref else ref == patient_id


def source_from_value(value: Any, resource_type: str, patient_id: str, *,
                      present: bool) -> Source:
    """Classify one prefetch value (see the module docstring for the four states)."""
    if not present:
        return Source(SourceState.MISSING, note="not prefetched")
    if value is None:
        # A read answered null: the resource does not exist. A search answered null: no data.
        if resource_type == "Patient":
            return Source(SourceState.MISSING, note="patient not provided")
        return Source(SourceState.COMPLETE)
    if not isinstance(value, Mapping):
        return Source(SourceState.MISSING, note="not a FHIR resource")
    rtype = value.get("resourceType")
    if rtype == "OperationOutcome":
        return Source(SourceState.MISSING, note="the EHR reported an error")
    if rtype == resource_type:
        if not _belongs_to(value, patient_id):
            return Source(SourceState.MISSING, note="resource of another patient")
        return Source(SourceState.COMPLETE, [dict(value)])
    if rtype != "Bundle" and not (rtype is None and "entry" in value):
        return Source(SourceState.MISSING, note=f"unexpected resource type {rtype}")
    resources: list[dict[str, Any]] = []
    own = f"Patient/{patient_id}"  # the usual reference: checked without the general rule
    for entry in as_list(value.get("entry")):
        res = entry.get("resource") if type(entry) is dict else None
        if type(res) is not dict or res.get("resourceType") != resource_type:
            continue
        subject = res.get("subject")
        if (type(subject) is dict and subject.get("reference") == own) or _belongs_to(
                res, patient_id):
            resources.append(res)
    next_url = next_link(value)
    if next_url:
        return Source(SourceState.PARTIAL, resources, note="more pages not read",
                      next_url=next_url)
    return Source(SourceState.COMPLETE, resources)


def next_link(bundle: Mapping[str, Any]) -> str | None:
    """The Bundle's ``next`` page URL, if any."""
    for link in as_list(bundle.get("link")):
        if isinstance(link, Mapping) and link.get("relation") == "next":
            url = link.get("url")
            if isinstance(url, str) and url:
                return url
    return None


def record_from_prefetch(prefetch: Mapping[str, Any] | None, patient_id: str) -> PatientRecord:
    """Build the patient record from a request's prefetch object (None = nothing prefetched)."""
    prefetch = prefetch if isinstance(prefetch, Mapping) else {}
    sources = {
        key: source_from_value(prefetch.get(key), rtype, patient_id, present=key in prefetch)
        for key, (rtype, _) in PREFETCH_TEMPLATES.items()
    }
    return PatientRecord(patient_id=patient_id,
                         **{attr: sources[key] for key, attr in SOURCE_ATTRS.items()})
