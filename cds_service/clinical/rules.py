"""The rules that read the facts of one order from the scanned record: one small function per
rule of the registry (:mod:`cds_service.clinical.registry`), over a shared :class:`RuleContext`.

A fact is *no* only when every source it depends on was received whole (closed world); it is
*unknown* when a source is missing or partial, when a matching resource could not be read, or where
silence is not evidence (the conservative care of an intervention candidate, a fusion code that
names no site).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from cds_service.clinical.dates import age_years, parse_span
from cds_service.clinical.model import MIN_TIME, ClinicalParams, Evidence, Fact, Tri
from cds_service.clinical.registry import (
    BACK_PAIN_MEDICATION,
    INTERVENTION_SETS,
    LBP_SETS,
    OPAQUE,
    REASON_SETS,
    SPINAL_SETS,
    THERAPY_SETS,
    FactSpec,
    Scope,
    spec,
)
from cds_service.clinical.scan import (
    ONGOING,
    DraftScan,
    Hit,
    RecordScan,
    codings_of,
    codings_of_all,
    str_field,
    text_of,
)
from cds_service.knowledge import Knowledge
from cds_service.record.prefetch import Source, SourceState, as_list

CARE_STATES = ("none", "under-way", "done")
ALL_DURATIONS = frozenset({"acute", "subacute", "chronic"})
ACUTE = timedelta(weeks=4)
CHRONIC = timedelta(weeks=12)
LUMBAR_MRI = frozenset({"mri-wo", "mri-w", "mri-wwo"})
CARE_SETS = THERAPY_SETS | {BACK_PAIN_MEDICATION}
WEEK = 7 * 86400
OPAQUE_NOTE = "entries the service cannot read"  # a Fact.missing note
# The scopes of findings that count only when dated in this episode (else unknown).
EPISODIC = (Scope.CURRENT, Scope.RECENT)
NOT_IN_EPISODE = "not dated in this episode"  # a Fact.missing note
# Fusion codes that name no site: prior lumbar surgery by their text (site_terms), else unknown.
FUSION = "fusion_any_site"
ADDON = "spine_addon_procedure"  # add-on surgery codes that name no region
OTHER_REGION = "spine_surgery_other_region"  # cervical and thoracic primary surgery codes
GESTATION_DAYS = 300  # a pregnancy code dated longer ago than a pregnancy lasts is not current
SURGERY_PLANS = frozenset({"lumbar_surgery_procedure", "spine_referral"})


@dataclass(frozen=True)
class Episode:
    """The dated active low back pain conditions of the current episode, and its onset bounds."""

    dated: list[Hit] = field(default_factory=list)
    onset_lo: datetime | None = None  # MIN_TIME: known only to lie before onset_hi
    onset_hi: datetime | None = None

    @property
    def since(self) -> datetime | None:
        """When the episode began, as well as the record tells."""
        return self.onset_lo if self.onset_lo not in (None, MIN_TIME) else self.onset_hi


@dataclass
class RuleContext:
    """What the rules for one order share: the record scan, the order's reasons, the clock."""

    scan: RecordScan
    knowledge: Knowledge
    order: Mapping[str, Any]
    reasons: list[Hit]  # the order's reasons that match a value set
    coded_reason: bool  # the order has a reason coded in a system the knowledge reads
    drafts: DraftScan
    now: datetime
    params: ClinicalParams
    episode: Episode
    current_since: datetime  # red-flag symptoms dated on or after this are current
    orders: list[Hit] = field(default_factory=list)  # procedures and service requests
    opaque_reason: bool = False  # a reason the service cannot read (text only, a local code)

    @property
    def order_id(self) -> str:
        return str(self.order.get("id", "?"))

    def in_scope(self, hit: Hit, scope: Scope) -> bool:
        """Whether a condition counts for a fact in that scope: a symptom (CURRENT) or trauma
        (RECENT) only when dated in this episode."""
        if scope is Scope.HISTORY:
            return True
        if scope is Scope.RELAPSE and not hit.active:
            ended = abated(hit) or hit.latest
            since = self.now - timedelta(days=self.params.infection_relapse_days)
            return ended is not None and ended >= since
        if not hit.active:
            return False
        if scope in EPISODIC:
            latest = hit.latest
            return latest is not None and latest >= self.window(scope)
        if scope is Scope.GESTATION:
            latest = hit.latest
            return latest is None or latest >= self.now - timedelta(days=GESTATION_DAYS)
        return True

    def undated(self, hit: Hit, scope: Scope) -> bool:
        """An active symptom or trauma that is undated or dated before this episode: its fact is
        unknown (ask), never yes."""
        return scope in EPISODIC and hit.active and not self.in_scope(hit, scope)

    def window(self, scope: Scope) -> datetime:
        """Since when a symptom (or trauma) is of this episode."""
        if scope is Scope.RECENT:
            return max(self.current_since,
                       self.now - timedelta(days=self.params.recent_trauma_days))
        return self.current_since

    def reason_evidence(self, hit: Hit, display: str | None) -> Evidence:
        if hit.rtype == "ServiceRequest":
            return Evidence(f"ServiceRequest/{self.order_id}", str(hit.coding.get("system", "")),
                            str(hit.coding.get("code", "")),
                            hit.coding.get("display") or hit.text or display, None,
                            "reason for this order", hit.words)
        return hit.evidence("reason for this order", display)

    @functools.cached_property
    def recorded_sets(self) -> frozenset[str]:
        """The value sets of the order's reasons and of the record's condition hits."""
        return self.scan.condition_sets().union(*(h.sets for h in self.reasons))

    @functools.cached_property
    def care_since(self) -> datetime:
        """Care (and candidacy) counts from the episode's onset less the grace period; with no
        dated episode, from the end of the latest resolved one, within the care window at most
        (never the whole history)."""
        if self.episode.since is not None:
            return self.episode.since - timedelta(days=self.params.episode_grace_days)
        window = self.now - timedelta(days=self.params.care_window_days)
        ended = [h.end or h.start for h in self.scan.conditions
                 if not h.active and h.sets & LBP_SETS and (h.end or h.start)]
        return max([window] + [e for e in ended if e is not None])

    def unreadable(self, sets: frozenset[str]) -> bool:
        """A procedure or order of these value sets failed validation."""
        return any(h.sets & sets and not h.readable for h in self.orders)


