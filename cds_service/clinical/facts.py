"""Patient record -> clinical facts, each yes / no / unknown with the evidence behind it.

A fact is *no* only when every source it depends on was received whole (closed world); it is
*unknown* when a source is missing or partial, when a matching resource could not be read, or where
silence is not evidence (the exceptions of the design: conservative care of an intervention
candidate, a fusion code that names no site). The red flags are declared as data (``FLAGS``: which
value sets, and in which time scope each counts) and read by one small rule.

Where facts come from: the order's own reasons first (they are the indication the clinician chose),
then the problem list, procedures, orders and medication orders. Resources are first screened with a
cheap code lookup; only the few that match a value set are validated with the FHIR R4B models.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.procedure import Procedure as FhirProcedure
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import ValidationError

from cds_service.clinical.dates import add_age, age_years, parse_span, period_start
from cds_service.knowledge import Knowledge
from cds_service.record import PatientRecord
from cds_service.record.prefetch import Source, SourceState, as_list

LBP_SETS = frozenset({"low_back_pain", "radiculopathy", "lumbar_degenerative"})
# Reasons that by themselves put a lumbar order on the low back pain pathway (V4 or outside V1-V3).
SPINAL_SETS = frozenset({"cauda_equina", "ces_bladder_bowel", "ces_sensory", "neuro_deficit"})
THERAPY_SETS = frozenset({"physical_therapy", "chiropractic"})
INTERVENTION_SETS = frozenset({"spine_injection", "lumbar_surgery_procedure", "spine_referral"})
ACTIVE = {"active", "recurrence", "relapse"}
EXCLUDED_VERIFICATION = {"refuted", "entered-in-error"}
URGENT = {"stat", "asap", "urgent"}
MIN_TIME = datetime.min.replace(tzinfo=UTC)
MODELS = {"Condition": Condition, "Procedure": FhirProcedure, "ServiceRequest": ServiceRequest,
          "MedicationRequest": MedicationRequest}
CARE_STATES = ("none", "under-way", "done")


class Tri(StrEnum):
    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


class Scope(StrEnum):
    """When a diagnosis on the problem list counts for a fact (reasons on the order always do)."""

    HISTORY = "history"  # active or resolved, any date (cancer history)
    ACTIVE = "active"  # active, any date (immunosuppression, osteoporosis, devices)
    CURRENT = "current"  # active and of this episode or recent, or undated (red-flag symptoms)
    RECENT = "recent"  # active and within the recent-trauma window


@dataclass(frozen=True)
class FlagSpec:
    """A fact read from diagnoses: its value sets, each with the scope in which it counts."""

    name: str
    sets: tuple[tuple[str, Scope], ...]
    red_flag: bool = True


# The facts read from diagnoses. A value set with a rule in the knowledge (needs_companion,
# text_terms) counts only as that rule allows: saddle anaesthesia, drug use beside fever.
FLAGS = (
    FlagSpec("cauda_equina", (("cauda_equina", Scope.CURRENT), ("ces_bladder_bowel", Scope.CURRENT),
                              ("ces_sensory", Scope.CURRENT))),
    FlagSpec("neuro_deficit", (("neuro_deficit", Scope.CURRENT),)),
    FlagSpec("cancer", (("cancer", Scope.HISTORY), ("weight_loss", Scope.CURRENT))),
    FlagSpec("infection", (("spinal_infection", Scope.CURRENT),
                           ("systemic_infection", Scope.CURRENT), ("drug_use", Scope.ACTIVE))),
    FlagSpec("immunosuppression", (("immunosuppression", Scope.ACTIVE),)),
    FlagSpec("trauma", (("recent_trauma", Scope.RECENT),)),
    FlagSpec("osteoporosis", (("osteoporosis", Scope.ACTIVE),)),
    FlagSpec("steroids", (("chronic_steroids", Scope.ACTIVE),)),
    FlagSpec("mri_safety", (("mri_safety", Scope.ACTIVE),), red_flag=False),
    FlagSpec("radiculopathy", (("radiculopathy", Scope.ACTIVE),), red_flag=False),
)
# Every red flag the cards name as checked (prior surgery and age come from their own rules).
RED_FLAGS = ("cauda_equina", "neuro_deficit", "cancer", "infection", "immunosuppression",
             "prior_surgery", "trauma", "osteoporosis", "elderly", "steroids")
# Every value set the rules read by name: a knowledge copy must define each (a renamed set would
# otherwise match nothing, and a red flag would silently never count).
VALUESETS_READ = (frozenset(vs for spec in FLAGS for vs, _ in spec.sets) | LBP_SETS | SPINAL_SETS
                  | THERAPY_SETS | INTERVENTION_SETS
                  | {"prior_lumbar_surgery", "fusion_any_site", "lumbar_surgery_procedure"})
REASON_SETS = LBP_SETS | SPINAL_SETS | frozenset(
    vs for spec in FLAGS if spec.red_flag for vs, _ in spec.sets) | {
    "prior_lumbar_surgery", "fusion_any_site"}


@dataclass(frozen=True)
class ClinicalParams:
    """Tunable thresholds of the clinical rules (from settings)."""

    conservative_care_weeks: int = 6
    elderly_over_age: int = 70
    episode_grace_days: int = 14
    recent_mri_months: int = 12
    recent_trauma_days: int = 90
    recent_red_flag_days: int = 90
    assume_candidate_after_failed_care: bool = True


@dataclass(frozen=True)
class Evidence:
    """One resource that supports a fact."""

    resource: str
    system: str
    code: str
    display: str | None
    date: str | None
    role: str


@dataclass
class Fact:
    name: str
    value: Tri
    evidence: list[Evidence] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def possible(self) -> tuple[bool, ...]:
        """The truth values this fact can take."""
        if self.value is Tri.YES:
            return (True,)
        if self.value is Tri.NO:
            return (False,)
        return (False, True)


@dataclass
class Facts:
    """Everything the scenario needs for one order."""

    indication: Fact
    radiculopathy: Fact
    duration: frozenset[str]
    duration_fact: Fact
    care_weeks: float | None
    care: Fact
    candidate_evidence: Fact
    candidate_assumed: bool
    cauda_equina: Fact
    cancer: Fact
    infection: Fact
    immunosuppression: Fact
    prior_surgery: Fact
    trauma: Fact
    osteoporosis: Fact
    elderly: Fact
    age: tuple[int, int] | None
    steroids: Fact
    mri_safety: Fact
    recent_mri: Fact
    neuro_deficit: Fact = field(default_factory=lambda: Fact("neuro_deficit", Tri.NO))
    # "none", "under-way" (fewer weeks than the threshold), "done": the states care may be in
    care_states: tuple[str, ...] = ("none",)
    duration_dated: bool = False  # the duration comes from a dated onset, not a bound
    other_indication: bool = False  # the order's reasons name an indication that is not LBP
    urgent: bool = False  # priority stat, asap or urgent
    # (code, parameters); the wording is in cards/common.yaml "assumptions"
    assumptions: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    assume_candidate: bool = True  # candidate assumed after failed care (ClinicalParams)

    def red_flags(self) -> list[Fact]:
        return [getattr(self, n) for n in RED_FLAGS]


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
                        date=day, role=role)


@dataclass
class RecordScan:
    """The patient-level part of the facts: one pass over the record."""

    record: PatientRecord
    conditions: list[Hit]
    procedures: list[Hit]
    service_requests: list[Hit]
    birth: tuple[datetime, datetime] | None
    medications: list[Hit] = field(default_factory=list)
    _by_set: dict[str, list[Hit]] | None = field(default=None, repr=False)

    def conditions_in(self, vs: str) -> list[Hit]:
        """The condition hits of one value set, in record order (indexed once per scan)."""
        if self._by_set is None:
            index: dict[str, list[Hit]] = {}
            for h in self.conditions:
                for name in h.sets:
                    index.setdefault(name, []).append(h)
            self._by_set = index
        return self._by_set.get(vs, [])


def _codings(concept: Any) -> list[Mapping[str, Any]]:
    if isinstance(concept, dict):
        codings = concept.get("coding")
        if isinstance(codings, list):
            return [c for c in codings if isinstance(c, dict)]
    return []


def _codings_many(concepts: Any) -> list[Mapping[str, Any]]:
    out: list[Mapping[str, Any]] = []
    for c in concepts if isinstance(concepts, list) else []:
        out.extend(_codings(c))
    return out


def _text_of(*concepts: Any) -> str:
    """The human text of codeable concepts (text and displays), for matching words."""
    parts: list[str] = []
    for concept in concepts:
        if isinstance(concept, dict):
            if isinstance(concept.get("text"), str):
                parts.append(concept["text"])
            parts += [c["display"] for c in _codings(concept) if isinstance(c.get("display"), str)]
    return " ".join(parts)


def _str_field(raw: Mapping[str, Any], key: str) -> str | None:
    """A field that FHIR says is a string (a code); anything else there reads as absent."""
    value = raw.get(key)
    return value if isinstance(value, str) else None


def _status_code(concept: Any) -> str | None:
    for c in _codings(concept):
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
        key = hashlib.blake2b(rtype.encode() + orjson.dumps(raw, option=orjson.OPT_SORT_KEYS),
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


def _birth(record: PatientRecord) -> tuple[datetime, datetime] | None:
    for patient in record.patient.resources:
        return parse_span(patient.get("birthDate"))
    return None


def scan_record(record: PatientRecord, knowledge: Knowledge) -> RecordScan:
    """Screen every resource by code and keep (validated) hits."""
    birth = _birth(record)
    conditions: list[Hit] = []
    for raw in record.conditions.resources:
        sets = knowledge.screen(raw.get("code"))[0]
        if not sets:
            continue
        codings = _codings(raw.get("code"))
        if _status_code(raw.get("verificationStatus")) in EXCLUDED_VERIFICATION:
            continue
        clinical = _status_code(raw.get("clinicalStatus"))
        has_abatement = any(k.startswith("abatement") for k in raw)
        active = clinical in ACTIVE if clinical else not has_abatement
        lo, hi = _condition_onset(raw, birth)
        conditions.append(Hit("Condition", str(raw.get("id", "?")), sets,
                              _first_matching(knowledge, codings), active, True, lo, hi,
                              raw=raw, text=_text_of(raw.get("code"))))
    procedures = [h for h in (_order_like_hit(raw, "Procedure", knowledge)
                              for raw in record.procedures.resources) if h]
    service_requests = [h for h in (_order_like_hit(raw, "ServiceRequest", knowledge)
                                    for raw in record.service_requests.resources) if h]
    medications = [h for h in (_medication_hit(raw, knowledge)
                               for raw in record.medications.resources) if h]
    return RecordScan(record, conditions, procedures, service_requests, birth, medications)


def _condition_onset(raw: Mapping[str, Any],
                     birth: tuple[datetime, datetime] | None) -> tuple[datetime | None,
                                                                       datetime | None]:
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


def _order_like_hit(raw: Mapping[str, Any], rtype: str, knowledge: Knowledge) -> Hit | None:
    sets, proc = knowledge.screen(raw.get("code"))
    if not sets and proc is None and rtype != "ServiceRequest":
        return None  # most of a chart (visits, labs): one cached lookup per coding, no more
    codings = _codings(raw.get("code"))
    if rtype == "ServiceRequest" and _is_referral(raw):
        reasons = knowledge.valuesets_of_codings(_codings_many(raw.get("reasonCode")))
        if reasons & LBP_SETS:
            sets = sets | {"spine_referral"}
    if not sets and proc is None:
        return None
    status = _str_field(raw, "status")
    if rtype == "Procedure":
        usable = status in {"completed", "in-progress"}
        planned = status == "preparation"
        span = parse_span(raw.get("performedDateTime")) or period_start(raw.get("performedPeriod"))
    else:
        usable = status in {"active", "completed"}
        planned = status in {"active", "draft", "on-hold"}
        span = (parse_span(raw.get("occurrenceDateTime"))
                or period_start(raw.get("occurrencePeriod"))
                or parse_span(raw.get("authoredOn")))
    if not usable and not planned:
        return None
    lo, hi = span if span else (None, None)
    return Hit(rtype, str(raw.get("id", "?")), sets, _first_matching(knowledge, codings),
               active=planned, usable=usable, start=lo, end=hi,
               procedure=proc.id if proc else None, raw=raw, text=_text_of(raw.get("code")))


def _medication_hit(raw: Mapping[str, Any], knowledge: Knowledge) -> Hit | None:
    """A medication order for back pain: its reason is LBP, or it names a back-pain drug."""
    if _str_field(raw, "status") not in {"active", "completed"}:
        return None
    concept = raw.get("medicationCodeableConcept")
    reference = raw.get("medicationReference")
    text = _text_of(concept)
    if isinstance(reference, dict) and isinstance(reference.get("display"), str):
        text = f"{text} {reference['display']}"
    reason_codings = _codings_many(raw.get("reasonCode"))
    reasons = knowledge.valuesets_of_codings(reason_codings)
    lowered = text.lower()
    named = any(term in lowered for term in knowledge.medication_terms)
    other_reason = bool(reason_codings) and not reasons & LBP_SETS
    if not (reasons & LBP_SETS or (named and not other_reason)):
        return None
    span = parse_span(raw.get("authoredOn"))
    if span is None:
        validity = raw.get("dispenseRequest")
        span = period_start(validity.get("validityPeriod")) if isinstance(validity, dict) else None
    lo, hi = span if span else (None, None)
    coding = next((dict(c) for c in _codings(concept)), {})
    return Hit("MedicationRequest", str(raw.get("id", "?")), frozenset({"back_pain_medication"}),
               coding, active=_str_field(raw, "status") == "active", usable=True, start=lo, end=hi,
               raw=raw, text=text.strip() or "medication for back pain")


def _is_referral(raw: Mapping[str, Any]) -> bool:
    for cat in as_list(raw.get("category")):
        if not isinstance(cat, Mapping):
            continue
        if str(cat.get("text", "")).strip().lower() == "referral":
            return True
        for c in _codings(cat):
            if str(c.get("code", "")).lower() == "referral":
                return True
    return False


def _closed(sources: Iterable[Source]) -> list[str]:
    """Names of the sources that leave a negative answer open."""
    return [s.note or "missing" for s in sources if s.state is not SourceState.COMPLETE]


def _fact(name: str, evidence: list[Evidence], sources: dict[str, Source],
          unreadable: bool = False) -> Fact:
    if evidence:
        return Fact(name, Tri.YES, evidence)
    missing = [k for k, s in sources.items() if s.state is not SourceState.COMPLETE]
    if missing or unreadable:
        return Fact(name, Tri.UNKNOWN, [], missing or ["unreadable resource"])
    return Fact(name, Tri.NO)


@dataclass
class _Context:
    """What the rules for one order share: the record scan, the order's reasons, the clock."""

    scan: RecordScan
    knowledge: Knowledge
    order_id: str
    reasons: list[Hit]
    now: datetime
    params: ClinicalParams
    current_since: datetime  # red-flag symptoms dated on or after this are current

    def in_scope(self, hit: Hit, scope: Scope) -> bool:
        if scope is Scope.HISTORY:
            return True
        if not hit.active:
            return False
        latest = hit.latest
        if scope is Scope.CURRENT:
            return latest is None or latest >= self.current_since
        if scope is Scope.RECENT:
            since = self.now - timedelta(days=self.params.recent_trauma_days)
            return latest is not None and latest >= since
        return True

    def reason_evidence(self, hit: Hit, display: str | None) -> Evidence:
        if hit.rtype == "ServiceRequest":
            return Evidence(f"ServiceRequest/{self.order_id}", str(hit.coding.get("system", "")),
                            str(hit.coding.get("code", "")),
                            hit.coding.get("display") or hit.text or display, None,
                            "reason for this order")
        return hit.evidence("reason for this order", display)


