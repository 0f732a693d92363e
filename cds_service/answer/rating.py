"""Which draft orders to rate, and their rating: the facts of each order and the decision over
every world the facts leave possible. Nothing here renders a card."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cds_service.clinical.answers import Attested, attest, read_answers
from cds_service.clinical.dates import parse_span
from cds_service.clinical.facts import (
    ClinicalParams,
    Facts,
    RecordScan,
    Tri,
    derive_facts,
    scan_drafts,
    scan_record,
)
from cds_service.clinical.model import MIN_TIME
from cds_service.clinical.rules import LUMBAR_MRI
from cds_service.clinical.scan import Hit, str_field
from cds_service.clinical.scenario import Decision, decide
from cds_service.knowledge import Knowledge, Procedure
from cds_service.protocol import HookRequest
from cds_service.questionnaire import Questions
from cds_service.record import PatientRecord

Target = tuple[dict[str, Any], Procedure]  # a draft order and the catalog study it orders
ACTIVE_ORDER = "active"  # an earlier order of the same study with this status is a duplicate


@dataclass(frozen=True)
class Duplicate:
    """An order this one likely duplicates: the same lumbar study already ordered (an active
    ServiceRequest in the record), or a lumbar MRI drafted before it in the same bundle."""

    resource: str  # "ServiceRequest/<id>"
    procedure: Procedure
    date: str | None  # when it was ordered (its authoredOn, else its occurrence), ISO day
    drafted: bool  # among this request's draft orders (else in the record)


@dataclass(frozen=True)
class Rated:
    """One order as rated: its facts and decision, and what its card needs to know besides."""

    order: dict[str, Any]
    procedure: Procedure
    facts: Facts
    decision: Decision
    missing: tuple[str, ...] = ()  # prefetch keys the record lacks
    drafted: frozenset[str] = frozenset()  # procedures of the other draft orders
    now: datetime | None = None
    duplicate: Duplicate | None = None  # an order this one likely duplicates


def order_codings(order: Mapping[str, Any]) -> list[Any]:
    code = order.get("code")
    codings = code.get("coding") if isinstance(code, Mapping) else None
    return [c for c in codings if isinstance(c, dict)] if isinstance(codings, list) else []


def target_orders(request: HookRequest) -> list[dict[str, Any]]:
    """Draft ServiceRequests to judge: the selections (order-select) or all (order-sign)."""
    drafts = request.context.draftOrders.resources()
    # An order without a usable id cannot be updated or rated by reference: leave it alone.
    service_requests = [r for r in drafts if r.get("resourceType") == "ServiceRequest"
                        and isinstance(r.get("id"), str) and r["id"]]
    selections = request.context.selections
    if request.hook == "order-sign" or selections is None:
        return service_requests
    wanted = set()
    for sel in selections:
        if isinstance(sel, str) and "/" in sel:
            rtype, _, rid = sel.rstrip("/").rpartition("/")
            if rtype.rsplit("/", 1)[-1] == "ServiceRequest":
                wanted.add(rid)
    return [r for r in service_requests if r.get("id") in wanted]


class Rater:
    """Rates orders with the loaded knowledge and the clinician's answers."""

    def __init__(self, knowledge: Knowledge, questions: Questions, params: ClinicalParams,
                 questionnaire_urls: Iterable[str], answer_valid_days: int):
        self.knowledge = knowledge
        self.questions = questions
        self.params = params
        self.questionnaire_urls = frozenset(questionnaire_urls)
        self.answer_valid_days = answer_valid_days

    def targets(self, request: HookRequest) -> list[Target]:
        """The target orders that are imaging studies of the catalog (a cheap code check).

        A study ordered with a companion code (72132 with an intrathecal injection, in the same
        order or another draft) is the combined procedure (CT myelography).
        """
        targets = []
        companions: set[tuple[str, str]] | None = None  # every draft's codes, read once
        for order in target_orders(request):
            proc = self.knowledge.procedure_of(order_codings(order))
            if proc is None:
                continue
            if any(c.when == proc.id for c in self.knowledge.combinations):
                if companions is None:
                    companions = self.knowledge.coding_keys(
                        c for d in request.context.draftOrders.resources()
                        for c in order_codings(d))
                proc = self.knowledge.combined_with_keys(proc, companions)
            targets.append((order, proc))
        return targets

    def rate_order(self, order: dict[str, Any], record: PatientRecord,
                   now: datetime) -> Rated | None:
        """Rate one ServiceRequest on its own (the SMART app: the order read from the EHR and
        the clinician's answers in ``record.questionnaire_responses``); None if not imaging."""
        proc = self.knowledge.procedure_of(order_codings(order))
        if proc is None:
            return None
        results = self.rate([(order, proc)], [order], record, now)
        return results[0] if results else None

    def rate(self, targets: list[Target], draft_orders: list[dict[str, Any]],
             record: PatientRecord, now: datetime) -> list[Rated]:
        """Decide every target order that is lumbar imaging (others are left alone)."""
        scan = scan_record(record, self.knowledge)
        drafts = scan_drafts(draft_orders, self.knowledge)
        counts = self._drafted_counts(draft_orders)
        drafted_dups = drafted_duplicates(draft_orders, self.knowledge)
        answers = self.answers(record, now)
        missing = tuple(record.missing_keys())
        results = []
        for order, proc in targets:
            facts = derive_facts(scan, order, drafts, self.knowledge, now, self.params,
                                 lumbar=proc.region == "lumbar")
            facts = attest(facts, answers, self.questions, self.params, now)
            if (proc.region != "lumbar" and facts.indication.value is not Tri.YES
                    and not facts.other_indication):
                continue  # a whole-body study with no indication given is not lumbar imaging
            decision = decide(facts, self.knowledge, proc)
            # The other drafts' procedures (a suggestion must not duplicate one).
            own = self.knowledge.procedure_of(order_codings(order))
            drafted = frozenset(p for p, n in counts.items()
                                if n - (own is not None and own.id == p) > 0)
            duplicate = find_duplicate(order, proc, scan, draft_orders, self.knowledge,
                                       drafted_dups)
            results.append(Rated(order, proc, facts, decision, missing, drafted, now,
                                 duplicate))
        return results

    def answers(self, record: PatientRecord, now: datetime) -> dict[str, Attested]:
        """The clinician's answers in the record (completed responses to our Questionnaire)."""
        if not record.questionnaire_responses.resources:
            return {}
        return read_answers(record.questionnaire_responses.resources, self.questions,
                            self.questionnaire_urls, now, self.answer_valid_days)

    def _drafted_counts(self, drafts: list[dict[str, Any]]) -> Counter[str]:
        """How many draft ServiceRequests order each catalog procedure (counted once)."""
        counts: Counter[str] = Counter()
        for d in drafts:
            if d.get("resourceType") == "ServiceRequest":
                proc = self.knowledge.procedure_of(order_codings(d))
                if proc is not None:
                    counts[proc.id] += 1
        return counts