def abated(hit: Hit) -> datetime | None:
    """When a resolved condition ended, as late as its abatement date allows (None: undated)."""
    raw = hit.raw
    span = parse_span(raw.get("abatementDateTime"))
    period = raw.get("abatementPeriod")
    if span is None and isinstance(period, Mapping):
        span = parse_span(period.get("end")) or parse_span(period.get("start"))
    return span[1] if span else None


def rule_context(scan: RecordScan, order: Mapping[str, Any], drafts: DraftScan,
                 knowledge: Knowledge, now: datetime, params: ClinicalParams) -> RuleContext:
    """The context of one order: its reasons, the episode and when symptoms count as current."""
    reasons, coded_reason = order_reasons(scan, order, knowledge)
    opaque_reason = not coded_reason and bool(as_list(order.get("reasonCode")))
    episode = scan.memo.get(("episode",))
    if episode is None:
        episode = scan.memo[("episode",)] = episode_of(scan)
    # Symptoms count from the episode's onset less the grace period; with no dated episode,
    # within the recent red-flag window.
    current_since = now - timedelta(days=params.recent_red_flag_days)
    if episode.since is not None:
        current_since = episode.since - timedelta(days=params.episode_grace_days)
    return RuleContext(scan, knowledge, order, reasons, coded_reason, drafts, now, params,
                       episode, current_since, scan.procedures + scan.service_requests,
                       opaque_reason)


def not_sent(sources: Iterable[Source]) -> list[str]:
    """Names of the sources that leave a negative answer open."""
    return [s.note or "missing" for s in sources if s.state is not SourceState.COMPLETE]


def settle(name: str, evidence: list[Evidence], sources: dict[str, Source],
           unreadable: bool = False, opaque: bool = False) -> Fact:
    """Yes with evidence; unknown when a source is not whole, a match could not be read, or the
    source holds entries the service cannot read at all (``opaque``); else no (closed world)."""
    if evidence:
        return Fact(name, Tri.YES, evidence)
    missing = [k for k, s in sources.items() if s.state is not SourceState.COMPLETE]
    if missing or unreadable or opaque:
        return Fact(name, Tri.UNKNOWN, [],
                    missing or (["unreadable resource"] if unreadable else [OPAQUE_NOTE]))
    return Fact(name, Tri.NO)


# ------------------------------------------------------------------ coded facts


@dataclass
class _SetHits:
    """One value set's conditions for a fact: (hit, on the order) pairs in scope, the active
    ones not dated in this episode, and whether one could not be read."""

    found: list[tuple[Hit, bool]] = field(default_factory=list)
    undated: list[Hit] = field(default_factory=list)
    unreadable: bool = False

    # (written out: a compiled class's own __init__ is native; the one @dataclass makes is not)
    def __init__(self) -> None:
        self.found = []
        self.undated = []
        self.unreadable = False


