"""The hook evaluation: draft orders + patient record + time -> cards and PAMA system actions.

``Engine.evaluate(request, record, now)`` is the one entry point the HTTP layer and the CLI use.
The clinical decisions come from the pure core (:mod:`cds_service.clinical`); this module picks
the card kind per the alert policy and renders it from the ``cards/`` templates.
"""

from __future__ import annotations

import importlib.metadata
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import orjson

from cds_service.clinical.answers import Attested, attest, denies, is_attested, read_answers
from cds_service.clinical.facts import (
    VALUESETS_READ,
    ClinicalParams,
    Evidence,
    Facts,
    Tri,
    derive_facts,
    scan_drafts,
    scan_record,
)
from cds_service.clinical.scenario import CANCEL, Alternative, Decision, decide
from cds_service.codesystems import SystemUrls, code_systems
from cds_service.knowledge import CATEGORY_RANK, Knowledge, KnowledgeError, Procedure
from cds_service.protocol import Action, Card, CardSource, Coding, HookRequest, Link, Suggestion
from cds_service.questionnaire import answers_code_system, build_questionnaire, load_questions
from cds_service.record import PatientRecord
from cds_service.record.prefetch import as_list
from cds_service.render import CardTemplates
from cds_service.settings import Settings

try:
    VERSION = importlib.metadata.version("cds-lbp-imaging")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    VERSION = "0.0.0"
PAMA = "http://fhir.org/argonaut/Extension/pama-rating"
ASKING_KINDS = ("missing-data", "not-appropriate")  # cards that link to the questions
PAMA_SYSTEM = "http://fhir.org/argonaut/CodeSystem/pama-rating"
PAMA_QCDSM = "http://fhir.org/argonaut/Extension/pama-rating-qcdsm-consulted"
PAMA_CONSULT = "http://fhir.org/argonaut/Extension/pama-rating-consult-id"
PAMA_AUC = "http://fhir.org/argonaut/Extension/pama-rating-auc-applied"
PAMA_DISPLAY = {"appropriate": "Appropriate", "not-appropriate": "Not appropriate",
                "no-criteria-apply": "No criteria apply"}
SOURCE_NAMES = {"patient": "demographics", "conditions": "problem list",
                "procedures": "procedures", "servicerequests": "orders and referrals",
                "medications": "medication orders"}
FACT_ORDER = ("indication", "radiculopathy", "duration_fact", "care", "candidate_evidence",
              "cauda_equina", "neuro_deficit", "cancer", "infection", "immunosuppression",
              "prior_surgery", "trauma", "osteoporosis", "elderly", "steroids", "mri_safety",
              "recent_mri")
MAY_BE = ("MBA", "MBA(D)")


@dataclass
class OrderResult:
    """What the engine concluded for one draft order (also what the audit keeps)."""

    order: dict[str, Any]
    procedure: Procedure
    facts: Facts
    decision: Decision
    cards: list[Card]
    kinds: list[str]


@dataclass
class _Subject:
    """One order under evaluation, with what was concluded about it."""

    order: dict[str, Any]
    procedure: Procedure
    facts: Facts
    decision: Decision
    missing: list[str]
    drafted: frozenset[str] = frozenset()  # procedures of the other draft orders
    now: datetime | None = None


def params_from(settings: Settings) -> ClinicalParams:
    return ClinicalParams(
        conservative_care_weeks=settings.conservative_care_weeks,
        elderly_over_age=settings.elderly_over_age, episode_grace_days=settings.episode_grace_days,
        recent_mri_months=settings.recent_mri_months,
        recent_trauma_days=settings.recent_trauma_days,
        recent_red_flag_days=settings.recent_red_flag_days,
        assume_candidate_after_failed_care=settings.assume_candidate_after_failed_care)


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


def _days_since(day: str | None, now: datetime | None) -> int:
    if not day or now is None:
        return 0
    try:
        return max(0, (now.date() - date.fromisoformat(day)).days)
    except ValueError:
        return 0


def finding(e: Evidence) -> str:
    """A finding in words with its code after it: "pacemaker (Z95.0)"."""
    if e.display and e.code:
        return f"{e.display} ({e.code})"
    return e.display or e.code or e.resource


def _order_codings(order: Mapping[str, Any]) -> list[Any]:
    code = order.get("code")
    codings = code.get("coding") if isinstance(code, Mapping) else None
    return [c for c in codings if isinstance(c, dict)] if isinstance(codings, list) else []


