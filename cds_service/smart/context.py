"""The card link's ``appContext`` (no PHI): the order, its catalog procedure, the questions to ask.

``{"order": "ServiceRequest/<id>", "procedure": "mri-wo", "ask": ["conservative-care", ...]}``
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from cds_service.questionnaire import Question, Questions
from cds_service.smart.oauth import FHIR_ID
from cds_service.smart.problems import Problem

MAX_ASK = 64


@dataclass(frozen=True)
class AppContext:
    order_id: str
    procedure: str | None
    ask: tuple[str, ...]

    @property
    def order_reference(self) -> str:
        return f"ServiceRequest/{self.order_id}"

    def questions(self, questions: Questions) -> list[Question]:
        """The questions to show: those asked, with the ones that share their fact or that they
        depend on (enableWhen), in questionnaire order; every question when none is named."""
        facts = {questions.by_link[link].fact for link in self.ask if link in questions.by_link}
        return questions.for_facts(facts) if facts else list(questions.items)


def parse_app_context(value: str | None) -> AppContext:
    """The appContext of the launch; a Problem (400) when there is none the app can use."""
    try:
        doc = orjson.loads(value) if value else None
    except orjson.JSONDecodeError:
        doc = None
    order = doc.get("order") if isinstance(doc, dict) else None
    rtype, _, rid = order.partition("/") if isinstance(order, str) else ("", "", "")
    if rtype != "ServiceRequest" or not FHIR_ID.fullmatch(rid):
        raise Problem(400, "No order to rate",
                      "The EHR opened the app without the order it is about (the appContext "
                      "of the card's link). The app is opened from a card of the lumbar imaging "
                      "service, for one order.")
    assert isinstance(doc, dict)
    procedure = doc.get("procedure")
    ask = doc.get("ask")
    links = tuple(a for a in ask if isinstance(a, str))[:MAX_ASK] if isinstance(ask, list) else ()
    return AppContext(rid, procedure if isinstance(procedure, str) else None, links)