def _set_hits(ctx: RuleContext, vs: str, scope: Scope) -> _SetHits:
    """The order's reasons and the problem list's conditions of one value set, in its scope."""
    out = _SetHits()
    for h in ctx.reasons:
        if vs in h.sets:
            out.found.append((h, True))
    recorded = _recorded_hits(ctx, vs, scope)
    reason_ids = {id(h) for h in ctx.reasons} if ctx.reasons else ()
    out.found += [(h, False) for h in recorded.found if id(h) not in reason_ids]
    out.undated = [h for h in recorded.undated if id(h) not in reason_ids]
    out.unreadable = any(id(h) not in reason_ids for h in recorded.unreadable)
    return out


class _Recorded(NamedTuple):
    """The record's conditions of one value set in one scope: in scope, active but not dated
    in this episode, and in scope but unreadable (patient-level: found once per call)."""

    found: list[Hit]
    undated: list[Hit]
    unreadable: list[Hit]


def _recorded_hits(ctx: RuleContext, vs: str, scope: Scope) -> _Recorded:
    key = ("recorded", vs, scope, ctx.now, ctx.current_since, id(ctx.params))
    known = ctx.scan.memo.get(key)
    if known is not None:
        return known  # type: ignore[no-any-return]
    found: list[Hit] = []
    undated: list[Hit] = []
    unreadable: list[Hit] = []
    for h in ctx.scan.conditions_in(vs):
        if _benign(ctx, h):
            continue
        if not ctx.in_scope(h, scope):
            if ctx.undated(h, scope) and h.readable:
                undated.append(h)
        elif h.readable:
            found.append(h)
        else:
            unreadable.append(h)
    recorded = ctx.scan.memo[key] = _Recorded(found, undated, unreadable)
    return recorded


def _condition_evidence(ctx: RuleContext, hit: Hit) -> Evidence:
    """A condition on the record as evidence (made once per call, shared by the orders)."""
    key = ("evidence", id(hit))
    ev = ctx.scan.memo.get(key)
    if ev is None:
        display = ctx.knowledge.display_of(hit.coding.get("system"), hit.coding.get("code"))
        ev = ctx.scan.memo[key] = hit.evidence(
            "condition" if hit.active else "condition (history)", display)
    return ev  # type: ignore[no-any-return]


def _benign(ctx: RuleContext, hit: Hit) -> bool:
    """A finding a benign cause explains: an active condition of a benign-cause set on the
    record, or the finding's own text naming such a cause (a bladder symptom beside prostatic
    hyperplasia, post-operative retention). Never applied to the order's own reasons."""
    for name in hit.sets:
        rule = ctx.knowledge.rules.get(name)
        if rule is None or not (rule.benign_causes or rule.benign_terms):
            continue
        text = hit.text.lower()
        if any(term in text for term in rule.benign_terms):
            return True
        if any(c.active for vs in rule.benign_causes for c in ctx.scan.conditions_in(vs)):
            return True
    return False


