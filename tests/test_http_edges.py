"""Issue 11, finding 14: slow bodies, /metrics and /openapi.json in production, 413 counted,
tracebacks as a JSON field, and an OpenAPI document that describes the real bodies."""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cds_service.app import create_app
from cds_service.logs import configure_logging
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient, dev_settings
from tests.served import served as serve
from tests.test_auth_api import production_settings

ISSUERS = [{"iss": "https://ehr.example.org", "jwks": {"keys": [{
    "kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
    "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
    "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}}]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("edges"), CDS_BODY_READ_TIMEOUT_SECONDS="1") as base:
        yield base


def test_a_body_that_never_arrives_gets_408_and_the_connection_closes(served: str) -> None:
    port = int(served.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"POST " + SELECT.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"hook\"")
        started = time.monotonic()
        answer = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"OperationOutcome" in answer and b"not received within 1 s" in answer
    assert waited < 8  # the 1 s read timeout, not uvicorn's keep-alive or a minute


def counted(client: ValidatingClient, status: str, headers: dict[str, str]) -> float:
    text = client.get("/metrics", headers=headers).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("cds_http_requests_total{") and f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_413_is_counted_as_413_with_or_without_content_length() -> None:
    app = create_app(dev_settings(max_body_bytes=1000), clock=lambda: FIXTURE_NOW)
    with ValidatingClient(app) as c:
        assert c.post(SELECT, content=b"x" * 2000,
                      headers={"content-type": "application/json"}).status_code == 413

        def chunks() -> Iterator[bytes]:
            for _ in range(10):
                yield b" " * 500

        assert c.post(SELECT, content=chunks(),
                      headers={"content-type": "application/json"}).status_code == 413
        assert counted(c, "413", {}) == 2
        assert counted(c, "500", {}) == 0


def test_metrics_need_a_token_in_production(tmp_path: Path) -> None:
    closed = production_settings(tmp_path, ISSUERS, metrics_token=None)
    with ValidatingClient(create_app(closed, clock=lambda: FIXTURE_NOW)) as c:
        assert c.get("/metrics").status_code == 404
    with ValidatingClient(create_app(production_settings(tmp_path, ISSUERS),
                                     clock=lambda: FIXTURE_NOW)) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.get("/metrics", headers={"Authorization": "Bearer metrics-token"})
        assert ok.status_code == 200 and "cds_http_requests_total" in ok.text


def test_openapi_is_not_served_in_production_unless_asked(tmp_path: Path) -> None:
    with ValidatingClient(create_app(production_settings(tmp_path, ISSUERS),
                                     clock=lambda: FIXTURE_NOW)) as c:
        assert c.get("/openapi.json").status_code == 404
    public = production_settings(tmp_path, ISSUERS, openapi_public=True)
    with ValidatingClient(create_app(public, clock=lambda: FIXTURE_NOW)) as c:
        assert c.get("/openapi.json").status_code == 200


def test_openapi_describes_the_real_bodies() -> None:
    with ValidatingClient(create_app(dev_settings(), clock=lambda: FIXTURE_NOW)) as c:
        doc = c.get("/openapi.json").json()
    assert "/cds-services/{service_id}" not in doc["paths"]  # one path per service
    hook = doc["paths"]["/cds-services/lbp-imaging-order-select"]["post"]
    assert hook["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OrderSelectRequest"}
    assert doc["components"]["schemas"]["OrderSelectRequest"]["allOf"] == [
        {"$ref": "#/components/schemas/HookRequest"},
        {"properties": {"hook": {"const": "order-select"}}}]
    sign = doc["paths"]["/cds-services/lbp-imaging-order-sign"]["post"]
    assert sign["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OrderSignRequest"}
    assert set(hook["responses"]) >= {"200", "400", "401", "404", "412", "413"}
    assert "422" not in hook["responses"]
    error = hook["responses"]["400"]["content"]["application/fhir+json"]["schema"]
    assert error == {"$ref": "#/components/schemas/OperationOutcome"}
    feedback = doc["paths"]["/cds-services/{service_id}/feedback"]["post"]
    assert feedback["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Feedback"}
    schemas = doc["components"]["schemas"]
    assert {"HookRequest", "Feedback", "ServiceResponse", "OperationOutcome"} <= set(schemas)
    assert "context" in schemas["HookRequest"]["required"]
    params = feedback["parameters"][0]["schema"]["enum"]
    assert params == ["lbp-imaging-order-select", "lbp-imaging-order-sign"]


def test_a_traceback_is_a_json_field_not_plain_text(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("INFO", json=True)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    lines = [line for line in stream.getvalue().splitlines() if line]
    assert len(lines) == 1
    entry: dict[str, Any] = json.loads(lines[0])
    assert entry["error"] == "ValueError"
    assert "Traceback (most recent call last)" in entry["traceback"]
    assert entry["logger"] == "uvicorn.error"