def _set_hits(ctx: _Context, vs: str, scope: Scope) -> tuple[list[tuple[Hit, bool]], bool]:
    """(hit, on the order) pairs for one value set in its scope; and whether one was unreadable."""
    found: list[tuple[Hit, bool]] = []
    unreadable = False
    reason_ids = {id(h) for h in ctx.reasons}
    for h in ctx.reasons:
        if vs in h.sets:
            found.append((h, True))
    for h in ctx.scan.conditions_in(vs):
        if id(h) in reason_ids or not ctx.in_scope(h, scope):
            continue
        if not h.readable:
            unreadable = True
            continue
        found.append((h, False))
    return found, unreadable


def flag_fact(spec: FlagSpec, ctx: _Context) -> Fact:
    """One fact from its value sets: hits in scope, then the companion and text rules."""
    if not ctx.reasons and not ctx.scan.conditions:  # nothing coded to look at
        return _fact(spec.name, [], {"conditions": ctx.scan.record.conditions})
    per_set: dict[str, list[tuple[Hit, bool]]] = {}
    unreadable = False
    for vs, scope in spec.sets:
        per_set[vs], bad = _set_hits(ctx, vs, scope)
        unreadable = unreadable or bad
    evidence: list[Evidence] = []
    for vs, hits in per_set.items():
        rule = ctx.knowledge.rules.get(vs)
        if rule is not None:
            companion = any(per_set.get(c) for c in rule.needs_companion)
            hits = [(h, on_order) for h, on_order in hits if companion or any(
                term in h.text.lower() for term in rule.text_terms)]
        for h, on_order in hits:
            display = ctx.knowledge.display_of(h.coding.get("system"), h.coding.get("code"))
            ev = (ctx.reason_evidence(h, display) if on_order
                  else h.evidence("condition" if h.active else "condition (history)", display))
            if ev not in evidence:
                evidence.append(ev)
    return _fact(spec.name, evidence, {"conditions": ctx.scan.record.conditions}, unreadable)


