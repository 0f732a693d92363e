"""The real server over a real socket: `cds-service serve`, as `make run` starts it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.builders import hook_request, order, seed_prefetch
from tests.conftest import ROOT, SELECT, check_response

TOKEN = "secret-access-token-4f2a9c"  # noqa: S105 - a canary that must never be logged
PATIENT_ID = "pt-seed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "CDS_ENV": "development", "CDS_LOG_LEVEL": "DEBUG",
           "CDS_DATA_DIR": str(log.parent / "data")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cds_service", "serve", "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            proc.kill()
            pytest.fail("server did not start: " + log.read_text())
        yield base, log
        proc.terminate()
        proc.wait(timeout=10)


def client(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=10,
                        event_hooks={"response": [lambda r: (r.read(), check_response(r))]})


def test_discovery_over_socket(server: tuple[str, Path]) -> None:
    base, _ = server
    with client(base) as c:
        r = c.get("/cds-services")
        assert r.status_code == 200
        assert len(r.json()["services"]) == 2


def test_readme_curl_example(server: tuple[str, Path]) -> None:
    """The README's example file, posted as the README shows, with the real clock."""
    base, _ = server
    body = (ROOT / "fixtures" / "requests" / "v3-seed-mri-w.json").read_bytes()
    with client(base) as c:
        r = c.post(SELECT, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    cards = r.json()["cards"]
    assert [card["indicator"] for card in cards] == ["warning"]
    action = cards[0]["suggestions"][0]["actions"][0]
    assert {"system": "http://www.ama-assn.org/go/cpt", "code": "72148",
            "display": "MRI lumbar spine without IV contrast"} in action["resource"]["code"][
        "coding"]


def test_no_token_or_phi_in_logs(server: tuple[str, Path]) -> None:
    base, log = server
    body = hook_request(order(cpt="72149"), prefetch=seed_prefetch(datetime.now(UTC)))
    body["fhirServer"] = "https://ehr.example.org/fhir"
    body["fhirAuthorization"] = {"access_token": TOKEN, "token_type": "Bearer",
                                 "expires_in": 300, "scope": "patient/*.read",
                                 "subject": "cds-service"}
    with client(base) as c:
        r = c.post(SELECT, json=body, headers={"Authorization": f"Bearer {TOKEN}.jwt"})
        assert r.status_code == 200
        bad = c.post(SELECT, content=b'{"context": {"patientId": "' + PATIENT_ID.encode()
                     + b'"}, "fhirAuthorization": {"access_token": "' + TOKEN.encode() + b'"}}',
                     headers={"Content-Type": "application/json"})
        assert bad.status_code == 400
        assert TOKEN not in bad.text
    time.sleep(0.3)
    text = log.read_text()
    assert "hook evaluated" in text  # the log is being written
    assert TOKEN not in text
    assert PATIENT_ID not in text
    assert "M54.16" not in text
