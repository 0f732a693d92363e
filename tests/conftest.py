"""Shared test set-up: settings, a test clock, and clients that validate every response."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from cds_service import native
from cds_service.app import create_app
from cds_service.settings import Settings
from tests.cds_validator import (
    assert_valid,
    validate_discovery,
    validate_operation_outcome,
    validate_service_response,
)
from tests.smart_server import SmartTestServer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
SELECT = "/cds-services/lbp-imaging-order-select"
SIGN = "/cds-services/lbp-imaging-order-sign"


# The test clock: the anchor every fixture date is relative to (fixtures/expected.json "now").
FIXTURE_NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)


def check_response(response: httpx.Response) -> None:
    """Validate a CDS Hooks answer by the spec's rules (run on every response in the suite)."""
    path = response.request.url.path
    if not path.startswith("/cds-services") or response.request.method == "OPTIONS":
        return
    body: Any = response.json() if response.content else None
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/fhir+json")
        assert_valid(validate_operation_outcome(body))
    elif path == "/cds-services":
        assert_valid(validate_discovery(body))
    elif path.endswith("/feedback"):
        assert isinstance(body, dict)
    else:
        assert_valid(validate_service_response(body))


class ValidatingClient(TestClient):
    """A TestClient that checks every CDS Hooks response it receives."""

    def request(self, *args: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        response = super().request(*args, **kwargs)
        check_response(response)
        return response


TEST_DATA = Path(tempfile.mkdtemp(prefix="cds-test-"))


def dev_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"env": "development", "log_json": True, "data_dir": TEST_DATA}
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
def settings() -> Settings:
    return dev_settings()


@pytest.fixture
def client(settings: Settings) -> Iterator[ValidatingClient]:
    app = create_app(settings, clock=lambda: FIXTURE_NOW)
    with ValidatingClient(app) as c:
        yield c


# The SMART apps' test EHR (tests/smart_server.py): one per module, reset for each test.
@pytest.fixture(scope="module")
def ehr_server() -> Iterator[SmartTestServer]:
    with SmartTestServer(datetime.now(UTC)) as server:
        yield server


@pytest.fixture
def ehr(ehr_server: SmartTestServer) -> Iterator[SmartTestServer]:
    ehr_server.reset()
    yield ehr_server
    ehr_server.release.set()


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `sources` patch classes and functions of the clinical core to count calls,
    which compiled (mypyc) modules do not allow: with them loaded these tests are skipped here
    and `make test` runs them again on the sources (CDS_NATIVE=0 pytest -m sources)."""
    if not native.STATE.startswith("compiled"):
        return
    skip = pytest.mark.skip(reason="needs the sources: make test runs it with CDS_NATIVE=0")
    for item in items:
        if item.get_closest_marker("sources"):
            item.add_marker(skip)