def _order_reasons(scan: RecordScan, order: Mapping[str, Any],
                   knowledge: Knowledge) -> tuple[list[Hit], bool]:
    """The order's reasons that match a value set, and whether it has any coded reason."""
    oid = str(order.get("id", "?"))
    hits: list[Hit] = []
    for concept in as_list(order.get("reasonCode")):
        text = _text_of(concept)
        for c in _codings(concept):
            sets = knowledge.valuesets_of(c.get("system"), c.get("code"))
            if sets:
                hits.append(Hit("ServiceRequest", oid, sets, dict(c), True, True, None, None,
                                text=text))
    coded = bool(hits) or any(c.get("code") for c in _codings_many(order.get("reasonCode")))
    by_id = {h.rid: h for h in scan.conditions}
    for ref in as_list(order.get("reasonReference")):
        if isinstance(ref, Mapping) and isinstance(ref.get("reference"), str):
            rtype, _, rid = ref["reference"].rpartition("/")
            if rtype.endswith("Condition") and rid in by_id:
                hits.append(by_id[rid])
                coded = True
    return hits, coded


def _indication(ctx: _Context, coded_reason: bool, lumbar: bool) -> tuple[Fact, bool]:
    """Is this an order for low back pain? (fact, the reasons name another indication)."""
    lbp = flag_fact(FlagSpec("indication", tuple((vs, Scope.ACTIVE) for vs in sorted(LBP_SETS))),
                    ctx)
    if not coded_reason:
        return lbp, False
    reason_sets = frozenset().union(*(h.sets for h in ctx.reasons))
    on_order = [e for e in lbp.evidence if e.role == "reason for this order"]
    if reason_sets & LBP_SETS:
        return Fact("indication", Tri.YES, on_order), False
    if lumbar and reason_sets & SPINAL_SETS:
        return Fact("indication", Tri.YES, lbp.evidence), False
    if lumbar and reason_sets & REASON_SETS:
        # A red flag on a lumbar study: LBP with that red flag, when LBP is on the record.
        return lbp, lbp.value is Tri.NO
    return Fact("indication", Tri.NO), True