def coded_fact(row: FactSpec, ctx: RuleContext) -> Fact:
    """One fact from its value sets (hits in scope, then the companion and text rules) and from
    the medication classes that count for it."""
    sources = {"conditions": ctx.scan.record.conditions}
    if (not (row.medications or row.allergies or ctx.scan.opaque_conditions)
            and row.set_names.isdisjoint(ctx.recorded_sets)):
        return settle(row.name, [], sources)  # most facts of most charts: nothing recorded
    # an entry the service cannot read may be the finding: in scope, or undated or older (which
    # would make the fact unknown if it could be read)
    opaque = any(ctx.in_scope(h, scope) or ctx.undated(h, scope)
                 for h in ctx.scan.opaque_conditions for _, scope in row.sets)
    medicated, unsure, short = (_medication_evidence(row, ctx) if row.medications
                                else ([], False, []))
    if row.medications:
        sources["medications"] = ctx.scan.record.medications
    if row.allergies:
        allergic, unsure_allergy = _allergy_evidence(row, ctx)
        medicated, unsure = medicated + allergic, unsure or unsure_allergy
        sources["allergies"] = ctx.scan.record.allergies
    if not ctx.reasons and not ctx.scan.conditions:  # nothing coded to look at
        return _short_use(settle(row.name, medicated, sources, unsure, opaque), short)
    per_set: dict[str, _SetHits] = {vs: _set_hits(ctx, vs, scope) for vs, scope in row.sets}
    unreadable = unsure or any(hits.unreadable for hits in per_set.values())
    if not any(hits.found or hits.undated for hits in per_set.values()):  # most facts
        return _short_use(settle(row.name, medicated, sources, unreadable, opaque), short)
    evidence: dict[Evidence, None] = {}
    undated: list[Evidence] = []
    alone: list[Evidence] = []  # codes that, without their companion, leave the fact open
    for vs, hits in per_set.items():
        found, stale = hits.found, [h for h in hits.undated if not _treated(ctx, row, h)]
        rule = ctx.knowledge.rules.get(vs)
        if rule is not None and (rule.needs_companion or rule.text_terms):
            companion, beside = (_companions(ctx, rule.needs_companion, per_set)
                                 if found or stale else (False, []))
            maybe = companion or any(per_set[c].undated for c in rule.needs_companion
                                     if c in per_set)
            named = [h for h in stale if any(t in h.text.lower() for t in rule.text_terms)]
            stale = stale if maybe else named
            stale += [h for h, on_order in found if not on_order and not companion and maybe
                      and not any(t in h.text.lower() for t in rule.text_terms)]
            kept = [(h, on_order) for h, on_order in found if companion or any(
                term in h.text.lower() for term in rule.text_terms)]
            if rule.alone_unknown:
                counted = {id(h) for h, _ in kept}
                alone += [h.evidence("not enough alone", ctx.knowledge.display_of(
                    h.coding.get("system"), h.coding.get("code"))) for h, _ in found
                    if id(h) not in counted]
            found = kept
            if found:  # a companion outside the row is shown beside what it lets count
                have = {(id(h), on_order) for h, on_order in found}
                found += [(h, o) for h, o in beside if (id(h), o) not in have]
        for h, on_order in found:
            ev = (ctx.reason_evidence(h, ctx.knowledge.display_of(
                h.coding.get("system"), h.coding.get("code"))) if on_order
                else _condition_evidence(ctx, h))
            evidence[ev] = None  # (a dict: de-duplicated by key, in record order)
        undated += [h.evidence(f"condition, {NOT_IN_EPISODE}") for h in stale]
    fact = settle(row.name, [*evidence, *medicated], sources, unreadable, opaque)
    if fact.value is Tri.NO and undated:  # recorded, but not dated in this episode: ask
        return Fact(row.name, Tri.UNKNOWN, list(dict.fromkeys(undated)), [NOT_IN_EPISODE])
    if alone and fact.value is Tri.NO:  # drug use without fever: ask, never rule it out
        return Fact(row.name, Tri.UNKNOWN, alone, ["a finding to go with it"])
    return _short_use(fact, short)


def _short_use(fact: Fact, short: list[Evidence]) -> Fact:
    """A drug of the class still ordered, for fewer days than the class takes so far (prednisone
    for a month): not yet chronic use on record, but not ruled out either (ask)."""
    if short and fact.value is Tri.NO:
        return Fact(fact.name, Tri.UNKNOWN, short, ["duration of use"])
    return fact


def _treated(ctx: RuleContext, row: FactSpec, hit: Hit) -> bool:
    """A finding from before this episode that a procedure of the row's ``treated_by`` sets,
    completed after it, has treated: history, not a finding of this episode."""
    since = hit.start if hit.start not in (None, MIN_TIME) else hit.end
    if not row.treated_by or since is None:
        return False
    return any(h.usable and h.start is not None and since <= h.start <= ctx.now
               and h.sets.intersection(row.treated_by) and h.readable
               for h in ctx.scan.procedures)


def _companions(ctx: RuleContext, needs: frozenset[str],
                per_set: dict[str, _SetHits]) -> tuple[bool, list[tuple[Hit, bool]]]:
    """Whether a companion-bound set counts: beside a hit of one of the row's own companion
    sets, else beside an active condition of a companion set the row does not read (an
    ankylosed spine lets any recent trauma count), returned to be shown beside it."""
    if any(per_set[c].found for c in needs if c in per_set):
        return True, []
    found = [pair for c in sorted(c for c in needs if c not in per_set)
             for pair in _set_hits(ctx, c, Scope.ACTIVE).found]
    return bool(found), found


