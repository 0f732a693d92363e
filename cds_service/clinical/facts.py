"""Patient record -> clinical facts, each yes / no / unknown with the evidence behind it.

A fact is *no* only when every source it depends on was received whole (closed world); it is
*unknown* when a source is missing or partial, or when a matching resource could not be read.
Resources are first screened with a cheap code lookup; only the few that match a value set are
validated with the FHIR R4B models and become evidence.
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
from fhir.resources.R4B.procedure import Procedure as FhirProcedure
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import ValidationError

from cds_service.clinical.dates import add_age, age_years, parse_span, period_start
from cds_service.knowledge import Knowledge
from cds_service.record import PatientRecord
from cds_service.record.prefetch import Source, SourceState, as_list

LBP_SETS = frozenset({"low_back_pain", "radiculopathy", "lumbar_degenerative"})
INDICATION_SETS = LBP_SETS | {"cauda_equina"}
RED_FLAG_SETS = frozenset({"cancer", "infection", "immunosuppression", "recent_trauma",
                           "osteoporosis", "chronic_steroids", "prior_lumbar_surgery"})
THERAPY_SETS = frozenset({"physical_therapy", "chiropractic"})
INTERVENTION_SETS = frozenset({"spine_injection", "lumbar_surgery_procedure", "spine_referral"})
ACTIVE = {"active", "recurrence", "relapse"}
EXCLUDED_VERIFICATION = {"refuted", "entered-in-error"}
MIN_TIME = datetime.min.replace(tzinfo=UTC)
MODELS = {"Condition": Condition, "Procedure": FhirProcedure, "ServiceRequest": ServiceRequest}


class Tri(StrEnum):
    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ClinicalParams:
    """Tunable thresholds of the clinical rules (from settings)."""

    conservative_care_weeks: int = 6
    elderly_age: int = 65
    episode_grace_days: int = 14
    recent_mri_months: int = 12
    recent_trauma_days: int = 90
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
    # (code, parameters); the wording is in cards/common.yaml "assumptions"
    assumptions: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    assume_candidate: bool = True  # candidate assumed after failed care (ClinicalParams)


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
    _readable: bool | None = field(default=None, repr=False)

    @property
    def readable(self) -> bool:
        """Whether the resource passes FHIR R4B validation (checked once, only when used)."""
        if self._readable is None:
            self._readable = not self.raw or _validate(self.rtype, self.raw)
        return self._readable

    def evidence(self, role: str) -> Evidence:
        day = None
        if self.start and self.start != MIN_TIME:
            day = self.start.date().isoformat()
        elif self.end:
            day = self.end.date().isoformat()
        return Evidence(resource=f"{self.rtype}/{self.rid}",
                        system=str(self.coding.get("system", "")),
                        code=str(self.coding.get("code", "")),
                        display=self.coding.get("display"), date=day, role=role)


@dataclass
class RecordScan:
    """The patient-level part of the facts: one pass over the record."""

    record: PatientRecord
    conditions: list[Hit]
    procedures: list[Hit]
    service_requests: list[Hit]
    birth: tuple[datetime, datetime] | None


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
        codings = _codings(raw.get("code"))
        sets = knowledge.valuesets_of_codings(codings)
        if not sets:
            continue
        if _status_code(raw.get("verificationStatus")) in EXCLUDED_VERIFICATION:
            continue
        clinical = _status_code(raw.get("clinicalStatus"))
        has_abatement = any(k.startswith("abatement") for k in raw)
        active = clinical in ACTIVE if clinical else not has_abatement
        lo, hi = _condition_onset(raw, birth)
        conditions.append(Hit("Condition", str(raw.get("id", "?")), sets,
                              _first_matching(knowledge, codings), active, True, lo, hi,
                              raw=raw))
    procedures = [h for h in (_order_like_hit(raw, "Procedure", knowledge)
                              for raw in record.procedures.resources) if h]
    service_requests = [h for h in (_order_like_hit(raw, "ServiceRequest", knowledge)
                                    for raw in record.service_requests.resources) if h]
    return RecordScan(record, conditions, procedures, service_requests, birth)


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
    codings = _codings(raw.get("code"))
    sets = knowledge.valuesets_of_codings(codings)
    proc = knowledge.procedure_of(codings)
    is_referral = rtype == "ServiceRequest" and _is_referral(raw)
    if is_referral:
        reasons = knowledge.valuesets_of_codings(_codings_many(raw.get("reasonCode")))
        if reasons & LBP_SETS:
            sets = sets | {"spine_referral"}
    if not sets and proc is None:
        return None
    status = raw.get("status")
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
               procedure=proc.id if proc else None, raw=raw)


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


def derive_facts(scan: RecordScan, order: Mapping[str, Any], drafts: list[Mapping[str, Any]],
                 knowledge: Knowledge, now: datetime,
                 params: ClinicalParams | None = None) -> Facts:
    """All facts for one draft order (order reasons count as current findings)."""
    params = params or ClinicalParams()
    rec = scan.record
    cond_src = {"conditions": rec.conditions}
    oid = f"ServiceRequest/{order.get('id', '?')}"

    # Reasons of the order: coded reasonCode plus reasonReference to a Condition we hold.
    reason_hits: list[Hit] = []
    for c in _codings_many(order.get("reasonCode")):
        sets = knowledge.valuesets_of(c.get("system"), c.get("code"))
        if sets:
            reason_hits.append(Hit("ServiceRequest", str(order.get("id", "?")), sets, dict(c),
                                   True, True, None, None))
    coded_reason = bool(reason_hits) or any(
        c.get("code") for c in _codings_many(order.get("reasonCode")))
    by_id = {h.rid: h for h in scan.conditions}
    for ref in as_list(order.get("reasonReference")):
        if isinstance(ref, Mapping) and isinstance(ref.get("reference"), str):
            rtype, _, rid = ref["reference"].rpartition("/")
            if rtype.endswith("Condition") and rid in by_id:
                reason_hits.append(by_id[rid])
                coded_reason = True

    def cond_evidence(sets: frozenset[str], *, history: bool = False,
                      since: datetime | None = None) -> tuple[list[Evidence], bool]:
        ev: list[Evidence] = []
        unreadable = False
        for h in scan.conditions:
            if not (h.sets & sets) or not (h.active or history):
                continue
            if since and h.start and h.start != MIN_TIME and (h.end or h.start) < since:
                continue
            if not h.readable:
                unreadable = True
                continue
            ev.append(h.evidence("condition" if h.active else "condition (history)"))
        for h in reason_hits:
            if h.sets & sets and h.rtype == "ServiceRequest":
                ev.append(Evidence(oid, str(h.coding.get("system", "")),
                                   str(h.coding.get("code", "")), h.coding.get("display"),
                                   None, "reason for this order"))
            elif h.sets & sets and h.readable and h.evidence("condition") not in ev:
                ev.append(h.evidence("reason for this order"))
        return ev, unreadable

    def cond_fact(name: str, sets: frozenset[str], **kw: Any) -> Fact:
        ev, unreadable = cond_evidence(sets, **kw)
        return _fact(name, ev, cond_src, unreadable)

    # Indication: the order's coded reasons decide; with none, the problem list does.
    lbp_active, lbp_unreadable = cond_evidence(LBP_SETS)
    reason_sets = frozenset().union(*(h.sets for h in reason_hits)) if reason_hits else frozenset()
    if coded_reason:
        if reason_sets & INDICATION_SETS:
            indication = Fact("indication", Tri.YES, [e for e in cond_evidence(
                INDICATION_SETS)[0] if e.role == "reason for this order"])
        elif reason_sets & RED_FLAG_SETS and lbp_active:
            indication = Fact("indication", Tri.YES, lbp_active)
        else:
            indication = Fact("indication", Tri.NO)
    else:
        indication = _fact("indication", lbp_active, cond_src, lbp_unreadable)

    radiculopathy = cond_fact("radiculopathy", frozenset({"radiculopathy"}))

    # Duration of the current episode: earliest onset of an active LBP condition.
    lbp_conditions = [h for h in scan.conditions
                      if h.active and h.sets & LBP_SETS and h.readable]
    dated = [h for h in lbp_conditions if h.start is not None]
    assumptions: list[tuple[str, dict[str, Any]]] = []
    onset_lo = onset_hi = None
    if dated:
        onset_lo = min(h.start for h in dated if h.start is not None)
        onset_hi = min(h.end for h in dated if h.end is not None)
        if onset_lo == MIN_TIME:
            assumptions.append(("duration-from-recorded-date", {}))
        duration = _duration_categories(now - onset_hi, now - onset_lo)
        duration_fact = Fact("duration", Tri.YES,
                             [h.evidence("onset of low back pain") for h in dated])
    else:
        duration = frozenset({"acute", "subacute", "chronic"})
        duration_fact = Fact("duration", Tri.UNKNOWN, [],
                             _closed([rec.conditions]) or ["onset not documented"])

    # Conservative care in this episode.
    if onset_lo is not None and onset_lo != MIN_TIME:
        cutoff: datetime | None = onset_lo - timedelta(days=params.episode_grace_days)
    elif onset_hi is not None:
        cutoff = onset_hi - timedelta(days=params.episode_grace_days)
    else:
        ended = [h.end or h.start for h in scan.conditions
                 if not h.active and h.sets & LBP_SETS and (h.end or h.start)]
        cutoff = max(ended) if ended else None  # type: ignore[type-var]
    therapy = sorted((h for h in scan.procedures + scan.service_requests
                      if h.usable and h.sets & THERAPY_SETS and h.start
                      and (cutoff is None or (h.end or h.start) >= cutoff)),
                     key=lambda h: h.start or now)
    first = next((h for h in therapy if h.readable), None)  # validates only up to the first
    care_weeks = None
    care_ev: list[Evidence] = []
    if first is not None:
        assert first.start is not None
        care_weeks = max(0.0, (now - first.start).total_seconds() / (7 * 86400))
        care_ev = [first.evidence("first conservative therapy of this episode")]
    care_sources = {"procedures": rec.procedures, "servicerequests": rec.service_requests}
    orders = scan.procedures + scan.service_requests

    def unreadable(sets: frozenset[str]) -> bool:
        return any(h.sets & sets and not h.readable for h in orders)

    if care_weeks is not None and care_weeks >= params.conservative_care_weeks:
        care = Fact("conservative_care", Tri.YES, care_ev)
    else:
        care = _fact("conservative_care", [], care_sources, unreadable(THERAPY_SETS))

    # Intervention candidate: a referral or planned intervention, in history or in the drafts.
    # A referral or intervention order counts when active or completed; a procedure when it
    # is planned or under way (a completed surgery is prior surgery, V5).
    cand_ev = [h.evidence("planned intervention or referral")
               for h in scan.service_requests + scan.procedures
               if h.sets & INTERVENTION_SETS
               and (h.usable if h.rtype == "ServiceRequest"
                    else h.raw.get("status") in {"preparation", "in-progress"})
               and h.readable]
    for d in drafts:
        if d is order or d.get("resourceType") != "ServiceRequest":
            continue
        hit = _order_like_hit(d, "ServiceRequest", knowledge)
        if hit and hit.sets & INTERVENTION_SETS:
            cand_ev.append(hit.evidence("draft order in this session"))
    candidate_evidence = _fact("intervention_candidate", cand_ev,
                               {"servicerequests": rec.service_requests},
                               unreadable(INTERVENTION_SETS))
    candidate_assumed = False
    if (candidate_evidence.value is not Tri.YES and params.assume_candidate_after_failed_care
            and care.value is Tri.YES and care_weeks is not None):
        candidate_assumed = True
        assumptions.append(("candidate-after-failed-care", {"weeks": int(care_weeks)}))

    # Prior lumbar surgery: a diagnosis (even resolved) or a completed surgery.
    ps_ev, ps_unreadable = cond_evidence(frozenset({"prior_lumbar_surgery"}), history=True)
    ps_ev += [h.evidence("completed surgery") for h in scan.procedures
              if h.usable and "lumbar_surgery_procedure" in h.sets and h.readable
              and (h.start is None or h.start <= now)]
    prior_surgery = _fact("prior_surgery", ps_ev,
                          {"conditions": rec.conditions, "procedures": rec.procedures},
                          ps_unreadable or unreadable(frozenset({"lumbar_surgery_procedure"})))

    # Age.
    age = age_years(scan.birth, now) if scan.birth else None
    if age is None:
        elderly = Fact("elderly", Tri.UNKNOWN, [], ["date of birth"])
    elif age[0] >= params.elderly_age:
        elderly = Fact("elderly", Tri.YES, [Evidence(f"Patient/{rec.patient_id}", "", "",
                                                    f"age {age[0]}", None, "age")])
    elif age[1] < params.elderly_age:
        elderly = Fact("elderly", Tri.NO)
    else:
        elderly = Fact("elderly", Tri.UNKNOWN, [], ["exact date of birth"])

    # Lumbar MRI in the last months.
    since = now - timedelta(days=round(params.recent_mri_months * 30.44))
    mri_ev = [h.evidence("lumbar MRI already done") for h in scan.procedures + scan.service_requests
              if h.procedure in {"mri-wo", "mri-w", "mri-wwo"}
              and h.raw.get("status") == "completed"
              and h.start is not None and since <= h.start <= now and h.readable]
    recent_mri = _fact("recent_mri", mri_ev, care_sources, any(
        h.procedure in {"mri-wo", "mri-w", "mri-wwo"} and not h.readable for h in orders))

    return Facts(
        indication=indication, radiculopathy=radiculopathy, duration=duration,
        duration_fact=duration_fact, care_weeks=care_weeks, care=care,
        candidate_evidence=candidate_evidence, candidate_assumed=candidate_assumed,
        cauda_equina=cond_fact("cauda_equina", frozenset({"cauda_equina"})),
        cancer=cond_fact("cancer", frozenset({"cancer"}), history=True),
        infection=cond_fact("infection", frozenset({"infection"})),
        immunosuppression=cond_fact("immunosuppression", frozenset({"immunosuppression"})),
        prior_surgery=prior_surgery,
        trauma=cond_fact("trauma", frozenset({"recent_trauma"}),
                         since=now - timedelta(days=params.recent_trauma_days)),
        osteoporosis=cond_fact("osteoporosis", frozenset({"osteoporosis"})),
        elderly=elderly, age=age,
        steroids=cond_fact("steroids", frozenset({"chronic_steroids"})),
        mri_safety=cond_fact("mri_safety", frozenset({"mri_safety"})),
        recent_mri=recent_mri, assumptions=assumptions,
        assume_candidate=params.assume_candidate_after_failed_care,
    )


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
