"""The outer layer (cds_service.api.middleware.Edge), which serves the hook call itself: the hook
call's answers keep every header, count and error the framework's stack gave them, over a real
socket where it matters."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from cds_service.app import create_app
from tests.builders import hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient, dev_settings
from tests.served import served as serve

SANDBOX = "https://sandbox.cds-hooks.org"
HOOK_ROUTE = "/cds-services/{service_id}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("edge"), CDS_CORS_ORIGINS=SANDBOX,
               CDS_MAX_BODY_BYTES="200000") as base:
        yield base


def seed_call(now: datetime | None = None) -> dict[str, Any]:
    """The seed chart (scenario V3) with a contrast MRI drafted; dated from the real clock (the
    served process has one) unless told."""
    return hook_request(order(cpt="72149"), prefetch=seed_prefetch(now or datetime.now(UTC)))


def requests_counted(text: str, route: str, status: str) -> float:
    """cds_http_requests_total for one route template and status, from /metrics."""
    for line in text.splitlines():
        if (line.startswith("cds_http_requests_total{") and f'route="{route}"' in line
                and f'status="{status}"' in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_hook_call_from_an_allowed_origin_carries_the_cors_headers(served: str) -> None:
    r = httpx.post(served + SELECT, json=seed_call(), headers={"Origin": SANDBOX}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == SANDBOX
    assert "Origin" in r.headers["vary"]
    assert r.json()["cards"], "the seed's contrast MRI gets its card"


def test_a_hook_call_from_another_origin_gets_no_cors_grant(served: str) -> None:
    r = httpx.post(served + SELECT, json=seed_call(),
                   headers={"Origin": "https://elsewhere.example"}, timeout=30)
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers


def test_hook_answers_are_counted_by_route_template_and_status(served: str) -> None:
    before = httpx.get(served + "/metrics", timeout=10).text
    assert httpx.post(served + SELECT, json=seed_call(), timeout=30).status_code == 200
    assert httpx.post(served + SELECT, content=b"{", timeout=30,
                      headers={"Content-Type": "application/json"}).status_code == 400
    assert httpx.post(served + "/cds-services/no-such-service", json=seed_call(),
                      timeout=30).status_code == 404
    after = httpx.get(served + "/metrics", timeout=10).text
    for status in ("200", "400", "404"):
        assert (requests_counted(after, HOOK_ROUTE, status)
                - requests_counted(before, HOOK_ROUTE, status)) == 1, status


def test_other_requests_are_still_counted_by_the_routers_template(served: str) -> None:
    before = httpx.get(served + "/metrics", timeout=10).text
    assert httpx.get(served + "/healthz", timeout=10).status_code == 200
    assert httpx.get(served + "/no-such-page", timeout=10).status_code == 404
    after = httpx.get(served + "/metrics", timeout=10).text
    for route, status in (("/healthz", "200"), ("unmatched", "404")):
        assert (requests_counted(after, route, status)
                - requests_counted(before, route, status)) == 1, route


def test_a_body_too_large_for_the_hook_is_413_before_and_while_it_is_read(served: str) -> None:
    big = b'{"hook": "order-select", "pad": "' + b"x" * 300_000 + b'"}'
    declared = httpx.post(served + SELECT, content=big, timeout=30,
                          headers={"Content-Type": "application/json"})

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 50_000):
            yield big[i:i + 50_000]

    streamed = httpx.post(served + SELECT, content=chunks(), timeout=30,
                          headers={"Content-Type": "application/json"})
    for r in (declared, streamed):
        assert r.status_code == 413
        body = r.json()
        assert body["resourceType"] == "OperationOutcome"
        assert body["issue"][0]["code"] == "too-long"
        assert "larger than 200000 bytes" in body["issue"][0]["diagnostics"]


def test_other_methods_on_the_hook_path_still_get_the_routers_405(served: str) -> None:
    r = httpx.get(served + SELECT, timeout=10)
    assert r.status_code == 405
    assert r.json()["resourceType"] == "OperationOutcome"


class _Failing:
    """The engine, except that finding the imaging orders fails (a defect, not bad input)."""

    def __init__(self, engine: Any):
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def imaging_targets(self, call: Any) -> Any:
        raise RuntimeError("defect")


def test_an_unexpected_error_in_the_hook_is_a_500_outcome_with_cors_and_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(dev_settings(data_dir=tmp_path, cors_origins=SANDBOX),
                     clock=lambda: FIXTURE_NOW)
    services = app.state.services
    object.__setattr__(services, "engine", _Failing(services.engine))
    with ValidatingClient(app, raise_server_exceptions=False) as c:
        r = c.post(SELECT, json=seed_call(FIXTURE_NOW), headers={"Origin": SANDBOX})
        assert r.status_code == 500
        body = r.json()
        assert body["resourceType"] == "OperationOutcome"
        assert body["issue"][0] == {"severity": "error", "code": "exception",
                                    "diagnostics": "internal error"}
        assert "defect" not in r.text and "Traceback" not in r.text
        assert r.headers["access-control-allow-origin"] == SANDBOX  # (the 500 had none before)
        assert requests_counted(c.get("/metrics").text, HOOK_ROUTE, "500") == 1
    logged = [rec for rec in caplog.records if rec.getMessage() == "unexpected error"]
    assert logged and logged[0].__dict__["error"] == "RuntimeError"
