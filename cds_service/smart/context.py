"""What the launch says the app is about: the order, its catalog procedure, the questions to ask.

Three ways, in order: the card link's ``appContext`` (no PHI)
``{"order": "ServiceRequest/<id>", "procedure": "mri-wo", "ask": ["conservative-care", ...]}``;
SMART 2.1 ``fhirContext`` (``[{"reference": "ServiceRequest/<id>"}]``, an EHR that launches the
app on an order); or neither (a launch from a menu): the page then offers the patient's lumbar
imaging orders, and the one chosen comes back as ``order=<id>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from cds_service.answer.rating import Rated
from cds_service.clinical.model import Tri
from cds_service.questionnaire import (
    ASKED_FIRST,
    MAX_ASKED,
    Question,
    Questions,
    questions_to_ask,
)
from cds_service.smart.oauth import FHIR_ID

MAX_ASK = 64


@dataclass(frozen=True)
class AppContext:
    order_id: str
    procedure: str | None
    ask: tuple[str, ...]
    chosen: bool = False  # picked on the app's own list (no launch context named it)

    @property
    def order_reference(self) -> str:
        return f"ServiceRequest/{self.order_id}"

    def questions(self, questions: Questions, rated: Rated | None = None,
                  form: Mapping[str, str] | None = None) -> list[Question]:
        """The questions to show, red flags first, at most MAX_ASKED: those the card's link
        asked, with the ones that share their fact or that they depend on (enableWhen); with no
        link (a menu launch), those that decide the order's rating (``rated``), or, for answers
        sent back, those the form answers."""
        named = self.ask or tuple(link for link in form or () if link in questions.by_link)
        facts = [questions.by_link[link].fact for link in named if link in questions.by_link]
        if facts:
            return _fit(questions, facts)
        if rated is not None:  # (what the EHR left unread is asked only if nothing else is)
            return red_flags_first(questions_to_ask(
                questions, open_facts(questions, rated), rated.facts)) or _fit(
                questions, [q.fact for q in questions.items if q.fact in ASKED_FIRST])
        return []


def _fit(questions: Questions, facts: list[str]) -> list[Question]:
    """The questions of whole facts, red flags first, while they fit in MAX_ASKED."""
    ranked = sorted(dict.fromkeys(facts), key=_rank)
    chosen: list[str] = []
    for fact in ranked:
        if len(questions.for_facts([*chosen, fact])) <= MAX_ASKED:
            chosen.append(fact)
    return red_flags_first(questions.for_facts(chosen or ranked[:1]))


def open_facts(questions: Questions, rated: Rated) -> list[str]:
    """What a launch without a card's link asks about: the facts that decide the rating, else
    those the record leaves open or the rules assumed (a candidate after failed care), else the
    red flags (the record settles the rating; a red flag it does not show would change it)."""
    if rated.decision.deciding:
        return list(rated.decision.deciding)
    facts = rated.facts
    named = dict.fromkeys(q.fact for q in questions.items)
    return [name for name in named
            if facts.fact(name).value is Tri.UNKNOWN
            or (name == "intervention_candidate" and facts.candidate_assumed)] or [
        name for name in ASKED_FIRST if name in named]


def _rank(fact: str) -> int:
    return ASKED_FIRST.index(fact) if fact in ASKED_FIRST else len(ASKED_FIRST)


def red_flags_first(asked: list[Question]) -> list[Question]:
    """Questions about red flags first (in the order they are asked), then the others, each
    fact's questions together in questionnaire order."""
    return sorted(asked, key=lambda q: _rank(q.fact))


def service_request_id(reference: Any) -> str | None:
    """The id of ``ServiceRequest/<id>`` (relative, or the tail of an absolute URL)."""
    if not isinstance(reference, str):
        return None
    parts = reference.rstrip("/").split("/")
    if len(parts) < 2 or parts[-2] != "ServiceRequest" or not FHIR_ID.fullmatch(parts[-1]):
        return None
    return parts[-1]


def from_fhir_context(references: Any) -> str | None:
    """The first ServiceRequest among the references of SMART 2.1 ``fhirContext``, or None."""
    for reference in references if isinstance(references, list) else []:
        found = service_request_id(reference)
        if found:
            return found
    return None


def parse_app_context(value: str | None, fhir_context: Any = None,
                      chosen: str | None = None) -> AppContext | None:
    """The order the launch is about (appContext, else fhirContext, else the one chosen on the
    app's list); None when nothing names one (the app offers the patient's orders)."""
    try:
        doc = orjson.loads(value) if value else None
    except orjson.JSONDecodeError:
        doc = None
    doc = doc if isinstance(doc, dict) else {}
    order_id = service_request_id(doc.get("order"))
    if order_id is not None:
        procedure = doc.get("procedure")
        ask = doc.get("ask")
        links = tuple(a for a in ask if isinstance(a, str))[:MAX_ASK] \
            if isinstance(ask, list) else ()
        return AppContext(order_id, procedure if isinstance(procedure, str) else None, links)
    order_id = from_fhir_context(fhir_context)
    if order_id is not None:
        return AppContext(order_id, None, ())
    if chosen and FHIR_ID.fullmatch(chosen):
        return AppContext(chosen, None, (), chosen=True)
    return None
