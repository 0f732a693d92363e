"""Servers on loopback for tests: a small FHIR server that serves a patient's resources,
paginated (optionally slow, and honouring ``_count`` up to a maximum as HAPI does), and a scripted
one whose answers are written byte by byte (trickles, endless bodies).
"""

from __future__ import annotations

import json
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.loopback import LoopbackServer

TYPES = {"Condition": "conditions", "Procedure": "procedures",
         "ServiceRequest": "servicerequests", "MedicationRequest": "medications",
         "AllergyIntolerance": "allergies"}


@dataclass(frozen=True)
class Served:
    """One request as the server saw it: its path and query, and when it came and went
    (``time.monotonic()``)."""

    path: str
    started: float
    ended: float


def peak_overlap(served: list[Served]) -> int:
    """The most requests of ``served`` that were in the server at the same moment."""
    events = sorted([(s.started, 1) for s in served] + [(s.ended, -1) for s in served])
    peak = now = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start
        now += step
        peak = max(peak, now)
    return peak


class BacklogHTTPServer(ThreadingHTTPServer):
    """A listen backlog of 128, not socketserver's 5: six searches connecting at once must not
    have a SYN dropped (the client would resend it a second later, and that is no server's
    latency)."""

    request_queue_size = 128


class FhirTestServer(LoopbackServer):
    """Serves ``Patient/{id}`` and ``{Type}?patient={id}`` from prefetch-shaped data.

    Pages hold ``page_size`` entries; with ``max_count`` the server honours ``_count`` up to it
    (HAPI: pages of 20 unless asked, at most 200), else it ignores ``_count``. ``latency``
    seconds pass before each answer, as a real server's query and network take."""

    def __init__(self, page_size: int = 2, *, latency: float = 0.0,
                 max_count: int | None = None):
        self.page_size = page_size
        self.latency = latency
        self.max_count = max_count
        self.data: dict[str, dict[str, Any]] = {}  # patient id -> prefetch-like dict
        self.requests: list[tuple[str, str | None]] = []  # (path?query, authorization)
        self.served: list[Served] = []  # every answered request, with its times
        self.next_links: dict[str, str] = {}  # resource type -> the next link of its first page
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                started = time.monotonic()
                server.requests.append((self.path, self.headers.get("Authorization")))
                if server.latency:
                    time.sleep(server.latency)
                status, body = server.answer(self.path)
                raw = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (its time budget ran out)
                server.served.append(Served(self.path, started, time.monotonic()))

        self.httpd = BacklogHTTPServer(("127.0.0.1", 0), Handler)
        self._serve(self.httpd)
        self.base = f"http://127.0.0.1:{self.port}/fhir"

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(path)
        segments = [unquote(s) for s in parts.path.strip("/").split("/")]
        query = parse_qs(parts.query)
        if segments[:2] == ["fhir", "Patient"] and len(segments) == 3:
            patient = self.data.get(segments[2], {}).get("patient")
            if patient:
                return 200, patient
            return 404, {"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "not-found"}]}
        if len(segments) == 2 and segments[1] in TYPES and "patient" in query:
            pid = query["patient"][0]
            source = self.data.get(pid, {}).get(TYPES[segments[1]]) or {}
            entries = source.get("entry", []) if isinstance(source, dict) else []
            page = int(query.get("page", ["1"])[0])
            size, count = self.page_size, ""
            if self.max_count is not None and query.get("_count", [""])[0].isdigit():
                size = max(1, min(int(query["_count"][0]), self.max_count))
                count = f"&_count={size}"  # kept in the next links, as HAPI does
            chunk = entries[(page - 1) * size: page * size]
            body: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                                    "total": len(entries), "entry": chunk}
            if page == 1 and segments[1] in self.next_links:
                body["link"] = [{"relation": "next", "url": self.next_links[segments[1]]}]
            elif page * size < len(entries):
                body["link"] = [{"relation": "next", "url": f"{self.base}/{segments[1]}"
                                 f"?patient={pid}&page={page + 1}{count}"}]
            return 200, body
        return 404, {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "not-found"}]}


class BacklogTCPServer(socketserver.ThreadingTCPServer):
    """A listen backlog of 128 (seven searches connect at once; see BacklogHTTPServer)."""

    request_queue_size = 128


class ScriptedServer(LoopbackServer):
    """An HTTP/1.1 server on loopback whose every answer is written by ``script(server, send)``.

    ``send`` writes raw bytes at once (and counts them in ``sent``); ``server.stop`` is set when
    the server closes, so a script that waits should wait on it. One answer per connection.
    """

    def __init__(self, script: Callable[[ScriptedServer, Callable[[bytes], None]], None]):
        self.requests: list[tuple[str, str | None]] = []  # (path?query, authorization)
        self.headers: list[dict[str, str]] = []  # of each request, names in lower case
        self.sent = 0
        self.stop = threading.Event()
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(65537).decode("latin-1").split(" ")
                headers: dict[str, str] = {}
                while (header := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                server.headers.append(headers)
                server.requests.append((line[1] if len(line) > 1 else "",
                                        headers.get("authorization")))

                def send(data: bytes) -> None:
                    self.wfile.write(data)
                    server.sent += len(data)

                try:
                    script(server, send)
                except OSError:  # the client went away: what a script is often waiting for
                    pass

        self.tcp = BacklogTCPServer(("127.0.0.1", 0), Handler)
        self.tcp.daemon_threads = True
        self._serve(self.tcp)
        self.base = f"http://127.0.0.1:{self.port}/fhir"

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        super().__exit__(*exc)
