"""What the launch says the app is about: the order, its catalog procedure, the questions to ask.

Three ways, in order: the card link's ``appContext`` (no PHI)
``{"order": "ServiceRequest/<id>", "procedure": "mri-wo", "ask": ["conservative-care", ...]}``;
SMART 2.1 ``fhirContext`` (``[{"reference": "ServiceRequest/<id>"}]``, an EHR that launches the
app on an order); or neither (a launch from a menu): the page then offers the patient's lumbar
imaging orders, and the one chosen comes back as ``order=<id>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from cds_service.questionnaire import Question, Questions
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

    def questions(self, questions: Questions) -> list[Question]:
        """The questions to show: those asked, with the ones that share their fact or that they
        depend on (enableWhen), in questionnaire order; every question when none is named."""
        facts = {questions.by_link[link].fact for link in self.ask if link in questions.by_link}
        return questions.for_facts(facts) if facts else list(questions.items)


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
