"""A small FHIR R4 server on loopback for the sandbox end-to-end tests.

It serves what the CDS Hooks sandbox asks for (``/metadata``, ``Patient/{id}``, the prefetch
searches as ``POST {Type}/_search`` with form-encoded parameters) and what the service fetches
itself (``GET {Type}?patient={id}``), with CORS headers so that a page on another origin may
call it. ``fail`` makes chosen queries answer 500 (the "failing FHIR query" scenario).

The sandbox runs a prefetch query as ``POST {Type}/_search`` and, when that fails, again as
``GET {Type}?...``; only when both fail does it leave the key out of ``prefetch``. The service
fetches with ``GET {Type}?patient=``.

It also plays the EHR a card's SMART link opens through (:class:`SandboxEhr`): the sandbox POSTs
``_services/smart/Launch`` (the link's ``appContext``, the patient and its own origin as
``smart_messaging_origin``) and opens the app with the ``launch`` id it answers; the app then
finds the SMART configuration, is authorised at once (no login), and its token carries the
patient, the ``appContext``, ``smart_web_messaging_origin`` and an id_token signed with the test
key (``fhirUser``: a practitioner). ``GET ServiceRequest/{id}`` reads ``orders`` (the sandbox's
draft is not there: unsigned orders are not on the FHIR server); the QuestionnaireResponses the
app saves are kept and searched. A failure can hence be limited to the browser's requests
(they carry an ``Origin`` header: the page is on another origin), so that the service's own
fetch of the same query succeeds.

Run alone, it serves the seed patient for a manual session with the local sandbox
(docs/sandbox.md): ``.venv/bin/python -m tests.e2e.fhir_server --port 8081``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import jwt

from tests.loopback import LoopbackServer
from tests.smart_server import JWKS, KEY

# Search types and the prefetch keys of the service's discovery document they fill.
TYPES = {"Condition": "conditions", "Procedure": "procedures",
         "ServiceRequest": "servicerequests", "MedicationRequest": "medications"}
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


SEED_PATIENT = "seed"


def shift_dates(value: Any, days: int) -> Any:
    """``value`` with every ``YYYY-MM-DD`` string moved by ``days`` (a fixture made for one
    "now" stays the same clinical story on another day)."""
    if isinstance(value, dict):
        return {k: shift_dates(v, days) for k, v in value.items()}
    if isinstance(value, list):
        return [shift_dates(v, days) for v in value]
    if isinstance(value, str) and DATE.match(value):
        return (date.fromisoformat(value) + timedelta(days=days)).isoformat()
    return value


@dataclass(frozen=True)
class Seen:
    """One request the server received."""

    method: str
    path: str  # without the base path: "Procedure/_search", "Patient/seed", "metadata"
    params: dict[str, list[str]]
    authorization: str | None
    origin: str | None  # set on the browser's (cross-origin) requests
    status: int


CAPABILITY: dict[str, Any] = {
    "resourceType": "CapabilityStatement", "status": "active", "date": "2026-01-01",
    "kind": "instance", "fhirVersion": "4.0.1", "format": ["application/fhir+json"],
    "rest": [{"mode": "server", "resource": [
        {"type": t, "interaction": [{"code": "read"}, {"code": "search-type"}],
         "searchParam": [{"name": "patient", "type": "reference"}]}
        for t in ("Patient", *TYPES)]}],
}
CORS = {"Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": "Accept, Authorization, Content-Type",
        "Access-Control-Max-Age": "600"}


def not_found(what: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "not-found", "diagnostics": what}]}


class SandboxFhirServer(LoopbackServer):
    """Serves patients from prefetch-shaped dicts (``patient``, ``conditions``, ...).

    ``fail`` holds ``(Type, who)`` pairs whose searches answer 500: ``who`` is ``"browser"``
    (requests with an ``Origin`` header: the sandbox's POST and its GET fallback) or ``"all"``.
    ``("Procedure", "browser")`` fails the sandbox's Procedure query but not the service's.
    """

    def __init__(self, port: int = 0) -> None:
        self.data: dict[str, dict[str, Any]] = {}  # patient id -> prefetch-like dict
        self.fail: set[tuple[str, str]] = set()  # (Type, "browser" or "all")
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_OPTIONS(self) -> None:  # noqa: N802 - http.server API (CORS preflight)
                self.send_response(204)
                for name, value in CORS.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                self.reply("GET", parse_qs(urlsplit(self.path).query))

            def failing(self, rtype: str) -> bool:
                who = "browser" if self.headers.get("Origin") else "other"
                return bool({(rtype, "all"), (rtype, who)} & server.fail)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = self.rfile.read(length).decode("utf-8", "replace") if length else ""
                params = parse_qs(urlsplit(self.path).query)
                if "json" not in (self.headers.get("Content-Type") or ""):
                    for key, values in parse_qs(form).items():
                        params.setdefault(key, []).extend(values)
                self.reply("POST", params, form)

            def reply(self, method: str, params: dict[str, list[str]], raw: str = "") -> None:
                path = unquote(urlsplit(self.path).path)
                extra: dict[str, str] = {}
                played = server.ehr.answer(method, path, params, raw)
                if played is not None:
                    status, body, extra = played
                else:
                    status, body = server.answer(method, path, params, self.failing)
                with server.lock:
                    server.seen.append(Seen(method, path.removeprefix("/fhir/"), params,
                                            self.headers.get("Authorization"),
                                            self.headers.get("Origin"), status))
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                if "Content-Type" not in extra:
                    self.send_header("Content-Type", "application/fhir+json; charset=utf-8")
                self.send_header("Content-Length", str(len(raw)))
                for name, value in {**CORS, **extra}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self._serve(self.httpd)
        self.origin = f"http://127.0.0.1:{self.port}"
        self.base = f"{self.origin}/fhir"
        self.ehr = SandboxEhr(self.origin, self.base)

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if (method is None or s.method == method)
                    and (path is None or s.path == path)]

    def answer(self, method: str, path: str, params: dict[str, list[str]],
               failing: Callable[[str], bool]) -> tuple[int, dict[str, Any]]:
        segments = [s for s in path.split("/") if s]
        if segments[:1] != ["fhir"]:
            return 404, not_found(path)
        segments = segments[1:]
        if segments == ["metadata"] and method == "GET":
            return 200, CAPABILITY
        if segments == ["Patient"] and method == "GET":  # the sandbox lists patients
            patients = [d["patient"] for d in self.data.values() if d.get("patient")]
            return 200, {"resourceType": "Bundle", "type": "searchset", "total": len(patients),
                         "entry": [{"resource": p} for p in patients]}
        if len(segments) == 2 and segments[0] == "Patient" and method == "GET":
            patient = self.data.get(segments[1], {}).get("patient")
            return (200, patient) if patient else (404, not_found(path))
        search = (len(segments) == 1 and method == "GET") or (
            len(segments) == 2 and segments[1] == "_search")
        if search and segments[0] in TYPES:
            rtype = segments[0]
            if failing(rtype):
                return 500, {"resourceType": "OperationOutcome", "issue": [
                    {"severity": "error", "code": "exception",
                     "diagnostics": "the test made this query fail"}]}
            pid = (params.get("patient") or [""])[0].removeprefix("Patient/")
            source = self.data.get(pid, {}).get(TYPES[rtype]) or {}
            entries = source.get("entry", []) if isinstance(source, dict) else []
            return 200, {"resourceType": "Bundle", "type": "searchset",
                         "total": len(entries), "entry": entries}
        return 404, not_found(path)


PRACTITIONER = "Practitioner/dr-sandbox"
CLIENT_ID = "cds-lbp-imaging"


class SandboxEhr:
    """The EHR side of the FHIR server: the SMART launch the sandbox asks for, a SMART
    authorisation server that approves at once, orders by id, and the answers saved."""

    def __init__(self, origin: str, base: str) -> None:
        self.origin, self.base = origin, base
        self.lock = threading.Lock()
        self.orders: dict[str, dict[str, Any]] = {}
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.launches: dict[str, dict[str, Any]] = {}  # launch id -> its parameters
            self.codes: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
            self.responses: list[dict[str, Any]] = []  # QuestionnaireResponses saved
            self.launch_requests: list[dict[str, Any]] = []

    def answer(self, method: str, path: str, params: dict[str, list[str]],
               raw: str) -> tuple[int, Any, dict[str, str]] | None:
        query = {k: v[0] for k, v in params.items()}
        if method == "POST" and path == "/fhir/_services/smart/Launch":
            return self.launch(json.loads(raw or "{}"))
        if method == "GET" and path == "/fhir/.well-known/smart-configuration":
            return 200, {"issuer": self.base, "jwks_uri": f"{self.origin}/auth/jwks",
                         "authorization_endpoint": f"{self.origin}/auth/authorize",
                         "token_endpoint": f"{self.origin}/auth/token",
                         "code_challenge_methods_supported": ["S256"],
                         "capabilities": ["launch-ehr", "context-ehr-patient"]}, {}
        if method == "GET" and path == "/auth/jwks":
            return 200, JWKS, {}
        if method == "GET" and path == "/ehr":  # the EHR's page, the app in a side panel
            src = query.get("app", "").replace('"', "%22")
            return 200, (f'<!doctype html><title>EHR</title><h1>EHR</h1><iframe id="panel" '
                         f'src="{src}" width="900" height="900"></iframe>').encode(), {
                "Content-Type": "text/html; charset=utf-8"}
        if method == "GET" and path == "/auth/authorize":
            return self.authorize(query)
        if method == "POST" and path == "/auth/token":
            return self.token(query)
        segments = path.strip("/").split("/")
        if method == "GET" and len(segments) == 3 and segments[1] == "ServiceRequest":
            found = self.orders.get(segments[2])
            return (200, found, {}) if found else (404, not_found(path), {})
        if segments == ["fhir", "QuestionnaireResponse"]:
            if method == "POST":
                with self.lock:
                    resource = {**json.loads(raw), "id": f"qr-{len(self.responses) + 1}"}
                    self.responses.append(resource)
                return 201, {}, {}
            with self.lock:
                found = [r for r in self.responses if r["subject"]["reference"]
                         == f"Patient/{query.get('patient', '').removeprefix('Patient/')}"]
            return 200, {"resourceType": "Bundle", "type": "searchset", "total": len(found),
                         "entry": [{"resource": r} for r in found]}, {}
        return None

    def launch(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        launch_id = secrets.token_urlsafe(8)
        with self.lock:
            self.launch_requests.append(body)
            self.launches[launch_id] = dict(body.get("parameters") or {})
        return 200, {"launch_id": launch_id}, {}

    def authorize(self, query: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            context = self.launches.get(query.get("launch", ""))
        if (context is None or query.get("aud") != self.base
                or query.get("code_challenge_method") != "S256"):
            return 400, {"error": "invalid_request"}, {}
        code = secrets.token_urlsafe(12)
        with self.lock:
            self.codes[code] = (context, query)
        back = urlencode({"code": code, "state": query["state"]})
        return 302, {}, {"Location": f"{query['redirect_uri']}?{back}"}

    def token(self, form: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            context, asked = self.codes.pop(form.get("code", ""), ({}, {}))
        digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
        challenge = base64.urlsafe_b64encode(digest).decode().rstrip("=")
        if not asked or challenge != asked.get("code_challenge") \
                or form.get("redirect_uri") != asked.get("redirect_uri"):
            return 400, {"error": "invalid_grant"}, {}
        now = int(time.time())
        id_token = jwt.encode({"iss": self.base, "aud": form.get("client_id"), "sub": "dr",
                               "fhirUser": PRACTITIONER, "iat": now, "exp": now + 600},
                              KEY, algorithm="RS256", headers={"kid": "test-1"})
        body: dict[str, Any] = {"access_token": secrets.token_urlsafe(16),
                                "token_type": "Bearer", "expires_in": 600,
                                "scope": asked.get("scope", ""), "id_token": id_token,
                                "patient": context.get("patient")}
        if context.get("appContext") is not None:
            body["appContext"] = context["appContext"]
        if context.get("smart_messaging_origin"):
            body["smart_web_messaging_origin"] = context["smart_messaging_origin"]
        return 200, body, {}


def seed_patient() -> dict[str, Any]:
    """The seed patient's prefetch (fixtures/requests/v3-seed-mri-w.json: 58 years old, chronic
    radicular low back pain, 8 weeks of physical therapy), its dates moved to today: the service
    rates with the real clock, so the story stays true on any day. With a name for the banner."""
    from tests.conftest import FIXTURE_NOW, FIXTURES

    request = json.loads((FIXTURES / "requests" / "v3-seed-mri-w.json").read_text())
    days = (datetime.now(UTC).date() - FIXTURE_NOW.date()).days
    data: dict[str, Any] = shift_dates(request["prefetch"], days)
    data["patient"]["name"] = [{"use": "official", "given": ["Sam"], "family": "Seed"}]
    assert data["patient"]["id"] == SEED_PATIENT
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the seed patient as a FHIR R4 server "
                                     "on loopback, for the local CDS Hooks sandbox.")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    server = SandboxFhirServer(args.port)
    server.data[SEED_PATIENT] = seed_patient()
    print(f"FHIR base {server.base} (patient {SEED_PATIENT!r}); Ctrl-C stops", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