def _medication_evidence(row: FactSpec,
                         ctx: RuleContext) -> tuple[list[Evidence], bool, list[Evidence]]:
    """Active orders of the row's medication classes, used for as many days as the class takes
    (counted from the first order of the class in the last year, or from an older order still
    active); and whether an active order could be one of them but cannot be read, or its use
    cannot be dated; and the active orders used for fewer days than the class takes so far."""
    evidence: list[Evidence] = []
    short: list[Evidence] = []
    unsure = any(OPAQUE in h.sets and h.active for h in ctx.scan.medications)
    year_ago = ctx.now - timedelta(days=365)
    for cls, days in row.medications:
        hits = [h for h in ctx.scan.medications if cls in h.sets and h.readable]
        active = [h for h in hits if h.active]
        if not active:
            continue
        # an order still active counts from its date, however old (taken since then)
        starts = [h.start for h in hits if h.start and h.start <= ctx.now
                  and (h.active or year_ago <= h.start)]
        if days and not starts:
            unsure = True  # ordered now, since when is not recorded
        elif not days or ctx.now - min(starts) >= timedelta(days=days):
            evidence.append(active[0].evidence("medication ordered"))
        else:
            short.append(active[0].evidence(f"ordered for under {days} days so far"))
    return evidence, unsure, short


def _allergy_evidence(row: FactSpec, ctx: RuleContext) -> tuple[list[Evidence], bool]:
    """Current allergies to the row's substance classes (or coded in its value sets); and
    whether one could be such an allergy but cannot be read."""
    wanted = frozenset(row.allergies) | {vs for vs, _ in row.sets}
    hits = [h for h in ctx.scan.allergies if h.sets & wanted]
    evidence = [h.evidence("allergy") for h in hits if h.readable]
    unsure = any(not h.readable for h in hits) or any(OPAQUE in h.sets
                                                      for h in ctx.scan.allergies)
    return evidence, unsure


def order_reasons(scan: RecordScan, order: Mapping[str, Any],
                  knowledge: Knowledge) -> tuple[list[Hit], bool]:
    """The order's reasons that match a value set, and whether it has any coded reason."""
    oid = str(order.get("id", "?"))
    hits: list[Hit] = []
    for concept in as_list(order.get("reasonCode")):
        text = text_of(concept)
        for c in codings_of(concept):
            sets = knowledge.valuesets_of(c.get("system"), c.get("code"))
            if sets:
                words = concept.get("text") if isinstance(concept, Mapping) else None
                hits.append(Hit("ServiceRequest", oid, sets, dict(c), True, True, None, None,
                                text=text, words=words if isinstance(words, str) else None))
    coded = bool(hits) or any(isinstance(c.get("code"), str) and c["code"]
                              and knowledge.reads_system(c.get("system"))
                              for c in codings_of_all(order.get("reasonCode")))
    by_id = {h.rid: h for h in scan.conditions}
    for ref in as_list(order.get("reasonReference")):
        if isinstance(ref, Mapping) and isinstance(ref.get("reference"), str):
            rtype, _, rid = ref["reference"].rpartition("/")
            if rtype.endswith("Condition") and rid in by_id:
                hits.append(by_id[rid])
                coded = True
    return hits, coded


def indication_fact(ctx: RuleContext, lumbar: bool) -> tuple[Fact, bool]:
    """Is this an order for low back pain? (fact, the reasons name another indication)."""
    lbp = coded_fact(spec("indication"), ctx)
    if not ctx.coded_reason:
        if ctx.opaque_reason and lbp.value is Tri.NO:  # the reason may name anything
            return Fact("indication", Tri.UNKNOWN, [], [OPAQUE_NOTE]), False
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


# ------------------------------------------------------------------ the episode and its care


def episode_of(scan: RecordScan) -> Episode:
    """The dated active LBP conditions of the current episode and its onset bounds."""
    lbp = [h for h in scan.conditions if h.active and h.sets & LBP_SETS and h.readable]
    dated = [h for h in lbp if h.start is not None]
    if not dated:
        return Episode()
    lo = min(h.start for h in dated if h.start is not None)
    hi = min(h.end for h in dated if h.end is not None)
    return Episode(dated, lo, hi)


def duration_fact(ctx: RuleContext) -> tuple[Fact, frozenset[str], bool, list[Any]]:
    """The duration of the current episode (earliest onset of an active LBP condition): the
    fact, the categories it may fall in, whether the onset is dated, and any assumption."""
    ep = ctx.episode
    if not ep.dated:
        missing = not_sent([ctx.scan.record.conditions]) or ["onset not documented"]
        return Fact("duration", Tri.UNKNOWN, [], missing), ALL_DURATIONS, False, []
    assert ep.onset_lo is not None and ep.onset_hi is not None
    assumptions: list[tuple[str, dict[str, Any]]] = (
        [("duration-from-recorded-date", {})] if ep.onset_lo == MIN_TIME else [])
    categories = duration_categories(ctx.now - ep.onset_hi, ctx.now - ep.onset_lo)
    fact = Fact("duration", Tri.YES, [h.evidence("onset of low back pain") for h in ep.dated])
    return fact, categories, ep.onset_lo != MIN_TIME, assumptions


