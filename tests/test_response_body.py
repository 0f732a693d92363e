"""The response body is written without pydantic's serialiser (cds_service.answer.payloads.plain):
for every fixture it is what ``model_dump(mode="json", exclude_none=True)`` of the response model
gives, key for key and in the same order; and the random ids it carries are version 4 UUIDs."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from cds_service.answer.payloads import plain, response_body
from cds_service.engine import Engine
from cds_service.ids import new_uuid
from cds_service.knowledge import load_knowledge
from cds_service.protocol import (
    Action,
    Card,
    CardSource,
    Coding,
    HookRequest,
    Link,
    ServiceResponse,
    Suggestion,
)
from cds_service.record import record_from_prefetch
from cds_service.render import load_templates
from tests.conftest import FIXTURE_NOW, FIXTURES, ROOT, dev_settings

ENGINE = Engine(load_knowledge(), load_templates(ROOT / "cards"),
                dev_settings())
CASES = json.loads((FIXTURES / "expected.json").read_text())["cases"]


def by_pydantic(cards: list[Card], actions: list[Action]) -> dict[str, Any]:
    body = ServiceResponse(cards=cards, systemActions=actions or None).model_dump(
        mode="json", exclude_none=True)
    if actions:
        body["extension"] = {"systemActions": body["systemActions"]}
    return body


def in_order(value: Any) -> Any:
    """The value with every object's keys listed in order (a dict compares without order)."""
    if isinstance(value, dict):
        return [(k, in_order(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [in_order(v) for v in value]
    return value


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fixture_body_is_the_models_dump(case: dict[str, Any]) -> None:
    body = json.loads((FIXTURES / case["file"]).read_text())
    try:
        request = HookRequest.model_validate(body)
    except ValueError:
        pytest.skip("a fixture the protocol model refuses (answered 400)")
    record = record_from_prefetch(request.prefetch, request.context.patientId)
    answer = ENGINE.answer(ENGINE.rate(request, record, FIXTURE_NOW))
    ours = response_body(answer.cards, answer.actions)
    assert in_order(ours) == in_order(by_pydantic(answer.cards, answer.actions))
    assert json.loads(json.dumps(ours)) == ours  # JSON values only


def test_every_optional_field_and_nesting() -> None:
    card = Card(
        uuid="c1", summary="s", indicator="warning", source=CardSource(
            label="ACR", url="https://example.org", topic=Coding(system="x", code="y")),
        detail="d", selectionBehavior="at-most-one",
        suggestions=[Suggestion(label="a", uuid="s1", isRecommended=False, actions=[
            Action(type="update", description="u", resource={"a": None, "b": [1, {"c": None}]}),
            Action(type="delete", description="x", resourceId="ServiceRequest/1")])],
        overrideReasons=[Coding(system="x", code="z", display="Z")],
        links=[Link(label="l", url="https://example.org/app", type="smart", appContext="q")])
    bare = Card(uuid="c2", summary="t", indicator="info", source=CardSource(label="ACR"))
    actions = [Action(type="update", description="rating", resource={"id": "1"})]
    assert in_order(response_body([card, bare], actions)) == in_order(
        by_pydantic([card, bare], actions))
    assert in_order(response_body([bare], [])) == in_order(by_pydantic([bare], []))
    # None inside a resource is the resource's own (kept, as pydantic keeps it)
    assert plain(card)["suggestions"][0]["actions"][0]["resource"] == {"a": None,
                                                                       "b": [1, {"c": None}]}


def test_new_uuid_is_a_random_version_4_uuid() -> None:
    made = [new_uuid() for _ in range(2000)]
    assert len(set(made)) == len(made)
    for text in made:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # the canonical form: lower case, 8-4-4-4-12
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # every variant digit (8, 9, a, b) occurs: the two random bits are used
    assert {text[19] for text in made} == set("89ab")
