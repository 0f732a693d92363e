"""One pass over the patient record: every resource screened by code, the few that match a value
set or a catalog procedure kept as hits (with their dates and status), validated with the FHIR R4B
models only when a rule uses them.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from fhir.resources.R4B.allergyintolerance import AllergyIntolerance
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.procedure import Procedure as FhirProcedure
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import ValidationError

from cds_service.clinical.dates import add_age, parse_span, period_start
from cds_service.clinical.model import MIN_TIME, Evidence, Span
from cds_service.clinical.registry import (
    ALLERGY_CLASSES,
    BACK_PAIN_MEDICATION,
    INTERVENTION_SETS,
    LBP_SETS,
    MEDICATION_CLASSES,
    OPAQUE,
    THERAPY_SETS,
)
from cds_service.knowledge import Knowledge
from cds_service.record import PatientRecord
from cds_service.record.prefetch import as_list

ACTIVE = {"active", "recurrence", "relapse"}
ONGOING = datetime.max.replace(tzinfo=UTC)  # Hit.until of care still under way (up to now)
DAYS_PER = {"d": 1, "day": 1, "days": 1, "wk": 7, "week": 7, "weeks": 7, "mo": 30, "month": 30,
            "months": 30}
# Words of a referral's code or text that make it a referral to therapy (care, not candidacy).
THERAPY_REFERRAL = ("physio", "physical therap", "chiropract", "manual therap", "exercise therap")
EXCLUDED_VERIFICATION = {"refuted", "entered-in-error"}
MODELS: dict[str, Any] = {
    "Condition": Condition, "Procedure": FhirProcedure, "ServiceRequest": ServiceRequest,
    "MedicationRequest": MedicationRequest, "AllergyIntolerance": AllergyIntolerance}


@dataclass
class Hit:
    """A resource whose code matched at least one value set or catalog procedure."""

    rtype: str
    rid: str
    sets: frozenset[str]
    coding: dict[str, Any]
    active: bool
    usable: bool
    start: datetime | None
    end: datetime | None
    procedure: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    text: str = ""
    _readable: bool | None = field(default=None, repr=False)
    # the documented end of a course of care (a period's end, a supply's end); ONGOING: an
    # active order with no documented end, taken up to now
    until: datetime | None = None
    words: str | None = None  # the concept's own text where ``raw`` is not its resource

    # (written out: a compiled class's own __init__ is native; the one @dataclass makes is not)
    def __init__(self, rtype: str, rid: str, sets: frozenset[str], coding: dict[str, Any],
                 active: bool, usable: bool, start: datetime | None, end: datetime | None,
                 procedure: str | None = None, raw: Mapping[str, Any] | None = None,
                 text: str = "", _readable: bool | None = None, until: datetime | None = None,
                 words: str | None = None) -> None:
        self.rtype, self.rid, self.sets, self.coding = rtype, rid, sets, coding
        self.active, self.usable, self.start, self.end = active, usable, start, end
        self.procedure = procedure
        self.raw = {} if raw is None else raw
        self.text, self._readable, self.until, self.words = text, _readable, until, words

    @property
    def readable(self) -> bool:
        """Whether the resource passes FHIR R4B validation (checked once, only when used)."""
        if self._readable is None:
            self._readable = not self.raw or _validate(self.rtype, self.raw)
        return self._readable

    @property
    def latest(self) -> datetime | None:
        return self.end or (self.start if self.start != MIN_TIME else None)

    def evidence(self, role: str, display: str | None = None) -> Evidence:
        day = None
        if self.start and self.start != MIN_TIME:
            day = self.start.date().isoformat()
        elif self.end:
            day = self.end.date().isoformat()
        return Evidence(resource=f"{self.rtype}/{self.rid}",
                        system=str(self.coding.get("system", "")),
                        code=str(self.coding.get("code", "")),
                        display=self.coding.get("display") or self.text or display or None,
                        date=day, role=role,
                        text=self.words if self.words is not None else _own_text(self.raw))


def _own_text(raw: Mapping[str, Any]) -> str | None:
    """The text of a resource's code as the record words it (a card names the finding by it)."""
    concept = raw.get("code") or raw.get("medicationCodeableConcept")
    text = concept.get("text") if isinstance(concept, Mapping) else None
    return text.strip() or None if isinstance(text, str) else None


