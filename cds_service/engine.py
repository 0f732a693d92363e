"""The hook evaluation: draft orders + patient record + time -> cards and PAMA system actions.

``Engine.evaluate(request, record, now)`` is the one entry point the HTTP layer and the CLI use.
The clinical decisions come from the pure core (:mod:`cds_service.clinical`); this module picks
the card kind per the alert policy and renders it from the ``cards/`` templates.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from cds_service.clinical.facts import (
    ClinicalParams,
    Facts,
    Tri,
    derive_facts,
    scan_record,
)
from cds_service.clinical.scenario import CANCEL, Alternative, Decision, decide
from cds_service.knowledge import CATEGORY_RANK, Knowledge, Procedure
from cds_service.protocol import Action, Card, CardSource, Coding, HookRequest, Suggestion
from cds_service.record import PatientRecord
from cds_service.record.prefetch import as_list
from cds_service.render import CardTemplates
from cds_service.settings import Settings

PAMA = "http://fhir.org/argonaut/Extension/pama-rating"
PAMA_SYSTEM = "http://fhir.org/argonaut/CodeSystem/pama-rating"
PAMA_QCDSM = "http://fhir.org/argonaut/Extension/pama-rating-qcdsm-consulted"
PAMA_CONSULT = "http://fhir.org/argonaut/Extension/pama-rating-consult-id"
PAMA_AUC = "http://fhir.org/argonaut/Extension/pama-rating-auc-applied"
ACR_CATEGORY_SYSTEM = "https://cds-lbp-imaging.example.org/CodeSystem/acr-appropriateness-category"
SOURCE_NAMES = {"patient": "demographics", "conditions": "problem list",
                "procedures": "procedures", "servicerequests": "orders and referrals"}
FACT_ORDER = ("indication", "radiculopathy", "duration_fact", "care", "candidate_evidence",
              "cauda_equina", "cancer", "infection", "immunosuppression", "prior_surgery",
              "trauma", "osteoporosis", "elderly", "steroids", "mri_safety", "recent_mri")


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


def params_from(settings: Settings) -> ClinicalParams:
    return ClinicalParams(
        conservative_care_weeks=settings.conservative_care_weeks,
        elderly_age=settings.elderly_age, episode_grace_days=settings.episode_grace_days,
        recent_mri_months=settings.recent_mri_months,
        recent_trauma_days=settings.recent_trauma_days,
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


def prune(value: Any) -> Any:
    """Drop null, empty strings, arrays and objects (CDS Hooks and FHIR forbid them)."""
    if isinstance(value, dict):
        cleaned = {k: prune(v) for k, v in value.items()}
        return {k: v for k, v in cleaned.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        cleaned_list = [prune(v) for v in value]
        return [v for v in cleaned_list if v not in (None, "", [], {})]
    return value


class Engine:
    """Holds the loaded knowledge and templates; evaluates hook requests."""

    def __init__(self, knowledge: Knowledge, templates: CardTemplates, settings: Settings):
        self.knowledge = knowledge
        self.templates = templates
        self.settings = settings
        self.params = params_from(settings)
        self.source = CardSource(label=templates.source["label"],
                                 url=templates.source.get("url") or None)

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
        """The target orders that are imaging studies of the catalog (a cheap code check)."""
        targets = []
        for order in target_orders(request):
            code = order.get("code")
            codings = code.get("coding") if isinstance(code, Mapping) else None
            proc = self.knowledge.procedure_of(codings if isinstance(codings, list) else [])
            if proc is not None:
                targets.append((order, proc))
        return targets

    def rate(self, request: HookRequest, record: PatientRecord,
             now: datetime) -> list[OrderResult]:
        """Decide every target order that is lumbar imaging (others are left alone)."""
        targets = self.imaging_targets(request)
        if not targets:
            return []
        scan = scan_record(record, self.knowledge)
        drafts = request.context.draftOrders.resources()
        results = []
        for order, proc in targets:
            facts = derive_facts(scan, order, drafts, self.knowledge, now, self.params)
            if proc.region != "lumbar" and facts.indication.value is not Tri.YES:
                continue  # a whole-body study for another indication is not lumbar imaging
            decision = decide(facts, self.knowledge, proc)
            kinds_cards = self._cards(_Subject(order, proc, facts, decision,
                                               record.missing_keys()))
            results.append(OrderResult(order, proc, facts, decision,
                                       [c for _, c in kinds_cards], [k for k, _ in kinds_cards]))
        return results

    # ------------------------------------------------------------------ policy

    def _cards(self, subject: _Subject) -> list[tuple[str, Card]]:
        proc, facts, decision = subject.procedure, subject.facts, subject.decision
        if facts.indication.value is Tri.NO or decision.pama == "no-criteria-apply":
            return []
        out: list[tuple[str, Card]] = []
        alts = decision.alternatives
        first = alts[0] if isinstance(alts, tuple) and alts else None
        if facts.cauda_equina.value is Tri.YES:
            suggestion = None if proc.id == "mri-wo" else first
            out.append(("cauda-equina", self._card("cauda-equina", subject,
                                                   [suggestion] if suggestion else [])))
        elif not decision.determinate:
            out.append(("missing-data", self._card("missing-data", subject, [])))
        elif decision.category == "UNA" or decision.pama == "not-appropriate":
            if alts == CANCEL:
                out.append(("not-appropriate", self._card("not-appropriate", subject, [],
                                                          cancel=True)))
            else:
                options = list(alts) if isinstance(alts, tuple) else []
                out.append(("not-appropriate", self._card("not-appropriate", subject, options)))
        elif proc.modality == "MR" and facts.mri_safety.value is Tri.YES:
            options = list(alts) if isinstance(alts, tuple) else []
            out.append(("mri-safety", self._card("mri-safety", subject, options)))
        elif (decision.category in ("MBA", "MBA(D)") and first is not None
              and first.category == "UA"):
            out.append(("better-alternative", self._card("better-alternative", subject,
                                                         [first])))
        if proc.modality == "MR" and facts.recent_mri.value is Tri.YES:
            out.append(("recent-mri", self._card("recent-mri", subject, [])))
        return out

    # ------------------------------------------------------------------ rendering

    def _context(self, subject: _Subject, suggestion: Alternative | None,
                 cancel: bool) -> dict[str, Any]:
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
                    "date": e.date or ("this order" if e.resource == this_order else None),
                    "resource": e.resource})
                if label not in row["labels"]:
                    row["labels"].append(label)
        evidence = [{**r, "label": ", ".join(r["labels"])} for r in rows.values()]
        alternatives = []
        if decision.variants:
            rated = [(p, self.knowledge.category(p.id, decision.variants))
                     for p in self.knowledge.procedures.values() if p.region == "lumbar"]
            rated = [(p, c) for p, c in rated if c != "UNA"]
            rated.sort(key=lambda pc: (-CATEGORY_RANK[pc[1]], pc[0].rrl_rank, pc[0].preference))
            alternatives = [self._alt(p, c) for p, c in rated]
        missing = [{"name": n, "label": t.fact_label(n), "document": t.fact_document(n)}
                   for n in decision.deciding]
        unavailable = ", ".join(SOURCE_NAMES[k] for k in subject.missing)
        mri = facts.recent_mri.evidence[0] if facts.recent_mri.evidence else None
        devices = ", ".join(sorted({e.display or e.code for e in facts.mri_safety.evidence}))
        category = decision.category
        return {
            "order": {"id": order.get("id"), "name": proc.name},
            "rating": {"pama": decision.pama, "category": category,
                       "category_label": t.categories.get(category or "", "not rated")},
            "scenario": scenario,
            "suggestion": self._alt(suggestion.procedure, suggestion.category)
            if suggestion else None,
            "cancel": cancel, "alternatives": alternatives, "evidence": evidence,
            "assumptions": [t.assumption(code, params) for code, params in facts.assumptions],
            "missing": missing,
            "missing_first": missing[0]["document"] if missing else "the patient's history",
            "missing_text": "; ".join(m["document"] for m in missing) or "the patient's history",
            "devices": devices or "an implant", "unavailable": unavailable,
            "recent": {"date": mri.date, "resource": mri.resource} if mri else None,
        }

    def _alt(self, proc: Procedure, category: str) -> dict[str, Any]:
        return {"id": proc.id, "name": proc.name, "short": proc.short_name,
                "category": category, "rrl": proc.rrl,
                "category_label": self.templates.categories.get(category, category)}

    def _card(self, kind: str, subject: _Subject, options: list[Alternative],
              cancel: bool = False) -> Card:
        t = self.templates
        order, proc = subject.order, subject.procedure
        first = options[0] if options else None
        ctx = self._context(subject, first, cancel)
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
                                resource=self._replacement(order, alt))]))
        if cancel:
            suggestions.append(Suggestion(
                label=t.render(kind, "cancel_label", ctx) or "Cancel the order",
                uuid=str(uuid.uuid4()), isRecommended=True,
                actions=[Action(type="delete",
                                description=t.render(kind, "cancel_description", ctx)
                                or "Remove the draft order",
                                resourceId=f"ServiceRequest/{order.get('id')}")]))
        reasons = [Coding(system=t.override_system, code=r["code"], display=r["display"])
                   for r in t.kinds[kind].override_reasons]
        return Card(
            uuid=str(uuid.uuid4()),
            summary=t.render(kind, "summary", ctx) or proc.name,
            indicator=t.kinds[kind].indicator,  # type: ignore[arg-type]
            source=self.source,
            detail=t.render(kind, "detail", ctx) or None,
            suggestions=suggestions or None,
            selectionBehavior="at-most-one" if suggestions else None,
            overrideReasons=reasons or None)

    # ------------------------------------------------------------------ FHIR payloads

    def pama_extensions(self, pama: str, category: str | None) -> list[dict[str, Any]]:
        codings: list[dict[str, Any]] = [{"system": PAMA_SYSTEM, "code": pama}]
        if category:
            codings.append({"system": ACR_CATEGORY_SYSTEM, "code": category,
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
        out = prune(orjson.loads(orjson.dumps(resource)))
        kept = [e for e in as_list(out.get("extension"))
                if not (isinstance(e, Mapping) and str(e.get("url", "")).startswith(PAMA))]
        out["extension"] = kept + self.pama_extensions(pama, category)
        return out

    def _replacement(self, order: dict[str, Any], alt: Alternative) -> dict[str, Any]:
        new = orjson.loads(orjson.dumps(order))
        new["code"] = {"coding": [dict(c) for c in alt.procedure.order_codes],
                       "text": alt.procedure.name}
        pama = "appropriate" if alt.category != "UNA" else "not-appropriate"
        return self._with_rating(new, pama, alt.category)

    def _rating_action(self, result: OrderResult) -> Action:
        d = result.decision
        assert d.pama is not None
        return Action(type="update",
                      description=f"Record the appropriateness rating of {result.procedure.name}",
                      resource=self._with_rating(result.order, d.pama, d.category))
