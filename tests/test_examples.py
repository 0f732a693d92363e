"""Every public example payload (spec, PAMA guide, sandbox captures) replayed against the service.

Each must get a valid answer or a clean 4xx with an OperationOutcome; never a 5xx. The payloads
are copied verbatim under fixtures/examples/ (sources in fixtures/examples/SOURCES.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES, SELECT, SIGN, ValidatingClient

EXAMPLES = sorted((FIXTURES / "examples").rglob("*.json"))
SERVICE_FOR = {"order-select": SELECT, "order-sign": SIGN}


def endpoint(data: Any) -> str:
    if isinstance(data, dict) and "feedback" in data:
        return SELECT + "/feedback"
    if isinstance(data, dict) and data.get("hook") in SERVICE_FOR:
        return SERVICE_FOR[data["hook"]]
    return SELECT


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_gets_a_valid_answer_or_a_clean_4xx(client: ValidatingClient,
                                                    path: Path) -> None:
    data = json.loads(path.read_text())
    r = client.post(endpoint(data), json=data)
    assert r.status_code < 500
    if r.status_code >= 400:
        assert r.json()["resourceType"] == "OperationOutcome"


def test_examples_are_present() -> None:
    assert len(EXAMPLES) >= 25


def test_sandbox_captures(client: ValidatingClient) -> None:
    sandbox = FIXTURES / "examples" / "sandbox"
    empty = json.loads((sandbox / "sandbox-ui-captured-order-select-empty-initial.request.json")
                       .read_text())
    r = client.post(SELECT, json=empty)
    assert r.status_code == 200 and r.json() == {"cards": []}
    ct = json.loads((sandbox / "sandbox-ui-captured-order-select-72133-lbp.request.json")
                    .read_text())
    r = client.post(SELECT, json=ct)  # CT without and with contrast: UNA in every scenario
    assert r.status_code == 200
    assert [c["indicator"] for c in r.json()["cards"]] == ["warning"]
    feedback = json.loads((sandbox / "sandbox-ui-captured-feedback-accepted.json").read_text())
    r = client.post(SELECT + "/feedback", json=feedback)
    assert r.status_code == 200 and r.json()["received"] == 1


def test_spec_feedback_examples_are_accepted(client: ValidatingClient) -> None:
    for name in ("v2-feedback-accepted.json", "v2-feedback-overridden.json",
                 "v2-feedback-overridden-with-reason.json"):
        data = json.loads((FIXTURES / "examples" / "spec" / name).read_text())
        assert client.post(SIGN + "/feedback", json=data).status_code == 200, name


@pytest.mark.parametrize(("name", "hook"), [("order-select-context-R4.json", "order-select"),
                                            ("order-sign-context-R4.json", "order-sign")])
def test_library_contexts_in_an_envelope(client: ValidatingClient, name: str, hook: str) -> None:
    """The hook library's contexts hold only NutritionOrder / MedicationRequest drafts."""
    context = json.loads((FIXTURES / "examples" / "spec" / name).read_text())["context"]
    body = {"hook": hook, "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": context}
    r = client.post(SERVICE_FOR[hook], json=body)
    assert r.status_code == 200 and r.json() == {"cards": []}


def test_paginated_order_sign_example(client: ValidatingClient) -> None:
    data = json.loads((FIXTURES / "examples" / "spec" /
                       "v3ballot-order-sign-request-paginated-prefetch.json").read_text())
    r = client.post(SIGN, json=data)
    assert r.status_code == 200 and r.json() == {"cards": []}


def test_pama_knee_mra_is_not_rated(client: ValidatingClient) -> None:
    data = json.loads((FIXTURES / "examples" / "pama" / "pama-order-select-request.json")
                      .read_text())
    r = client.post(SELECT, json=data)
    assert r.status_code == 200 and r.json() == {"cards": []}
