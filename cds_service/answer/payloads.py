"""The FHIR and PAMA payloads of an answer: the rating extensions (Argonaut PAMA), the order a
suggestion writes, the system action that records a rating, and the response body."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from cds_service.answer.rating import Rated
from cds_service.clinical.facts import Facts
from cds_service.clinical.scenario import Alternative
from cds_service.codesystems import SystemUrls
from cds_service.ids import new_uuid
from cds_service.protocol import Action, Card
from cds_service.record.prefetch import as_list

PAMA = "http://fhir.org/argonaut/Extension/pama-rating"
PAMA_SYSTEM = "http://fhir.org/argonaut/CodeSystem/pama-rating"
PAMA_QCDSM = "http://fhir.org/argonaut/Extension/pama-rating-qcdsm-consulted"
PAMA_CONSULT = "http://fhir.org/argonaut/Extension/pama-rating-consult-id"
PAMA_AUC = "http://fhir.org/argonaut/Extension/pama-rating-auc-applied"
PAMA_DISPLAY = {"appropriate": "Appropriate", "not-appropriate": "Not appropriate",
                "no-criteria-apply": "No criteria apply"}


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


def indication_reasons(facts: Facts) -> list[dict[str, Any]]:
    """reasonCode for a suggested order whose draft had none: the indication in the record."""
    reasons: list[dict[str, Any]] = []
    for e in facts.indication.evidence + facts.radiculopathy.evidence:
        if e.system and e.code and not any(
                r["coding"][0]["code"] == e.code for r in reasons):
            coding = {"system": e.system, "code": e.code, "display": e.display or e.code}
            reasons.append({"coding": [coding], "text": e.display or e.code})
    return reasons[:3] or [{"text": "low back pain"}]


def response_body(cards: list[Card], actions: list[Action]) -> dict[str, Any]:
    """The CDS Hooks response (the route's and ``cds-service evaluate``'s): the cards and the
    rating actions, also under ``extension.systemActions``, the older Argonaut location the
    sandbox reads."""
    body: dict[str, Any] = {"cards": [plain(card) for card in cards]}
    if actions:  # the same actions, dumped once
        body["systemActions"] = dumped = [plain(action) for action in actions]
        body["extension"] = {"systemActions": dumped}
    return body


def plain(model: BaseModel) -> dict[str, Any]:
    """A response model as JSON values, its unset (None) fields left out: what
    ``model_dump(mode="json", exclude_none=True)`` gives for the response models (str, bool,
    JSON dicts, lists of models), without pydantic's serialiser on each call. The models were
    validated when they were built; ``tests/test_response_body.py`` holds the two equal."""
    out: dict[str, Any] = {}
    for name, value in model.__dict__.items():
        if value is None:
            continue
        if isinstance(value, BaseModel):
            out[name] = plain(value)
        elif type(value) is list:
            out[name] = [plain(v) if isinstance(v, BaseModel) else v for v in value]
        else:
            out[name] = value
    return out


class Payloads:
    """Builds the rating payloads with the service's code systems and PAMA identifiers."""

    def __init__(self, systems: SystemUrls, categories: Mapping[str, str], qcdsm_id: str,
                 auc_applied: str | None):
        self.systems = systems
        self.categories = categories
        self.qcdsm_id = qcdsm_id
        self.auc_applied = auc_applied

    def pama_extensions(self, pama: str, category: str | None) -> list[dict[str, Any]]:
        codings: list[dict[str, Any]] = [{"system": PAMA_SYSTEM, "code": pama,
                                          "display": PAMA_DISPLAY.get(pama, pama)}]
        if category:
            codings.append({"system": self.systems.acr_category, "code": category,
                            "display": self.categories.get(category, category)})
        ext: list[dict[str, Any]] = [
            {"url": PAMA, "valueCodeableConcept": {"coding": codings}},
            {"url": PAMA_QCDSM, "valueString": self.qcdsm_id},
            {"url": PAMA_CONSULT, "valueUri": f"urn:uuid:{new_uuid()}"},
        ]
        if self.auc_applied:
            ext.append({"url": PAMA_AUC, "valueUri": self.auc_applied})
        return ext

    def with_rating(self, resource: dict[str, Any], pama: str,
                    category: str | None) -> dict[str, Any]:
        """A copy of the order carrying the rating (the request's order is left as it came)."""
        out = prune(resource)
        kept = [e for e in as_list(out.get("extension"))
                if not (isinstance(e, Mapping) and str(e.get("url", "")).startswith(PAMA))]
        out["extension"] = kept + self.pama_extensions(pama, category)
        return out

    def replacement(self, rated: Rated, alt: Alternative) -> dict[str, Any]:
        """The draft order changed to the suggested study, with its reasons and rating."""
        new = dict(rated.order)  # (shallow: with_rating copies the rest)
        new["code"] = {"coding": [dict(c) for c in alt.procedure.order_codes],
                       "text": alt.procedure.name}
        if not prune(new.get("reasonCode")):  # never an absent reason: the indication found
            new["reasonCode"] = indication_reasons(rated.facts)
        pama = "appropriate" if alt.category != "UNA" else "not-appropriate"
        return self.with_rating(new, pama, alt.category)

    def rating_action(self, rated: Rated) -> Action:
        """The system action that records the order's rating."""
        d = rated.decision
        assert d.pama is not None
        return Action(type="update",
                      description=f"Record the appropriateness rating of {rated.procedure.name}",
                      resource=self.with_rating(rated.order, d.pama, d.category))