def indication_reasons(facts: Facts) -> list[dict[str, Any]]:
    """reasonCode for a suggested order whose draft had none: the indication in the record."""
    reasons: list[dict[str, Any]] = []
    for e in facts.indication.evidence + facts.radiculopathy.evidence:
        if e.system and e.code and not any(
                r["coding"][0]["code"] == e.code for r in reasons):
            coding = {"system": e.system, "code": e.code, "display": e.display or e.code}
            reasons.append({"coding": [coding], "text": e.display or e.code})
    return reasons[:3] or [{"text": "low back pain"}]


def may_cancel(facts: Facts) -> bool:
    """A cancel suggestion only for a routine order, with every red flag recorded as absent, a
    dated onset and no conservative care under way."""
    return (not facts.urgent and all(f.value is Tri.NO for f in facts.red_flags())
            and facts.duration_dated and facts.care_weeks is None
            and facts.care_states == ("none",))


def prune(value: Any) -> Any:
    """Drop null, empty strings, arrays and objects (CDS Hooks and FHIR forbid them).

    Returns new containers (a deep copy of the JSON structure), never the ones given.
    """
    if type(value) is dict:
        out = {}
        for k, v in value.items():
            if type(v) is dict or type(v) is list:
                v = prune(v)
                if v:
                    out[k] = v
            elif v is not None and v != "":
                out[k] = v
        return out
    if type(value) is list:
        items = []
        for v in value:
            if type(v) is dict or type(v) is list:
                v = prune(v)
                if v:
                    items.append(v)
            elif v is not None and v != "":
                items.append(v)
        return items
    return value