def drafted_duplicates(drafts: list[dict[str, Any]],
                       knowledge: Knowledge) -> dict[str, Duplicate]:
    """One pass over a request's drafts: draft id -> the earlier draft it likely duplicates (the
    same lumbar study, or another lumbar MRI: two MRIs signed together, the later one gets it)."""
    out: dict[str, Duplicate] = {}
    first: dict[str, tuple[int, dict[str, Any], Procedure]] = {}  # study -> its first draft
    first_mri: tuple[int, dict[str, Any], Procedure] | None = None
    for i, d in enumerate(drafts):
        if d.get("resourceType") != "ServiceRequest":
            continue
        proc = knowledge.procedure_of(order_codings(d))
        if proc is None or proc.region != "lumbar":
            continue
        mri = proc.id in LUMBAR_MRI
        earlier = [c for c in (first.get(proc.id), first_mri if mri else None) if c]
        oid = d.get("id")
        if earlier and isinstance(oid, str) and oid not in out:
            _, other, other_proc = min(earlier, key=lambda c: c[0])
            out[oid] = Duplicate(f"ServiceRequest/{other.get('id')}", other_proc, None, True)
        first.setdefault(proc.id, (i, d, proc))
        if mri and first_mri is None:
            first_mri = (i, d, proc)
    return out


def find_duplicate(order: Mapping[str, Any], proc: Procedure, scan: RecordScan,
                   drafts: list[dict[str, Any]], knowledge: Knowledge,
                   drafted: dict[str, Duplicate] | None = None) -> Duplicate | None:
    """The order a lumbar study likely duplicates (product.md, the card table): a lumbar MRI
    drafted before it in the same bundle (``drafted``: :func:`drafted_duplicates`, found once per
    request), else the same study already ordered and still active in the record (the latest).
    A completed earlier study is not a duplicate (the recent-MRI card says it)."""
    if proc.region != "lumbar":
        return None
    if drafted is None:
        drafted = drafted_duplicates(drafts, knowledge)
    oid = order.get("id")
    if isinstance(oid, str) and oid in drafted:
        return drafted[oid]
    earlier = [h for h in scan.service_requests
               if h.procedure == proc.id and h.rid != oid
               and str_field(h.raw, "status") == ACTIVE_ORDER and h.readable]
    if not earlier:
        return None
    latest = max(earlier, key=lambda h: _ordered_on(h) or "")
    return Duplicate(f"ServiceRequest/{latest.rid}", proc, _ordered_on(latest), False)


def _ordered_on(hit: Hit) -> str | None:
    """The day an order was placed: its authoredOn, else its occurrence."""
    span = parse_span(hit.raw.get("authoredOn"))
    start = span[0] if span else hit.start
    return start.date().isoformat() if start and start != MIN_TIME else None