def duration_categories(shortest: timedelta, longest: timedelta) -> frozenset[str]:
    """Categories a pain duration in [shortest, longest] can fall in."""
    out = set()
    if shortest < ACUTE:
        out.add("acute")
    if shortest <= CHRONIC and longest >= ACUTE:
        out.add("subacute")
    if longest > CHRONIC:
        out.add("chronic")
    return frozenset(out or {"acute"})


def _care_until(hit: Hit, now: datetime) -> datetime:
    """The last day of a course of care as documented (a period's or supply's end, up to now for
    an active order with no end), else its own date."""
    end = hit.until or hit.end or hit.start or now
    return min(end, now)


# the weeks counted up to now on an order still active with no end (rules._first_care): the
# assumption's code, the latest open order's date, the first and last dates of care on record
# (an open order's own date its last), and how many orders are open
OpenEnd = tuple[str, str, str, str, int]


def _first_care(scan: RecordScan, cutoff: datetime, now: datetime
                ) -> tuple[float | None, list[Evidence], bool, OpenEnd | None]:
    """Documented weeks of conservative care in this episode (therapy or medication): from the
    first care to the latest (a single order or visit is no week of care). Last, when the
    latest care is an order still active with no documented end, counted up to now (the card
    says so): that assumption (its code, the latest open order's date, the first and last dates
    of care on record, the open orders), else None."""
    care = [h for h in scan.procedures + scan.service_requests + scan.medications
            if h.usable and h.sets & CARE_SETS]
    episode = sorted((h for h in care if h.start and h.start <= now
                      and _care_until(h, now) >= cutoff and h.readable),
                     key=lambda h: h.start or now)
    if not episode:
        # unreadable care, or a medication that cannot be read ordered in the episode: unknown
        opaque = any(OPAQUE in h.sets and (h.start is None or (h.end or h.start) >= cutoff)
                     for h in scan.medications)
        return None, [], any(not h.readable for h in care) or opaque, None
    first = episode[0]
    assert first.start is not None
    # the latest care: the one documented furthest, the later started of open orders (up to now)
    latest = max(episode, key=lambda h: (_care_until(h, now), h.start or now))
    until = _care_until(latest, now)
    span = until - max(first.start, cutoff)
    weeks = max(0.0, span.total_seconds() / WEEK)
    evidence = [first.evidence("first conservative care of this episode")]
    if latest is not first:
        evidence.append(latest.evidence("latest conservative care of this episode"))
    open_end = None
    if latest.until == ONGOING and latest.start is not None and latest.start < until:
        # what the record documents: each course to its end, an open order to its own date
        last = max(h.start if h.until == ONGOING and h.start is not None
                   else _care_until(h, now) for h in episode)
        opened = sum(1 for h in episode if h.until == ONGOING)
        code = ("care-order-still-active-alone" if len(episode) == 1
                else "care-order-still-active" if opened == 1 else "care-orders-still-active")
        open_end = (code, latest.start.date().isoformat(), first.start.date().isoformat(),
                    last.date().isoformat(), opened)
    return weeks, evidence, False, open_end


def care_fact(ctx: RuleContext, candidate: Fact
              ) -> tuple[Fact, float | None, tuple[str, ...], OpenEnd | None]:
    """Conservative care in this episode: the fact, its weeks, the states it may be in, and
    the assumption (``_first_care``) when the weeks count up to now on an order still active
    with no end (or None)."""
    rec, params, now = ctx.scan.record, ctx.params, ctx.now
    weeks, evidence, unreadable, open_end = _first_care(ctx.scan, ctx.care_since, now)
    onset = ctx.episode.onset_lo
    if weeks is not None and onset is not None and onset != MIN_TIME:  # never past the episode
        weeks = min(weeks, max(0.0, (now - onset).total_seconds() / WEEK))
    sources = {"procedures": rec.procedures, "servicerequests": rec.service_requests,
               "medications": rec.medications}
    if weeks is not None and weeks >= params.conservative_care_weeks:
        return Fact("conservative_care", Tri.YES, evidence), weeks, ("done",), open_end
    if weeks is not None:
        sources_open = [k for k, s in sources.items() if s.state is not SourceState.COMPLETE]
        states = ("under-way", "done") if sources_open else ("under-way",)
        return (Fact("conservative_care", Tri.NO, evidence, sources_open), weeks, states,
                open_end)
    care = settle("conservative_care", [], sources, unreadable)
    long_enough = onset is None or now - onset >= timedelta(weeks=params.conservative_care_weeks)
    if care.value is Tri.NO and candidate.value is Tri.YES and long_enough:
        # An intervention candidate after weeks of pain with no care on record: the record is
        # silent, not negative.
        care = Fact("conservative_care", Tri.UNKNOWN, [], ["care of a candidate"])
    return care, None, ("none",) if care.value is Tri.NO else CARE_STATES, None