class Engine:
    """Holds the loaded knowledge and templates; evaluates hook requests."""

    def __init__(self, knowledge: Knowledge, templates: CardTemplates, settings: Settings):
        unknown = VALUESETS_READ - set(knowledge.valueset_descriptions)
        if unknown:
            raise KnowledgeError(f"valuesets.yaml lacks value sets the rules read: "
                                 f"{', '.join(sorted(unknown))} (renamed or removed?)")
        self.knowledge = knowledge
        self.templates = templates
        self.settings = settings
        self.params = params_from(settings)
        self.source = CardSource(label=templates.source["label"],
                                 url=templates.source.get("url") or None)
        # the site's own override-reason system (cards/common.yaml) or ours
        self.systems = SystemUrls.under(settings.canonical_root, templates.override_system)
        self.questions = load_questions(settings.knowledge_dir)
        roots = [settings.canonical_root, *settings.previous_canonical_roots]
        self.questionnaire_urls = frozenset(self.questions.url(r) for r in roots)
        self.code_systems = code_systems(
            self.systems, templates.categories,
            [r for k in templates.kinds.values() for r in k.override_reasons], VERSION)
        self.code_systems[self.questions.answers_system_id] = answers_code_system(
            self.questions, settings.canonical_root, VERSION)
        self.questionnaire = build_questionnaire(self.questions, settings.canonical_root)
        self._duration_answers = {code: display for q in self.questions.items
                                  if q.fact == "duration" for code, display in q.answers}
        # card kind -> the override reasons its cards offer (the same on every card)
        self._reasons = {kind: [Coding(system=self.systems.override_reason, code=r["code"],
                                       display=r["display"]) for r in k.override_reasons]
                         for kind, k in templates.kinds.items()}

    # ------------------------------------------------------------------ public

    def evaluate(self, request: HookRequest, record: PatientRecord,
                 now: datetime) -> tuple[list[Card], list[Action]]:
        """Cards and PAMA system actions for the hook request."""
        return self.respond(self.rate(request, record, now))

    def respond(self, results: list[OrderResult]) -> tuple[list[Card], list[Action]]:
        """Cards and system actions of already rated orders."""
        cards = [c for r in results for c in r.cards]
        actions = [self._rating_action(r) for r in results if r.decision.pama]
        return cards, actions

    def imaging_targets(self, request: HookRequest) -> list[tuple[dict[str, Any], Procedure]]:
        """The target orders that are imaging studies of the catalog (a cheap code check).

        A study ordered with a companion code (72132 with an intrathecal injection, in the same
        order or another draft) is the combined procedure (CT myelography).
        """
        targets = []
        companions: set[tuple[str, str]] | None = None  # every draft's codes, read once
        for order in target_orders(request):
            codings = _order_codings(order)
            proc = self.knowledge.procedure_of(codings)
            if proc is None:
                continue
            if any(c.when == proc.id for c in self.knowledge.combinations):
                if companions is None:
                    companions = self.knowledge.coding_keys(
                        c for d in request.context.draftOrders.resources()
                        for c in _order_codings(d))
                proc = self.knowledge.combined_with_keys(proc, companions)
            targets.append((order, proc))
        return targets

    def _drafted_counts(self, drafts: list[dict[str, Any]]) -> Counter[str]:
        """How many draft ServiceRequests order each catalog procedure (counted once)."""
        counts: Counter[str] = Counter()
        for d in drafts:
            if d.get("resourceType") == "ServiceRequest":
                proc = self.knowledge.procedure_of(_order_codings(d))
                if proc is not None:
                    counts[proc.id] += 1
        return counts

    def rate(self, request: HookRequest, record: PatientRecord, now: datetime,
             targets: list[tuple[dict[str, Any], Procedure]] | None = None
             ) -> list[OrderResult]:
        """Decide every target order that is lumbar imaging (others are left alone).

        ``targets``: :meth:`imaging_targets` of the request, when the caller has them already.
        """
        if targets is None:
            targets = self.imaging_targets(request)
        if not targets:
            return []
        return self._rate(targets, request.context.draftOrders.resources(), record, now)

    def rate_order(self, order: dict[str, Any], record: PatientRecord,
                   now: datetime) -> OrderResult | None:
        """Rate one ServiceRequest on its own (the SMART app: the order read from the EHR and
        the clinician's answers in ``record.questionnaire_responses``); None if not imaging."""
        proc = self.knowledge.procedure_of(_order_codings(order))
        if proc is None:
            return None
        results = self._rate([(order, proc)], [order], record, now)
        return results[0] if results else None

    def _rate(self, targets: list[tuple[dict[str, Any], Procedure]],
              draft_orders: list[dict[str, Any]], record: PatientRecord,
              now: datetime) -> list[OrderResult]:
        scan = scan_record(record, self.knowledge)
        drafts = scan_drafts(draft_orders, self.knowledge)
        counts = self._drafted_counts(draft_orders)
        answers = self.answers(record, now)
        results = []
        for order, proc in targets:
            facts = derive_facts(scan, order, drafts, self.knowledge, now, self.params,
                                 lumbar=proc.region == "lumbar")
            facts = attest(facts, answers, self.questions, self.params)
            if (proc.region != "lumbar" and facts.indication.value is not Tri.YES
                    and not facts.other_indication):
                continue  # a whole-body study with no indication given is not lumbar imaging
            decision = decide(facts, self.knowledge, proc)
            # The other drafts' procedures (a suggestion must not duplicate one).
            own = self.knowledge.procedure_of(_order_codings(order))
            drafted = frozenset(p for p, n in counts.items()
                                if n - (own is not None and own.id == p) > 0)
            kinds_cards = self._cards(_Subject(order, proc, facts, decision,
                                               record.missing_keys(), drafted, now))
            results.append(OrderResult(order, proc, facts, decision,
                                       [c for _, c in kinds_cards], [k for k, _ in kinds_cards]))
        return results

    def answers(self, record: PatientRecord, now: datetime) -> dict[str, Attested]:
        """The clinician's answers in the record (completed responses to our Questionnaire)."""
        if not record.questionnaire_responses.resources:
            return {}
        return read_answers(record.questionnaire_responses.resources, self.questions,
                            self.questionnaire_urls, now, self.settings.answer_valid_days)

    def questions_to_ask(self, subject: _Subject) -> list[str]:
        """The linkIds of the questions whose answers would settle the order's rating (or its
        scenario), for the card's link to the SMART app."""
        facts = {"conservative_care" if name == "care" else name
                 for name in subject.decision.deciding}
        return [q.link_id for q in self.questions.for_facts(facts)]

    # ------------------------------------------------------------------ policy

    def _cards(self, subject: _Subject) -> list[tuple[str, Card]]:
        """At most one card per order (the alert policy of the design)."""
        chosen = self._policy(subject)
        if chosen is None:
            return []
        kind, options, cancel = chosen
        return [(kind, self._card(kind, subject, options, cancel=cancel))]

    def _policy(self, subject: _Subject) -> tuple[str, list[Alternative], bool] | None:
        """(card kind, suggested studies, offer a cancel) for one order, or no card."""
        proc, facts, decision = subject.procedure, subject.facts, subject.decision
        if facts.indication.value is Tri.NO or decision.pama == "no-criteria-apply":
            return None
        alts = decision.alternatives
        options = [a for a in alts if a.procedure.id not in subject.drafted] if isinstance(
            alts, tuple) else []
        mri_unsafe = proc.modality == "MR" and facts.mri_safety.value is Tri.YES
        if facts.cauda_equina.value is Tri.YES:
            if self.knowledge.category(proc.id, ("V4",)) == "UA":  # already the right study
                return ("mri-safety", options, False) if mri_unsafe else None
            if facts.mri_safety.value is Tri.YES:  # MRI unsafe: CT myelography first
                options.sort(key=lambda a: a.procedure.id != "ct-myelo")
            return "cauda-equina", options[:1], False
        if not decision.determinate:
            return "missing-data", [], False
        if decision.pama == "not-appropriate":
            if alts == CANCEL:
                if facts.urgent:
                    return "urgent-order", [], False
                return "not-appropriate", [], may_cancel(facts)
            return "not-appropriate", options, False
        if mri_unsafe:
            return "mri-safety", options, False
        if decision.category in MAY_BE and options and options[0].category == "UA":
            return "better-alternative", options[:1], False
        if proc.modality == "MR" and facts.recent_mri.value is Tri.YES:
            return "recent-mri", [], False
        return None

    # ------------------------------------------------------------------ rendering

    def _context(self, subject: _Subject, suggestion: Alternative | None, cancel: bool,
                 kind: str) -> dict[str, Any]:
        t = self.templates
        order, proc, facts, decision = (subject.order, subject.procedure, subject.facts,
                                        subject.decision)
        this_order = f"ServiceRequest/{order.get('id')}"
        scenario = None
        if decision.variants:
            scenario = "; ".join(f"{self.knowledge.variants[v]} ({v})"
                                 for v in sorted(decision.variants))
        rows: dict[tuple[str, str, str | None], dict[str, Any]] = {}
        for name in FACT_ORDER:
            fact = getattr(facts, name)
            for e in fact.evidence:
                label = t.fact_label(fact.name)
                row = rows.setdefault((e.resource, e.code, e.date), {
                    "labels": [], "code": e.code, "display": e.display,
                    # non-breaking hyphens: a date never wraps in a narrow table cell
                    "date": (e.date or "").replace("-", "\u2011")
                    or ("this order" if e.resource == this_order else None),
                    "resource": e.resource})
                if label not in row["labels"]:
                    row["labels"].append(label)
        evidence = [{**r, "label": ", ".join(r["labels"])} for r in rows.values()]
        alternatives = []
        if decision.variants:
            rated = [(p, self.knowledge.category(p.id, decision.variants))
                     for p in self.knowledge.procedures.values()
                     if p.region == "lumbar" or p is proc]  # the ordered study is always listed
            rated = [(p, c) for p, c in rated if c != "UNA"]
            rated.sort(key=lambda pc: (-CATEGORY_RANK[pc[1]], pc[0].rrl_rank, pc[0].preference))
            alternatives = [self._alt(p, c) for p, c in rated]
        document, not_sent = self._missing(subject)
        mri = facts.recent_mri.evidence[0] if facts.recent_mri.evidence else None
        devices = ", ".join(sorted({finding(e) for e in facts.mri_safety.evidence
                                    if not denies(e)})) if facts.mri_safety.value is Tri.YES \
            else ""
        assumed = [(code, params) for code, params in facts.assumptions
                   if code != "candidate-after-failed-care" or decision.assumption_drives]
        category = decision.category
        alts = decision.alternatives
        already = next((a.procedure.name for a in alts if a.procedure.id in subject.drafted),
                       None) if isinstance(alts, tuple) and not suggestion else None
        return {
            "kind": kind,
            "order": {"id": order.get("id"), "name": proc.name, "short": proc.short_name,
                      "priority": str(order.get("priority") or "routine")},
            "rating": {"pama": decision.pama, "category": category,
                       "category_label": t.categories.get(category or "", "not rated")},
            "scenario": scenario, "why": self._why(facts, subject.now),
            # determinately outside every variant (a severe neurological deficit alone)
            "outside": decision.variants is not None and not decision.variants,
            "conditional": t.phrase("if-candidate") if decision.assumption_rates else "",
            "suggest_if": t.phrase("suggest-if-candidate")
            if decision.assumption_suggests and not decision.assumption_rates else "",
            "suggestion": self._alt(suggestion.procedure, suggestion.category)
            if suggestion else None,
            "cancel": cancel, "alternatives": alternatives, "evidence": evidence,
            "assumptions": [t.assumption(code, params) for code, params in assumed],
            "missing": document,
            "missing_first": document[0]["document"] if document else "the patient's history",
            "missing_label": " and ".join(m["label"].lower() for m in document[:2])
            or "the patient's history",
            "missing_text": "; ".join(m["document"] for m in document)
            or "the patient's history",
            "devices": devices or "an implant", "device_found": bool(devices),
            "unavailable": ", ".join(not_sent),
            "care": self._care_text(facts),
            "recent": {"date": mri.date, "resource": mri.resource} if mri else None,
            "already": already,
        }

    def _missing(self, subject: _Subject) -> tuple[list[dict[str, str]], list[str]]:
        """What the clinician should document, and what the EHR did not send (said apart)."""
        t, facts = self.templates, subject.facts
        document, not_sent = [], []
        for name in subject.decision.deciding:
            fact = getattr(facts, "duration_fact" if name == "duration" else name)
            sources = [SOURCE_NAMES[m] for m in fact.missing if m in SOURCE_NAMES]
            if sources:
                not_sent += [s for s in sources if s not in not_sent]
            else:
                document.append({"name": name, "label": t.fact_label(name),
                                 "document": t.fact_document(name)})
        for key in subject.missing:
            if SOURCE_NAMES[key] not in not_sent:
                not_sent.append(SOURCE_NAMES[key])
        return document, not_sent

    def _why(self, facts: Facts, now: datetime | None) -> str:
        """The first line of every card: what the rating rests on, and what was checked."""
        t = self.templates
        parts = [self._duration_text(facts, now)]
        found = [f for f in facts.red_flags() if f.value is Tri.YES]
        unknown = [f for f in facts.red_flags() if f.value is Tri.UNKNOWN]
        if found:
            parts.append(t.phrase("red-flags", found="; ".join(
                f"{t.fact_label(f.name).lower()}: " + ", ".join(finding(e) for e in f.evidence)
                for f in found)))
        elif unknown:
            parts.append(t.phrase("red-flags-unknown", unknown=", ".join(
                t.fact_short(f.name) for f in unknown)))
        else:
            parts.append(t.phrase("no-red-flags", checked=", ".join(
                t.fact_short(f.name) for f in facts.red_flags())))
        if facts.urgent:
            parts.append(t.phrase("urgent"))
        return "; ".join(p for p in parts if p) + "."

    def _duration_text(self, facts: Facts, now: datetime | None) -> str:
        t = self.templates
        said = [e for e in facts.duration_fact.evidence if is_attested(e)]
        if said and len(facts.duration) == 1:
            (category,) = facts.duration
            span = self._duration_answers.get(category, category).lower()
            return t.phrase("duration-attested", span=span, day=said[0].date)
        onset = [e for e in facts.duration_fact.evidence if e.date]
        if not onset:
            return t.phrase("duration-unknown")
        days = max(_days_since(e.date, now) for e in onset)
        span = f"{days} days" if days < 28 else f"{days // 7} weeks"
        return t.phrase("duration" if facts.duration_dated else "duration-bound", span=span)

    def _care_text(self, facts: Facts) -> str:
        t = self.templates
        needed = self.params.conservative_care_weeks
        if facts.care_weeks is None:
            return "" if facts.care.value is Tri.UNKNOWN else t.phrase("care-none")
        weeks = int(facts.care_weeks)
        if weeks >= needed:
            return t.phrase("care-done", weeks=weeks)
        return t.phrase("care-under-way", weeks=weeks, needed=needed)

    def _alt(self, proc: Procedure, category: str) -> dict[str, Any]:
        return {"id": proc.id, "name": proc.name, "short": proc.short_name,
                "category": category, "rrl": proc.rrl,
                "category_label": self.templates.categories.get(category, category)}

    def _card(self, kind: str, subject: _Subject, options: list[Alternative],
              cancel: bool = False) -> Card:
        t = self.templates
        order, proc = subject.order, subject.procedure
        first = options[0] if options else None
        ctx = self._context(subject, first, cancel, kind)
        suggestions: list[Suggestion] = []
        for i, alt in enumerate(options):
            sctx = {**ctx, "suggestion": self._alt(alt.procedure, alt.category)}
            suggestions.append(Suggestion(
                label=t.render(kind, "suggestion_label", sctx) or alt.procedure.name,
                uuid=str(uuid.uuid4()),
                isRecommended=True if i == 0 and alt.category == "UA" else None,
                actions=[Action(type="update",
                                description=t.render(kind, "action_description", sctx)
                                or f"Order {alt.procedure.name}",
                                resource=self._replacement(subject, alt))]))
        if cancel:
            suggestions.append(Suggestion(
                label=t.render(kind, "cancel_label", ctx) or "Cancel the order",
                uuid=str(uuid.uuid4()),
                actions=[Action(type="delete",
                                description=t.render(kind, "cancel_description", ctx)
                                or "Remove the draft order",
                                resourceId=f"ServiceRequest/{order.get('id')}")]))
        reasons = self._reasons[kind]
        links = self._app_link(kind, subject)
        return Card(
            uuid=str(uuid.uuid4()),
            summary=t.render(kind, "summary", ctx) or proc.name,
            indicator=t.kinds[kind].indicator,  # type: ignore[arg-type]
            source=self.source,
            detail=t.render(kind, "detail", ctx) or None,
            suggestions=suggestions or None,
            selectionBehavior="at-most-one" if suggestions else None,
            overrideReasons=reasons or None,
            links=links or None)

    def _app_link(self, kind: str, subject: _Subject) -> list[Link]:
        """A SMART app link asking the questions that would settle the rating (no PHI in the
        app context: the order's reference, the study and the questions' linkIds)."""
        if not self.settings.smart_app_enabled or kind not in ASKING_KINDS:
            return []
        ask = self.questions_to_ask(subject)
        if not ask:
            return []
        count = f"{len(ask)} question" + ("s" if len(ask) != 1 else "")
        context = {"order": f"ServiceRequest/{subject.order.get('id')}",
                   "procedure": subject.procedure.id, "ask": ask}
        # a missing-data card's order is not rated yet; a not-appropriate one is, in every
        # scenario left open: the answers settle which study fits, not the rating
        phrase = "smart-link" if kind == "missing-data" else "smart-link-scenario"
        return [Link(label=self.templates.phrase(phrase, questions=count),
                     url=f"{self.settings.app_base_url}/app/launch", type="smart",
                     appContext=orjson.dumps(context).decode())]

    # ------------------------------------------------------------------ FHIR payloads

    def pama_extensions(self, pama: str, category: str | None) -> list[dict[str, Any]]:
        codings: list[dict[str, Any]] = [{"system": PAMA_SYSTEM, "code": pama,
                                          "display": PAMA_DISPLAY.get(pama, pama)}]
        if category:
            codings.append({"system": self.systems.acr_category, "code": category,
                            "display": self.templates.categories.get(category, category)})
        ext: list[dict[str, Any]] = [
            {"url": PAMA, "valueCodeableConcept": {"coding": codings}},
            {"url": PAMA_QCDSM, "valueString": self.settings.qcdsm_id},
            {"url": PAMA_CONSULT, "valueUri": f"urn:uuid:{uuid.uuid4()}"},
        ]
        if self.settings.auc_applied:
            ext.append({"url": PAMA_AUC, "valueUri": self.settings.auc_applied})
        return ext

    def _with_rating(self, resource: dict[str, Any], pama: str,
                     category: str | None) -> dict[str, Any]:
        out = prune(resource)  # (a copy: the request's order is left as it came)
        kept = [e for e in as_list(out.get("extension"))
                if not (isinstance(e, Mapping) and str(e.get("url", "")).startswith(PAMA))]
        out["extension"] = kept + self.pama_extensions(pama, category)
        return out

    def _replacement(self, subject: _Subject, alt: Alternative) -> dict[str, Any]:
        new = dict(subject.order)  # (shallow: _with_rating copies the rest)
        new["code"] = {"coding": [dict(c) for c in alt.procedure.order_codes],
                       "text": alt.procedure.name}
        if not prune(new.get("reasonCode")):  # never an absent reason: the indication found
            new["reasonCode"] = indication_reasons(subject.facts)
        pama = "appropriate" if alt.category != "UNA" else "not-appropriate"
        return self._with_rating(new, pama, alt.category)

    def _rating_action(self, result: OrderResult) -> Action:
        d = result.decision
        assert d.pama is not None
        return Action(type="update",
                      description=f"Record the appropriateness rating of {result.procedure.name}",
                      resource=self._with_rating(result.order, d.pama, d.category))
