"""The hook evaluation: draft orders + patient record + time -> cards and PAMA system actions.

The routes and the command line use :class:`Engine`, which puts the answer wing
(:mod:`cds_service.answer`) together: rate the orders (facts and decisions from the pure clinical
core), choose each order's card by the alert policy, render it from the ``cards/`` templates, and
build the PAMA payloads and the response body.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cds_service.answer.cards import CardBuilder
from cds_service.answer.payloads import PAMA_DISPLAY, Payloads, response_body
from cds_service.answer.policy import choose_card
from cds_service.answer.published import publish
from cds_service.answer.rating import Rated, Rater, Target
from cds_service.clinical.facts import VALUESETS_READ, ClinicalParams, Facts
from cds_service.clinical.scenario import Decision
from cds_service.codesystems import SystemUrls
from cds_service.knowledge import Knowledge, Procedure, require_valuesets
from cds_service.protocol import Action, Card, HookRequest
from cds_service.questionnaire import load_questions
from cds_service.record import PatientRecord
from cds_service.render import CardTemplates
from cds_service.settings import Settings

try:
    VERSION = importlib.metadata.version("cds-lbp-imaging")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    VERSION = "0.0.0"

__all__ = ["PAMA_DISPLAY", "VERSION", "Answer", "Engine", "OrderResult", "Rated",
           "params_from"]


@dataclass(frozen=True)
class OrderResult:
    """One rated order with the card it got, if any (also what the audit keeps)."""

    rated: Rated
    kind: str | None = None
    card: Card | None = None

    @property
    def order(self) -> dict[str, Any]:
        return self.rated.order

    @property
    def procedure(self) -> Procedure:
        return self.rated.procedure

    @property
    def facts(self) -> Facts:
        return self.rated.facts

    @property
    def decision(self) -> Decision:
        return self.rated.decision

    @property
    def cards(self) -> list[Card]:
        return [self.card] if self.card is not None else []

    @property
    def kinds(self) -> list[str]:
        return [self.kind] if self.kind is not None else []


@dataclass(frozen=True)
class Answer:
    """What the service says to a hook call: a card per order at most, and the ratings."""

    orders: list[OrderResult] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)

    @property
    def cards(self) -> list[Card]:
        return [r.card for r in self.orders if r.card is not None]

    def body(self) -> dict[str, Any]:
        return response_body(self.cards, self.actions)


def params_from(settings: Settings) -> ClinicalParams:
    return ClinicalParams(
        conservative_care_weeks=settings.conservative_care_weeks,
        elderly_over_age=settings.elderly_over_age, episode_grace_days=settings.episode_grace_days,
        adult_age=settings.adult_age,
        care_window_days=settings.care_window_days,
        recent_mri_months=settings.recent_mri_months,
        recent_trauma_days=settings.recent_trauma_days,
        recent_red_flag_days=settings.recent_red_flag_days,
        assume_candidate_after_failed_care=settings.assume_candidate_after_failed_care)


class Engine:
    """Holds the loaded knowledge, questions and templates; rates orders and answers."""

    def __init__(self, knowledge: Knowledge, templates: CardTemplates, settings: Settings):
        require_valuesets(knowledge, VALUESETS_READ,
                          reader="cds_service/clinical/registry.py (VALUESETS_READ)")
        self.knowledge = knowledge
        self.templates = templates
        self.settings = settings
        self.params = params_from(settings)
        # the site's own override-reason system (cards/common.yaml) or ours
        self.systems = SystemUrls.under(settings.canonical_root, templates.override_system)
        self.questions = load_questions(settings.knowledge_dir)
        roots = [settings.canonical_root, *settings.previous_canonical_roots]
        self.rater = Rater(knowledge, self.questions, self.params,
                           [self.questions.url(r) for r in roots], settings.answer_valid_days)
        self.payloads = Payloads(self.systems, templates.categories, settings.qcdsm_id,
                                 settings.auc_applied)
        self.cards = CardBuilder(knowledge, templates, self.questions, settings, self.systems,
                                 self.payloads)
        published = publish(self.systems, templates, self.questions, settings.canonical_root,
                            VERSION)
        self.code_systems = published.code_systems
        self.questionnaire = published.questionnaire

    def imaging_targets(self, request: HookRequest) -> list[Target]:
        """The target orders that are imaging studies of the catalog (a cheap code check)."""
        return self.rater.targets(request)

    def rate(self, request: HookRequest, record: PatientRecord, now: datetime,
             targets: list[Target] | None = None) -> list[Rated]:
        """Decide every target order that is lumbar imaging (others are left alone); renders
        nothing. ``targets``: :meth:`imaging_targets` of the request, when known already."""
        if targets is None:
            targets = self.imaging_targets(request)
        if not targets:
            return []
        return self.rater.rate(targets, request.context.draftOrders.resources(), record, now)

    def rate_order(self, order: dict[str, Any], record: PatientRecord,
                   now: datetime) -> Rated | None:
        """Rate one ServiceRequest on its own (the SMART app); None if not imaging."""
        return self.rater.rate_order(order, record, now)

    def answer(self, rated: list[Rated]) -> Answer:
        """The card each rated order gets by the alert policy, and the rating actions."""
        orders = []
        for r in rated:
            choice = choose_card(r, self.knowledge)
            orders.append(OrderResult(r, choice.kind, self.cards.card(r, choice))
                          if choice else OrderResult(r))
        actions = [self.payloads.rating_action(r) for r in rated if r.decision.pama]
        return Answer(orders, actions)

    def evaluate(self, request: HookRequest, record: PatientRecord,
                 now: datetime) -> tuple[list[Card], list[Action]]:
        """Cards and PAMA system actions for the hook request."""
        answer = self.answer(self.rate(request, record, now))
        return answer.cards, answer.actions

    def pama_extensions(self, pama: str, category: str | None) -> list[dict[str, Any]]:
        return self.payloads.pama_extensions(pama, category)
