"""A small FHIR server on loopback that serves a patient's resources, paginated, for tests."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TYPES = {"Condition": "conditions", "Procedure": "procedures",
         "ServiceRequest": "servicerequests", "MedicationRequest": "medications"}


class FhirTestServer:
    """Serves ``Patient/{id}`` and ``{Type}?patient={id}`` from prefetch-shaped data."""

    def __init__(self, page_size: int = 2):
        self.page_size = page_size
        self.data: dict[str, dict[str, Any]] = {}  # patient id -> prefetch-like dict
        self.requests: list[tuple[str, str | None]] = []  # (path?query, authorization)
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
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FhirTestServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(path)
        segments = parts.path.strip("/").split("/")
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
            if page * self.page_size < len(entries):
                body["link"] = [{"relation": "next", "url":
                                 f"{self.base}/{segments[1]}?patient={pid}&page={page + 1}"}]
            return 200, body
        return 404, {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "not-found"}]}
