"""The server process caps what it holds: connections that never finish their headers (uvicorn
has no header timeout; the proxy in front cuts them, docs/deploying.md) fill at most
CDS_LIMIT_CONCURRENCY places, and past it a request is answered 503 at once, not left waiting."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.served import served


def test_past_the_concurrency_cap_a_request_is_answered_503(tmp_path: Path) -> None:
    with served(tmp_path, CDS_LIMIT_CONCURRENCY="4") as base:
        address = urlsplit(base)
        stalled = []
        try:
            for _ in range(4):  # headers begun, never finished
                s = socket.create_connection((address.hostname, address.port), timeout=5)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                stalled.append(s)
            with httpx.Client(timeout=10) as client:
                refused = client.get(base + "/healthz")
            assert refused.status_code == 503
        finally:
            for s in stalled:
                s.close()
        with httpx.Client(timeout=10) as client:  # the held connections gone: served again
            for _ in range(50):
                if client.get(base + "/healthz").status_code == 200:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("not served again once the connections closed")