def _episode(scan: RecordScan) -> tuple[list[Hit], datetime | None, datetime | None]:
    """The dated active LBP conditions of the current episode and its onset bounds."""
    lbp = [h for h in scan.conditions if h.active and h.sets & LBP_SETS and h.readable]
    dated = [h for h in lbp if h.start is not None]
    if not dated:
        return [], None, None
    lo = min(h.start for h in dated if h.start is not None)
    hi = min(h.end for h in dated if h.end is not None)
    return dated, lo, hi


def _care(scan: RecordScan, cutoff: datetime | None,
          now: datetime) -> tuple[float | None, list[Evidence], bool]:
    """Weeks since the first conservative care of this episode (therapy or medication)."""
    care = [h for h in scan.procedures + scan.service_requests + scan.medications
            if h.usable and (h.sets & THERAPY_SETS or h.rtype == "MedicationRequest")]
    therapy = sorted((h for h in care if h.start and h.start <= now
                      and (cutoff is None or (h.end or h.start) >= cutoff)),
                     key=lambda h: h.start or now)
    first = next((h for h in therapy if h.readable), None)  # validates only up to the first
    if first is None or first.start is None:
        return None, [], any(not h.readable for h in care)  # unreadable care: unknown
    weeks = max(0.0, (now - first.start).total_seconds() / (7 * 86400))
    return weeks, [first.evidence("first conservative care of this episode")], False


