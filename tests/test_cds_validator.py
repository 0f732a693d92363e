"""The response validator itself: each rule catches what it should."""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import pytest

from tests.cds_validator import validate_discovery, validate_service_response
from tests.conftest import FIXTURES

PAMA = "http://fhir.org/argonaut/Extension/pama-rating"


def valid() -> dict[str, Any]:
    resource = {"resourceType": "ServiceRequest", "id": "o1", "extension": [
        {"url": PAMA, "valueCodeableConcept": {"coding": [
            {"system": "http://fhir.org/argonaut/CodeSystem/pama-rating",
             "code": "appropriate"}]}},
        {"url": PAMA + "-qcdsm-consulted", "valueString": "us"},
        {"url": PAMA + "-consult-id", "valueUri": f"urn:uuid:{uuid.uuid4()}"}]}
    return {"cards": [{
        "uuid": str(uuid.uuid4()), "summary": "s", "indicator": "warning",
        "source": {"label": "ACR", "url": "https://acsearch.acr.org"},
        "suggestions": [{"label": "x", "uuid": str(uuid.uuid4()), "isRecommended": True,
                         "actions": [{"type": "update", "description": "d",
                                      "resource": copy.deepcopy(resource)}]}],
        "selectionBehavior": "at-most-one",
        "overrideReasons": [{"system": "urn:x", "code": "a", "display": "A"}]}],
        "systemActions": [{"type": "update", "description": "d", "resource": resource}]}


def test_valid_response_passes() -> None:
    assert validate_service_response(valid()) == []


def broken(change: Any) -> list[str]:
    body = valid()
    change(body)
    return validate_service_response(body)


@pytest.mark.parametrize(("change", "message"), [
    (lambda b: b["cards"][0].pop("summary"), "summary: required"),
    (lambda b: b["cards"][0].update(summary="x" * 140), "under 140"),
    (lambda b: b["cards"][0].pop("uuid"), "uuid: required"),
    (lambda b: b["cards"][0].update(indicator="hard-stop"), "indicator"),
    (lambda b: b["cards"][0]["source"].pop("label"), "source/label"),
    (lambda b: b["cards"][0].pop("selectionBehavior"), "selectionBehavior: required"),
    (lambda b: b["cards"][0]["suggestions"].append(
        copy.deepcopy(b["cards"][0]["suggestions"][0]) | {"uuid": "other"}), "isRecommended"),
    (lambda b: b["cards"][0]["suggestions"][0]["actions"][0].update(type="UPDATE"), "lower"),
    (lambda b: b["cards"][0]["suggestions"][0]["actions"][0].update(resource="{}"),
     "JSON object"),
    (lambda b: b["cards"][0]["suggestions"][0]["actions"][0].pop("description"),
     "description: required"),
    (lambda b: b["cards"][0]["suggestions"][0].update(actions=[
        {"type": "delete", "description": "d"}]), "resourceId"),
    (lambda b: b["cards"][0].update(detail=None), "empty or null"),
    (lambda b: b["cards"][0].update(links=[]), "empty or null"),
    (lambda b: b["cards"][0]["overrideReasons"][0].pop("display"), "display: required"),
    (lambda b: b["systemActions"][0]["resource"]["extension"].pop(1), "qcdsm"),
    (lambda b: b["systemActions"][0]["resource"]["extension"][2].update(valueUri="abc"),
     "consult-id"),
    (lambda b: b.update(extension={"systemActions": []}), "must equal"),
    (lambda b: b.update(systemActions=[]), "non-empty"),
])
def test_each_rule(change: Any, message: str) -> None:
    problems = broken(change)
    assert any(message in p for p in problems), problems


def test_spec_example_card_without_uuid_is_reported() -> None:
    data = json.loads((FIXTURES / "examples" / "spec" / "v2-response-cards.json").read_text())
    problems = validate_service_response(data)
    assert problems == ["/cards/1/uuid: required (a UUID) so that feedback can be sent"]


def test_pama_guide_gaps_are_reported() -> None:
    data = json.loads((FIXTURES / "examples" / "pama" / "pama-response-appropriate.json")
                      .read_text())
    problems = validate_service_response(data)
    assert any("qcdsm" in p for p in problems)
    assert any("description: required" in p for p in problems)


def test_discovery_rules() -> None:
    assert validate_discovery({"services": []}) == []
    assert validate_discovery({}) == ["/services: required array"]
    problems = validate_discovery({"services": [{"hook": "order-select", "id": "a"}]})
    assert problems == ["/services/0/description: required"]