def candidate_fact(ctx: RuleContext) -> Fact:
    """A referral or planned intervention, in history or among the drafts.

    A referral or intervention order counts when active or completed; a procedure when it is
    planned or under way (a completed surgery is prior surgery, V5).
    """
    scan, since = ctx.scan, ctx.care_since
    planned = [h for h in scan.service_requests + scan.procedures
               if h.sets & INTERVENTION_SETS
               and (h.usable if h.rtype == "ServiceRequest"
                    else str_field(h.raw, "status") in {"preparation", "in-progress"})
               and h.readable]
    # this episode's (dated in it); an undated one leaves candidacy unknown, never yes
    ev = [h.evidence("planned intervention or referral") for h in planned
          if h.start is not None and (h.end or h.start) >= since]
    ev += [e for i, e in ctx.drafts.candidates if i != id(ctx.order)]
    fact = settle("intervention_candidate", ev,
                  {"servicerequests": scan.record.service_requests},
                  ctx.unreadable(INTERVENTION_SETS))
    undated = [h.evidence(f"planned intervention or referral, {NOT_IN_EPISODE}")
               for h in planned if h.start is None]
    if fact.value is Tri.NO and undated:
        return Fact("intervention_candidate", Tri.UNKNOWN, undated, [NOT_IN_EPISODE])
    return fact


# ------------------------------------------------------------------ history and the patient


def prior_surgery_fact(ctx: RuleContext) -> Fact:
    """Lumbar-specific codes (even resolved) or a completed lumbar surgery. A code that names no
    site (Z98.1 arthrodesis status, an add-on procedure code) counts when its text names the
    lumbar spine, or (an add-on) beside a lumbar primary code on the same date; not when it names
    another site or sits beside another region's primary code; otherwise it leaves the fact
    unknown."""
    rec, now = ctx.scan.record, ctx.now
    fact = coded_fact(spec("prior_surgery"), ctx)
    done = [h for h in ctx.scan.procedures if h.usable and h.readable
            and (h.start is None or h.start <= now)]
    ev = list(fact.evidence) + [h.evidence("completed surgery") for h in done
                                if "lumbar_surgery_procedure" in h.sets]
    unsure: list[Evidence] = []  # codes whose site the record does not tell
    for h in done:
        if ADDON in h.sets and "lumbar_surgery_procedure" not in h.sets:
            site = _addon_site(ctx, h, done)
            if site == "lumbar":
                ev.append(h.evidence("completed surgery"))
            elif site is None:
                unsure.append(h.evidence("completed surgery (no region named)"))
    for h, on_order in _set_hits(ctx, FUSION, Scope.HISTORY).found:
        site = ctx.knowledge.site_terms.site_of(_site_text(h))
        if site == "other":
            continue
        display = ctx.knowledge.display_of(h.coding.get("system"), h.coding.get("code"))
        e = (ctx.reason_evidence(h, display) if on_order
             else h.evidence("condition" if h.active else "condition (history)", display))
        (ev if site == "lumbar" else unsure).append(e)
    bad = ("unreadable resource" in fact.missing
           or ctx.unreadable(frozenset({"lumbar_surgery_procedure", ADDON})))
    result = settle("prior_surgery", ev, {"conditions": rec.conditions,
                                          "procedures": rec.procedures}, bad)
    if result.value is Tri.NO and unsure:
        return Fact("prior_surgery", Tri.UNKNOWN, unsure, ["site of the surgery"])
    return result


def _site_text(hit: Hit) -> str:
    """The words that may name a site: the code's text and displays, and the body site."""
    return f"{hit.text} {text_of(*as_list(hit.raw.get('bodySite')))}"