def derive_facts(scan: RecordScan, order: Mapping[str, Any],
                 drafts: list[Mapping[str, Any]] | DraftScan, knowledge: Knowledge,
                 now: datetime, params: ClinicalParams | None = None,
                 lumbar: bool = True) -> Facts:
    """All facts for one draft order (order reasons count as current findings).

    ``drafts``: the request's draft orders, or their :func:`scan_drafts` (screened once when
    many orders are evaluated).
    """
    params = params or ClinicalParams()
    if not isinstance(drafts, DraftScan):
        drafts = scan_drafts(drafts, knowledge)
    rec = scan.record
    reasons, coded_reason = _order_reasons(scan, order, knowledge)
    dated, onset_lo, onset_hi = _episode(scan)
    episode_since = (onset_lo if onset_lo not in (None, MIN_TIME) else onset_hi)
    recent = now - timedelta(days=params.recent_red_flag_days)
    current_since = recent
    if episode_since is not None:
        current_since = min(recent, episode_since - timedelta(days=params.episode_grace_days))
    ctx = _Context(scan, knowledge, str(order.get("id", "?")), reasons, now, params,
                   current_since)
    flags = {spec.name: flag_fact(spec, ctx) for spec in FLAGS}
    indication, other_indication = _indication(ctx, coded_reason, lumbar)

    # Duration of the current episode: earliest onset of an active LBP condition.
    assumptions: list[tuple[str, dict[str, Any]]] = []
    if dated:
        assert onset_lo is not None and onset_hi is not None
        if onset_lo == MIN_TIME:
            assumptions.append(("duration-from-recorded-date", {}))
        duration = _duration_categories(now - onset_hi, now - onset_lo)
        duration_fact = Fact("duration", Tri.YES,
                             [h.evidence("onset of low back pain") for h in dated])
    else:
        duration = frozenset({"acute", "subacute", "chronic"})
        duration_fact = Fact("duration", Tri.UNKNOWN, [],
                             _closed([rec.conditions]) or ["onset not documented"])
    duration_dated = bool(dated) and onset_lo != MIN_TIME

    # Conservative care in this episode.
    if episode_since is not None:
        cutoff: datetime | None = episode_since - timedelta(days=params.episode_grace_days)
    else:
        ended = [h.end or h.start for h in scan.conditions
                 if not h.active and h.sets & LBP_SETS and (h.end or h.start)]
        cutoff = max(ended) if ended else None  # type: ignore[type-var]
    care_weeks, care_ev, care_unreadable = _care(scan, cutoff, now)
    care_sources = {"procedures": rec.procedures, "servicerequests": rec.service_requests,
                    "medications": rec.medications}
    orders = scan.procedures + scan.service_requests

    def unreadable(sets: frozenset[str]) -> bool:
        return any(h.sets & sets and not h.readable for h in orders)

    candidate_evidence = _candidate(scan, order, drafts, rec, unreadable)

    sources_open = [k for k, s in care_sources.items() if s.state is not SourceState.COMPLETE]
    if care_weeks is not None and care_weeks >= params.conservative_care_weeks:
        care = Fact("conservative_care", Tri.YES, care_ev)
        care_states: tuple[str, ...] = ("done",)
    elif care_weeks is not None:
        care = Fact("conservative_care", Tri.NO, care_ev, sources_open)
        care_states = ("under-way", "done") if sources_open else ("under-way",)
    else:
        care = _fact("conservative_care", [], care_sources, care_unreadable)
        long_enough = onset_lo is None or now - onset_lo >= timedelta(
            weeks=params.conservative_care_weeks)
        if (care.value is Tri.NO and candidate_evidence.value is Tri.YES and long_enough):
            # An intervention candidate after weeks of pain with no care on record: the
            # record is silent, not negative.
            care = Fact("conservative_care", Tri.UNKNOWN, [], ["care of a candidate"])
        care_states = ("none",) if care.value is Tri.NO else CARE_STATES

    candidate_assumed = False
    if (candidate_evidence.value is not Tri.YES and params.assume_candidate_after_failed_care
            and "done" in care_states):
        candidate_assumed = True
        assumptions.append(("candidate-after-failed-care",
                            {"weeks": int(care_weeks or params.conservative_care_weeks)}))

    elderly, age = _elderly(scan, now, params)
    return Facts(
        indication=indication, radiculopathy=flags["radiculopathy"], duration=duration,
        duration_fact=duration_fact, care_weeks=care_weeks, care=care,
        candidate_evidence=candidate_evidence, candidate_assumed=candidate_assumed,
        cauda_equina=flags["cauda_equina"], neuro_deficit=flags["neuro_deficit"],
        cancer=flags["cancer"], infection=flags["infection"],
        immunosuppression=flags["immunosuppression"],
        prior_surgery=_prior_surgery(ctx, unreadable),
        trauma=flags["trauma"], osteoporosis=flags["osteoporosis"],
        elderly=elderly, age=age,
        steroids=flags["steroids"], mri_safety=flags["mri_safety"],
        recent_mri=_recent_mri(scan, now, params, care_sources, orders),
        care_states=care_states, duration_dated=duration_dated,
        other_indication=other_indication,
        urgent=(_str_field(order, "priority") or "").lower() in URGENT,
        assumptions=assumptions, assume_candidate=params.assume_candidate_after_failed_care,
    )


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