@dataclass
class RecordScan:
    """The patient-level part of the facts: one pass over the record."""

    record: PatientRecord
    conditions: list[Hit]
    procedures: list[Hit]
    service_requests: list[Hit]
    birth: Span | None
    medications: list[Hit] = field(default_factory=list)
    # active conditions coded in no system the knowledge reads (text only, a local code): they
    # may be anything, so the facts read from conditions cannot be "no" beside them
    opaque_conditions: list[Hit] = field(default_factory=list)
    # allergies and intolerances to a substance class a fact reads (contrast media), or that
    # name no substance the service can read (OPAQUE)
    allergies: list[Hit] = field(default_factory=list)
    _by_set: dict[str, list[Hit]] | None = field(default=None, repr=False)
    # what the rules derive from the record alone, kept for the call's other orders (order-sign
    # rates every draft against one scan): patient-level work once per call
    memo: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)

    def conditions_in(self, vs: str) -> list[Hit]:
        """The condition hits of one value set, in record order (indexed once per scan)."""
        return self._index().get(vs, [])

    def condition_sets(self) -> frozenset[str]:
        """The value sets some condition hit is in."""
        return frozenset(self._index())

    def _index(self) -> dict[str, list[Hit]]:
        if self._by_set is None:
            index: dict[str, list[Hit]] = {}
            for h in self.conditions:
                for name in h.sets:
                    index.setdefault(name, []).append(h)
            self._by_set = index
        return self._by_set


def codings_of(concept: Any) -> list[Mapping[str, Any]]:
    if isinstance(concept, dict):
        codings = concept.get("coding")
        if isinstance(codings, list):
            return [c for c in codings if isinstance(c, dict)]
    return []


def codings_of_all(concepts: Any) -> list[Mapping[str, Any]]:
    out: list[Mapping[str, Any]] = []
    for c in concepts if isinstance(concepts, list) else []:
        out.extend(codings_of(c))
    return out


def text_of(*concepts: Any) -> str:
    """The human text of codeable concepts (text and displays), for matching words."""
    parts: list[str] = []
    for concept in concepts:
        if not isinstance(concept, dict):
            continue
        text = concept.get("text")
        if isinstance(text, str):
            parts.append(text)
        codings = concept.get("coding")
        for c in codings if isinstance(codings, list) else ():
            display = c.get("display") if isinstance(c, dict) else None
            if isinstance(display, str):
                parts.append(display)
    if len(parts) == 1:
        return parts[0]
    return " ".join(dict.fromkeys(parts))  # a display repeated as the text: once


def str_field(raw: Mapping[str, Any], key: str) -> str | None:
    """A field that FHIR says is a string (a code); anything else there reads as absent."""
    value = raw.get(key)
    return value if isinstance(value, str) else None


def _status_code(concept: Any) -> str | None:
    for c in codings_of(concept):
        if isinstance(c.get("code"), str):
            return c["code"]
    return None


