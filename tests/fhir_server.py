"""Servers on loopback for tests: a small FHIR server that serves a patient's resources,
paginated, and a scripted one whose answers are written byte by byte (trickles, endless bodies).
"""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.loopback import LoopbackServer

TYPES = {"Condition": "conditions", "Procedure": "procedures",
         "ServiceRequest": "servicerequests", "MedicationRequest": "medications"}


class FhirTestServer(LoopbackServer):
    """Serves ``Patient/{id}`` and ``{Type}?patient={id}`` from prefetch-shaped data."""

    def __init__(self, page_size: int = 2):
        self.page_size = page_size
        self.data: dict[str, dict[str, Any]] = {}  # patient id -> prefetch-like dict
        self.requests: list[tuple[str, str | None]] = []  # (path?query, authorization)
        self.next_links: dict[str, str] = {}  # resource type -> the next link of its first page
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                server.requests.append((self.path, self.headers.get("Authorization")))
                status, body = server.answer(self.path)
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
            chunk = entries[(page - 1) * self.page_size: page * self.page_size]
            body: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                                    "total": len(entries), "entry": chunk}
            if page == 1 and segments[1] in self.next_links:
                body["link"] = [{"relation": "next", "url": self.next_links[segments[1]]}]
            elif page * self.page_size < len(entries):
                body["link"] = [{"relation": "next", "url":
                                 f"{self.base}/{segments[1]}?patient={pid}&page={page + 1}"}]
            return 200, body
        return 404, {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "not-found"}]}


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

        self.tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.tcp.daemon_threads = True
        self._serve(self.tcp)
        self.base = f"http://127.0.0.1:{self.port}/fhir"

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        super().__exit__(*exc)