def _candidate(scan: RecordScan, order: Mapping[str, Any], drafts: DraftScan,
               rec: PatientRecord, unreadable: Any) -> Fact:
    """A referral or planned intervention, in history or among the drafts.

    A referral or intervention order counts when active or completed; a procedure when it is
    planned or under way (a completed surgery is prior surgery, V5).
    """
    ev = [h.evidence("planned intervention or referral")
          for h in scan.service_requests + scan.procedures
          if h.sets & INTERVENTION_SETS
          and (h.usable if h.rtype == "ServiceRequest"
               else _str_field(h.raw, "status") in {"preparation", "in-progress"})
          and h.readable]
    ev += [e for i, e in drafts.candidates if i != id(order)]
    return _fact("intervention_candidate", ev, {"servicerequests": rec.service_requests},
                 unreadable(INTERVENTION_SETS))


def _prior_surgery(ctx: _Context, unreadable: Any) -> Fact:
    """Lumbar-specific codes (even resolved) or a completed lumbar surgery; a fusion code that
    names no site leaves it unknown."""
    rec, now = ctx.scan.record, ctx.now
    spec = FlagSpec("prior_surgery", (("prior_lumbar_surgery", Scope.HISTORY),))
    fact = flag_fact(spec, ctx)
    ev = list(fact.evidence) + [
        h.evidence("completed surgery") for h in ctx.scan.procedures
        if h.usable and "lumbar_surgery_procedure" in h.sets and h.readable
        and (h.start is None or h.start <= now)]
    bad = ("unreadable resource" in fact.missing
           or unreadable(frozenset({"lumbar_surgery_procedure"})))
    result = _fact("prior_surgery", ev, {"conditions": rec.conditions,
                                         "procedures": rec.procedures}, bad)
    if result.value is Tri.NO:
        unsure = flag_fact(FlagSpec("fusion", (("fusion_any_site", Scope.HISTORY),)), ctx)
        if unsure.value is Tri.YES:
            return Fact("prior_surgery", Tri.UNKNOWN, unsure.evidence, ["site of the fusion"])
    return result