def _first_matching(knowledge: Knowledge, codings: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    for c in codings:
        if knowledge.valuesets_of(c.get("system"), c.get("code")):
            return dict(c)
    for c in codings:
        if knowledge.procedure_of([c]):
            return dict(c)
    return {}


_VALID: dict[bytes, bool] = {}


def _validate(rtype: str, raw: Mapping[str, Any]) -> bool:
    """Whether the resource is valid FHIR R4B (memoised by content: same bytes, same answer)."""
    try:
        key = hashlib.blake2b(rtype.encode() + orjson.dumps(raw),
                              digest_size=16).digest()
    except TypeError:
        return False
    known = _VALID.get(key)
    if known is not None:
        return known
    try:
        MODELS[rtype].model_validate(raw)
        valid = True
    except (ValidationError, ValueError, TypeError):
        valid = False
    if len(_VALID) > 20_000:
        _VALID.clear()
    _VALID[key] = valid
    return valid


def _birth(record: PatientRecord) -> Span | None:
    for patient in record.patient.resources:
        return parse_span(patient.get("birthDate"))
    return None


def scan_record(record: PatientRecord, knowledge: Knowledge) -> RecordScan:
    """Screen every resource by code and keep (validated) hits."""
    birth = _birth(record)
    conditions: list[Hit] = []
    opaque: list[Hit] = []
    screen = knowledge.screen
    by_text = knowledge.sets_by_text if knowledge.text_finds else None
    for raw in record.conditions.resources:
        code = raw.get("code")
        sets, _, readable = screen(code)
        if not sets:
            if readable:
                # coded in a system the knowledge reads, and in no value set: no, unless its
                # text names a finding (injection drug use under another code)
                sets = by_text(text_of(code)) if by_text else sets
                if not sets:
                    continue
            else:
                sets = OPAQUE_SETS
        hit = _condition_hit(raw, sets, birth, knowledge)
        if hit is not None:
            (opaque if OPAQUE in sets else conditions).append(hit)
    reasons = _ConditionReasons(
        frozenset(str(raw.get("id")) for raw in record.conditions.resources),
        frozenset(h.rid for h in conditions if h.sets & LBP_SETS))
    procedures = []
    for raw in record.procedures.resources:  # most of a chart: one screen, nothing more
        screened = screen(raw.get("code"))
        if screened[0] or screened[1] is not None:
            hit = _order_like_hit(raw, "Procedure", knowledge, screened)
            if hit is not None:
                procedures.append(hit)
    service_requests = [h for h in (_order_like_hit(raw, "ServiceRequest", knowledge)
                                    for raw in record.service_requests.resources) if h]
    procedures = [h for h in (_back_care(h, knowledge, reasons) for h in procedures) if h]
    service_requests = [h for h in (_back_care(h, knowledge, reasons) for h in service_requests)
                        if h]
    medications = [h for h in (_medication_hit(raw, knowledge, reasons)
                               for raw in record.medications.resources) if h]
    allergies = [h for h in (_allergy_hit(raw, knowledge)
                             for raw in record.allergies.resources) if h]
    return RecordScan(record, conditions, procedures, service_requests, birth, medications,
                      opaque_conditions=opaque, allergies=allergies)


NOT_CURRENT_ALLERGY = {"inactive", "resolved"}
OPAQUE_SETS = frozenset({OPAQUE})


def _allergy_hit(raw: Mapping[str, Any], knowledge: Knowledge) -> Hit | None:
    """An allergy or intolerance the rules read: to a substance class a fact counts (iodinated
    or gadolinium contrast, by the names in its code or its reactions' substances), or coded in a
    value set; refuted, entered-in-error, inactive and resolved ones do not count. One with no
    name at all is unreadable (OPAQUE): the allergy it records may be anything."""
    if (_status_code(raw.get("verificationStatus")) in EXCLUDED_VERIFICATION
            or _status_code(raw.get("clinicalStatus")) in NOT_CURRENT_ALLERGY):
        return None
    concept = raw.get("code")
    substances = [r.get("substance") for r in as_list(raw.get("reaction"))
                  if isinstance(r, Mapping)]
    text = text_of(concept, *substances)
    codings = codings_of(concept)
    sets = knowledge.medication_classes_of(text) & ALLERGY_CLASSES
    sets |= knowledge.valuesets_of_codings(codings)
    if not sets:
        if text.strip():
            return None  # another substance (penicillin, peanut)
        sets = frozenset({OPAQUE})  # a bare code: the substances are read by name
    span = parse_span(raw.get("onsetDateTime")) or parse_span(raw.get("recordedDate"))
    lo, hi = span if span else (None, None)
    coding = _first_matching(knowledge, codings) or (dict(codings[0]) if codings else {})
    return Hit("AllergyIntolerance", str(raw.get("id", "?")), sets, coding, active=True,
               usable=True, start=lo, end=hi, raw=raw, text=text.strip() or "allergy")


@dataclass(frozen=True)
class _ConditionReasons:
    """The record's Conditions as reasons: every id, and those of low back pain."""

    ids: frozenset[str]
    back_pain: frozenset[str]


BACK_SITES = ("back", "lumb", "spin", "sacr", "coccy")  # words of a body site that is the back


def _back_care(hit: Hit, knowledge: Knowledge, conditions: _ConditionReasons) -> Hit | None:
    """Therapy counts as care for back pain unless the record says it is for something else:
    reasons that are all another condition (rehabilitation for drug dependence, a knee
    replacement), or a body site that is not the back."""
    if not hit.sets & THERAPY_SETS:
        return hit
    raw = hit.raw
    codings = codings_of_all(raw.get("reasonCode"))
    refs = _reason_refs(raw)
    if knowledge.valuesets_of_codings(codings) & LBP_SETS or set(refs) & conditions.back_pain:
        return hit
    named = (any(knowledge.reads_system(c.get("system")) for c in codings)
             or bool(set(refs) & conditions.ids))
    site = text_of(*as_list(raw.get("bodySite"))).lower()
    if not named and not (site and not any(w in site for w in BACK_SITES)):
        return hit
    sets = hit.sets - THERAPY_SETS  # for something else: not back care
    if not sets and hit.procedure is None:
        return None
    return dataclasses.replace(hit, sets=sets)


def _reason_refs(raw: Mapping[str, Any]) -> list[str]:
    """The ids of the Conditions a resource's reasonReference names."""
    return [str(r["reference"]).rpartition("/")[2] for r in as_list(raw.get("reasonReference"))
            if isinstance(r, Mapping) and isinstance(r.get("reference"), str)
            and "Condition" in str(r["reference"])]


def _condition_hit(raw: Mapping[str, Any], sets: frozenset[str], birth: Span | None,
                   knowledge: Knowledge) -> Hit | None:
    if _status_code(raw.get("verificationStatus")) in EXCLUDED_VERIFICATION:
        return None
    clinical = _status_code(raw.get("clinicalStatus"))
    has_abatement = any(k.startswith("abatement") for k in raw)
    active = clinical in ACTIVE if clinical else not has_abatement
    lo, hi = _condition_onset(raw, birth)
    codings = codings_of(raw.get("code"))
    coding = _first_matching(knowledge, codings)
    if not coding and codings:  # unreadable, or found by its text: shown as the record codes it
        coding = dict(codings[0])
    return Hit("Condition", str(raw.get("id", "?")), sets, coding, active, True, lo, hi,
               raw=raw, text=text_of(raw.get("code")))


def _condition_onset(raw: Mapping[str, Any],
                     birth: Span | None) -> tuple[datetime | None, datetime | None]:
    """(earliest, latest) onset. recordedDate only bounds the onset from above."""
    span = parse_span(raw.get("onsetDateTime")) or period_start(raw.get("onsetPeriod"))
    if span is None and birth is not None and "onsetAge" in raw:
        span = add_age(birth, raw.get("onsetAge"))
    if span:
        return span
    recorded = parse_span(raw.get("recordedDate"))
    if recorded:
        return MIN_TIME, recorded[1]
    return None, None


def _order_like_hit(raw: Mapping[str, Any], rtype: str, knowledge: Knowledge,
                    screened: tuple[frozenset[str], Any, bool] | None = None) -> Hit | None:
    sets, proc, _ = screened or knowledge.screen(raw.get("code"))
    if not sets and proc is None and rtype != "ServiceRequest":
        return None  # most of a chart (visits, labs): one cached lookup per coding, no more
    codings = codings_of(raw.get("code"))
    if rtype == "ServiceRequest" and _is_referral(raw):
        sets = sets | _referral_sets(raw, sets, knowledge)
    if not sets and proc is None:
        return None
    status = str_field(raw, "status")
    period_key = "performedPeriod" if rtype == "Procedure" else "occurrencePeriod"
    if rtype == "Procedure":
        usable = status in {"completed", "in-progress"}
        planned = status == "preparation"
        span = parse_span(raw.get("performedDateTime")) or period_start(raw.get(period_key))
    else:
        usable = status in {"active", "completed"}
        planned = status in {"active", "draft", "on-hold"}
        span = (parse_span(raw.get("occurrenceDateTime"))
                or period_start(raw.get(period_key))
                or parse_span(raw.get("authoredOn")))
    if not usable and not planned:
        return None
    lo, hi = span if span else (None, None)
    return Hit(rtype, str(raw.get("id", "?")), sets, _first_matching(knowledge, codings),
               active=planned, usable=usable, start=lo, end=hi,
               procedure=proc.id if proc else None, raw=raw, text=text_of(raw.get("code")),
               until=_period_until(raw.get(period_key), status in {"active", "in-progress"}))


def _period_until(period: Any, under_way: bool) -> datetime | None:
    """The end of a performed or occurrence period; an open period of care under way runs up
    to now."""
    if not isinstance(period, dict) or parse_span(period.get("start")) is None:
        return None
    end = parse_span(period.get("end"))
    if end is not None:
        return end[1]
    return ONGOING if under_way else None


def _referral_sets(raw: Mapping[str, Any], sets: frozenset[str],
                   knowledge: Knowledge) -> frozenset[str]:
    """A referral for low back pain: to therapy (a physiotherapy code or text) it is care, not
    candidacy; to anyone else (spine surgery, pain medicine) a spine referral."""
    reasons = knowledge.valuesets_of_codings(codings_of_all(raw.get("reasonCode")))
    if not reasons & LBP_SETS:
        return frozenset()
    words = text_of(raw.get("code"), *as_list(raw.get("category"))).lower()
    if sets & THERAPY_SETS or any(w in words for w in THERAPY_REFERRAL):
        return frozenset({"physical_therapy"})
    return frozenset({"spine_referral"})


def _medication_hit(raw: Mapping[str, Any], knowledge: Knowledge,
                    conditions: _ConditionReasons | None = None) -> Hit | None:
    """A medication order the rules read: for back pain (its reason is LBP, or it names a
    back-pain drug), of a class a fact counts (a systemic corticosteroid, an immunosuppressive),
    or one the service cannot read at all (no name: its drug is unknown, never absent)."""
    status = str_field(raw, "status")
    if status not in {"active", "completed"}:
        return None
    concept = raw.get("medicationCodeableConcept")
    reference = raw.get("medicationReference")
    text = text_of(concept)
    if isinstance(reference, dict) and isinstance(reference.get("display"), str):
        text = f"{text} {reference['display']}"
    sets = _medication_sets(raw, text, knowledge, conditions)
    if not sets:
        return None
    span = parse_span(raw.get("authoredOn"))
    if span is None:
        validity = raw.get("dispenseRequest")
        span = period_start(validity.get("validityPeriod")) if isinstance(validity, dict) else None
    lo, hi = span if span else (None, None)
    coding = next((dict(c) for c in codings_of(concept)), {})
    fallback = "medication for back pain" if BACK_PAIN_MEDICATION in sets else "medication"
    return Hit("MedicationRequest", str(raw.get("id", "?")), sets, coding,
               active=status == "active", usable=True, start=lo, end=hi, raw=raw,
               text=text.strip() or fallback, until=_supply_until(raw, lo, status == "active"))


def _supply_until(raw: Mapping[str, Any], start: datetime | None,
                  active: bool) -> datetime | None:
    """The end of a medication order's documented supply: its validity period's end, else the
    expected supply times the fills (repeats + 1); an active order with no documented end is
    taken up to now; a completed one without an end is a single day (None)."""
    dispense = raw.get("dispenseRequest")
    dispense = dispense if isinstance(dispense, Mapping) else {}
    validity = dispense.get("validityPeriod")
    end = parse_span(validity.get("end")) if isinstance(validity, Mapping) else None
    if end is not None:
        return end[1]
    supply = dispense.get("expectedSupplyDuration")
    if start is not None and isinstance(supply, Mapping):
        value, unit = supply.get("value"), supply.get("code") or supply.get("unit")
        repeats = dispense.get("numberOfRepeatsAllowed")
        fills = 1 + (repeats if type(repeats) is int and 0 <= repeats <= 100 else 0)
        if isinstance(value, int | float) and 0 < value <= 3650 and unit in DAYS_PER:
            return start + timedelta(days=float(value) * DAYS_PER[str(unit)] * fills)
    return ONGOING if active else None


def _medication_sets(raw: Mapping[str, Any], text: str, knowledge: Knowledge,
                     conditions: _ConditionReasons | None = None) -> frozenset[str]:
    if not text.strip():
        return frozenset({OPAQUE})
    reason_codings = codings_of_all(raw.get("reasonCode"))
    reasons = knowledge.valuesets_of_codings(reason_codings)
    lowered = text.lower()
    named = any(term in lowered for term in knowledge.medication_terms)
    refs = _reason_refs(raw)
    for_back = bool(reasons & LBP_SETS) or bool(conditions and set(refs) & conditions.back_pain)
    # a reason naming another condition, by code or by reference to a Condition on the record
    other_reason = not for_back and (bool(reason_codings) or bool(
        conditions and set(refs) & conditions.ids))
    classes = knowledge.medication_classes_of(lowered) & MEDICATION_CLASSES
    if for_back or (named and not other_reason):
        return classes | {BACK_PAIN_MEDICATION}
    return classes


def _is_referral(raw: Mapping[str, Any]) -> bool:
    for cat in as_list(raw.get("category")):
        if not isinstance(cat, Mapping):
            continue
        if str(cat.get("text", "")).strip().lower() == "referral":
            return True
        for c in codings_of(cat):
            if str(c.get("code", "")).lower() == "referral":
                return True
    return False


@dataclass(frozen=True)
class DraftScan:
    """The draft orders of one request that make the patient an intervention candidate
    (screened once per request: evaluating many orders stays linear in the drafts)."""

    candidates: tuple[tuple[int, Evidence], ...] = ()  # (id() of the draft, evidence)


def scan_drafts(drafts: Iterable[Mapping[str, Any]], knowledge: Knowledge,
                keep: int = 8) -> DraftScan:
    """Screen the drafts once; keep the first few that are planned interventions."""
    found: list[tuple[int, Evidence]] = []
    for d in drafts:
        if d.get("resourceType") != "ServiceRequest":
            continue
        hit = _order_like_hit(d, "ServiceRequest", knowledge)
        if hit and hit.sets & INTERVENTION_SETS:
            found.append((id(d), hit.evidence("draft order in this session")))
            if len(found) >= keep:
                break
    return DraftScan(tuple(found))


