"""Issue 23 item 2: the clinician's saved answers are read from ``fhirServer`` (one search)
when the prefetch lacks ``questionnaireresponses`` and the answer would otherwise ask; against
the tests' SMART EHR on a real socket (it serves the QuestionnaireResponses the app saved)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cds_service.app import create_app
from cds_service.questionnaire import build_response
from tests.builders import PATIENT, hook_request, order
from tests.conftest import SELECT, dev_settings
from tests.smart_server import ORDER_ID, PRACTITIONER, SmartTestServer

TOKEN = "hook-token-1"


@pytest.fixture(scope="module")
def ehr() -> Iterator[SmartTestServer]:
    with SmartTestServer(datetime.now(UTC)) as server:
        yield server


@pytest.fixture
def client(ehr: SmartTestServer, tmp_path: Path) -> Iterator[TestClient]:
    ehr.reset()
    ehr.tokens.add(TOKEN)
    app = create_app(dev_settings(data_dir=tmp_path, fhir_allowed_servers=ehr.base))
    with TestClient(app) as test_client:
        yield test_client


def call(client: TestClient, ehr: SmartTestServer, **prefetch: Any) -> dict[str, Any]:
    """order-select for the draft MRI with the whole record prefetched but the answers."""
    record = {k: v for k, v in ehr.data.items() if k != "questionnaireresponses"}
    body = hook_request(order(ORDER_ID, cpt="72148"), prefetch={**record, **prefetch})
    body["fhirServer"] = ehr.base
    body["fhirAuthorization"] = {"access_token": TOKEN, "token_type": "Bearer",
                                 "expires_in": 300, "scope": "patient/*.rs",
                                 "subject": "cds-service"}
    answered = client.post(SELECT, json=body)
    assert answered.status_code == 200, answered.text
    result: dict[str, Any] = answered.json()
    return result


def searches(ehr: SmartTestServer) -> list[str]:
    return [path for method, path, _ in ehr.fhir_requests
            if method == "GET" and path.startswith("/fhir/QuestionnaireResponse?")]


def saved(client: TestClient) -> dict[str, Any]:
    engine = client.app.state.smart.engine  # type: ignore[attr-defined]
    root = client.app.state.smart.settings.canonical_root  # type: ignore[attr-defined]
    return build_response(engine.questions, root,
                          {"conservative-care": True, "conservative-care-weeks": 8}, PATIENT,
                          datetime.now(UTC), order_reference=f"ServiceRequest/{ORDER_ID}",
                          author=PRACTITIONER)


def ratings(result: dict[str, Any]) -> list[str]:
    return [c["code"] for a in result.get("systemActions", [])
            for e in a["resource"]["extension"] if "valueCodeableConcept" in e
            for c in e["valueCodeableConcept"]["coding"]]


def test_saved_answers_are_read_when_the_card_would_ask(client: TestClient,
                                                        ehr: SmartTestServer) -> None:
    asked = call(client, ehr)  # nothing saved yet: the card asks, after one search
    assert any(c.get("links") for c in asked["cards"]), asked
    assert len(searches(ehr)) == 1 and f"patient={PATIENT}" in searches(ehr)[0]
    ehr.responses.append(saved(client))  # the app saved the clinician's answers
    answered = call(client, ehr)
    assert "appropriate" in ratings(answered) and "UA" in ratings(answered), answered
    assert all("links" not in c for c in answered["cards"])  # nothing asked again
    assert len(searches(ehr)) == 2  # one search per call


def test_no_search_when_nothing_would_be_asked_or_the_answers_came(
        client: TestClient, ehr: SmartTestServer) -> None:
    ehr.responses.append(saved(client))
    call(client, ehr, questionnaireresponses={"resourceType": "Bundle", "type": "searchset",
                                              "entry": [{"resource": saved(client)}]})
    assert searches(ehr) == []  # prefetched: nothing fetched
    planned = ehr.data["servicerequests"]
    ehr.data["servicerequests"] = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    try:  # no injection planned: the scenario is settled, nothing asked, nothing read
        settled = call(client, ehr)
    finally:
        ehr.data["servicerequests"] = planned
    assert all("links" not in c for c in settled["cards"]), settled
    assert searches(ehr) == []