def _elderly(scan: RecordScan, now: datetime,
             params: ClinicalParams) -> tuple[Fact, tuple[int, int] | None]:
    """Older than the threshold age (a fracture red flag)."""
    rec = scan.record
    age = age_years(scan.birth, now) if scan.birth else None
    limit = params.elderly_over_age
    if age is None:
        missing = ["patient"] if rec.patient.state is not SourceState.COMPLETE else [
            "date of birth"]
        return Fact("elderly", Tri.UNKNOWN, [], missing), None
    if age[0] > limit:
        return Fact("elderly", Tri.YES, [Evidence(f"Patient/{rec.patient_id}", "", "",
                                                  f"age {age[0]}", None, "age")]), age
    if age[1] <= limit:
        return Fact("elderly", Tri.NO), age
    return Fact("elderly", Tri.UNKNOWN, [], ["exact date of birth"]), age


def _recent_mri(scan: RecordScan, now: datetime, params: ClinicalParams,
                sources: dict[str, Source], orders: list[Hit]) -> Fact:
    """A lumbar MRI done in the last months."""
    since = now - timedelta(days=round(params.recent_mri_months * 30.44))
    mris = {"mri-wo", "mri-w", "mri-wwo"}
    ev = [h.evidence("lumbar MRI already done") for h in orders
          if h.procedure in mris and _str_field(h.raw, "status") == "completed"
          and h.start is not None and since <= h.start <= now and h.readable]
    return _fact("recent_mri", ev, {k: sources[k] for k in ("procedures", "servicerequests")},
                 any(h.procedure in mris and not h.readable for h in orders))


ACUTE = timedelta(weeks=4)
CHRONIC = timedelta(weeks=12)


def _duration_categories(shortest: timedelta, longest: timedelta) -> frozenset[str]:
    """Categories a pain duration in [shortest, longest] can fall in."""
    out = set()
    if shortest < ACUTE:
        out.add("acute")
    if shortest <= CHRONIC and longest >= ACUTE:
        out.add("subacute")
    if longest > CHRONIC:
        out.add("chronic")
    return frozenset(out or {"acute"})