def _addon_site(ctx: RuleContext, hit: Hit, done: list[Hit]) -> str | None:
    """The site of an add-on procedure code: named by its text, else that of a primary code
    (lumbar or another region) in the same resource or on the same date; None: not told."""
    site = ctx.knowledge.site_terms.site_of(_site_text(hit))
    if site is not None:
        return site
    day = hit.start.date() if hit.start and hit.start != MIN_TIME else None
    same = [hit] + [h for h in done if day is not None and h.start is not None
                    and h.start != MIN_TIME and h.start.date() == day]
    if any("lumbar_surgery_procedure" in h.sets for h in same):
        return "lumbar"
    if any(OTHER_REGION in h.sets for h in same):
        return "other"
    return None


def elderly_fact(ctx: RuleContext) -> tuple[Fact, tuple[int, int] | None]:
    """Older than the threshold age (a fracture red flag), and the age range."""
    scan, rec = ctx.scan, ctx.scan.record
    age = age_years(scan.birth, ctx.now) if scan.birth else None
    limit = ctx.params.elderly_over_age
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


def child_fact(ctx: RuleContext, age: tuple[int, int] | None) -> Fact:
    """Younger than the adult age (these criteria are for adults): yes when every age the
    date of birth allows is younger, no when every one is adult, else unknown."""
    adult = ctx.params.adult_age
    if age is None:
        missing = ["patient"] if ctx.scan.record.patient.state is not SourceState.COMPLETE else [
            "date of birth"]
        return Fact("child", Tri.UNKNOWN, [], missing)
    if age[1] < adult:
        return Fact("child", Tri.YES, [Evidence(f"Patient/{ctx.scan.record.patient_id}", "", "",
                                                f"age {age[1]}", None, "age")])
    if age[0] >= adult:
        return Fact("child", Tri.NO)
    return Fact("child", Tri.UNKNOWN, [], ["exact date of birth"])


def recent_mri_fact(ctx: RuleContext) -> Fact:
    """A lumbar MRI done in the last months."""
    now, rec = ctx.now, ctx.scan.record
    since = now - timedelta(days=round(ctx.params.recent_mri_months * 30.44))
    ev = [h.evidence("lumbar MRI already done") for h in ctx.orders
          if h.procedure in LUMBAR_MRI and str_field(h.raw, "status") == "completed"
          and h.start is not None and since <= h.start <= now and h.readable]
    return settle("recent_mri", ev, {"procedures": rec.procedures,
                                     "servicerequests": rec.service_requests},
                  any(h.procedure in LUMBAR_MRI and not h.readable for h in ctx.orders))


def surgery_planned(ctx: RuleContext) -> bool:
    """Lumbar surgery planned in this episode: a surgery procedure in preparation, an active
    surgery order, or a spine referral (an MRI before it is the surgeon's, no repeat)."""
    for h in ctx.orders:
        if not h.sets & SURGERY_PLANS or not h.readable:
            continue
        status = str_field(h.raw, "status")
        planned = (status == "preparation" if h.rtype == "Procedure"
                   else status in {"active", "on-hold"}
                   or (status == "completed" and "spine_referral" in h.sets))
        if planned and (h.start is None or (h.end or h.start) >= ctx.care_since):
            return True
    return False


def device_scanned(ctx: RuleContext, mri_safety: Fact) -> Evidence | None:
    """The latest completed MRI (any MRI of the catalog) done after every MRI-unsafe device on
    record: the device has been scanned (dated devices only; an undated one may be newer)."""
    if mri_safety.value is not Tri.YES or not mri_safety.evidence:
        return None
    dates = [e.date for e in mri_safety.evidence]
    if any(d is None for d in dates):
        return None
    placed = max(d for d in dates if d is not None)
    mri = {p.id for p in ctx.knowledge.procedures.values() if p.modality == "MR"}
    scans = [h for h in ctx.orders
             if h.procedure in mri and str_field(h.raw, "status") == "completed"
             and h.start is not None and h.start <= ctx.now
             and h.start.date().isoformat() > placed and h.readable]
    if not scans:
        return None
    latest = max(scans, key=lambda h: h.start or ctx.now)
    return latest.evidence("MRI done with the device in place")


def unreadable_entries(ctx: RuleContext, facts: Iterable[Fact], keep: int = 3) -> list[Evidence]:
    """The entries the service cannot read that left one of the facts unknown (a few)."""
    notes = {note for f in facts if f.value is Tri.UNKNOWN for note in f.missing}
    hits: list[Hit] = []
    if OPAQUE_NOTE in notes:
        hits += sorted(ctx.scan.opaque_conditions, key=lambda h: not h.active)
    if "unreadable resource" in notes:
        hits += [h for h in ctx.scan.medications if OPAQUE in h.sets and h.active]
    return [h.evidence("cannot be read") for h in hits[:keep]]
