"""The tests' own SMART authorisation server and FHIR server, on one loopback port.

    GET  {base}/.well-known/smart-configuration   the SMART configuration (PKCE S256, jwks_uri)
    GET  /auth/jwks             the keys that sign its id_tokens (RS256)
    GET  /auth/authorize?...   auto-approves: 302 to redirect_uri with code and state
    POST /auth/token            checks the grant, redirect_uri, client_id and that
                                SHA-256(code_verifier) is the challenge; answers the token,
                                scope, patient, encounter, appContext or fhirContext, and an
                                id_token signed with its key (or fails as told)
    GET  {base}/Patient/{id}, {base}/{Type}?patient={id}   the patient's resources
    GET  {base}/ServiceRequest/{id}                        an order
    POST {base}/QuestionnaireResponse                      stored, 201 (or refused as told)

``{base}`` is ``http://127.0.0.1:{port}/fhir``. FHIR calls need the issued bearer token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from copy import deepcopy
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.builders import PATIENT, bundle, order, seed_prefetch
from tests.loopback import LoopbackServer

CLIENT_ID = "cds-lbp-imaging"
LAUNCH = "launch-7f3a"
TYPES = {"Condition": "conditions", "Procedure": "procedures",
         "ServiceRequest": "servicerequests", "MedicationRequest": "medications"}
ORDER_ID = "draft-mri-1"
# The clinical picture: the seed patient (chronic radicular low back pain, 16 weeks) with an
# epidural injection planned (an intervention candidate) and no conservative care on record: the
# record cannot tell V2 from V3, so an MRI without contrast is not rated until someone says
# whether conservative care was tried, and for how long.
ASK = ["conservative-care", "conservative-care-weeks"]


def chart(now: datetime) -> dict[str, Any]:
    """The seed patient's record, as searches answer it (prefetch-shaped)."""
    data = seed_prefetch(now)
    data["patient"]["name"] = [{"given": ["Alex"], "family": "Seed"}]
    data["procedures"] = bundle()
    injection = {"resourceType": "ServiceRequest", "id": "sr-esi", "status": "active",
                 "intent": "order", "authoredOn": now.date().isoformat(),
                 "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt",
                                      "code": "62323"}]},
                 "subject": {"reference": f"Patient/{PATIENT}"}}
    data["servicerequests"] = bundle(injection)
    return data


def challenge_of(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


PRACTITIONER = "Practitioner/dr-1"  # the clinician signed in


ENCOUNTER = "enc-1"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWKS = {"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key())),
                  "kid": "test-1", "use": "sig", "alg": "RS256"}]}


def unsigned_token(claims: dict[str, Any]) -> str:
    """An unsigned (alg none) JWT carrying these claims: never to be believed."""
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")
    return f"{part({'alg': 'none'})}.{part(claims)}."


class SmartTestServer(LoopbackServer):
    """A SMART EHR on loopback; the test sets what it grants and how it fails."""

    def __init__(self, now: datetime):
        self.lock = threading.Lock()
        self.data = chart(now)
        self.orders = {ORDER_ID: order(ORDER_ID, cpt="72148")}
        self.reset()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                self._answer(server.get(self.path, self.headers.get("Authorization")))

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(server.post(self.path, raw, dict(self.headers.items())))

            def _answer(self, answer: tuple[int, Any, dict[str, str]]) -> None:
                status, body, headers = answer
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self._serve(self.httpd)
        self.origin = f"http://127.0.0.1:{self.port}"
        self.base = f"{self.origin}/fhir"

    def reset(self) -> None:
        """What it grants and how it fails, back to a plain success."""
        with self.lock:
            self.scope = ("launch openid fhirUser patient/Patient.rs patient/Condition.rs "
                          "patient/Procedure.rs patient/ServiceRequest.rs "
                          "patient/MedicationRequest.rs patient/QuestionnaireResponse.crs")
            self.app_context: Any = json.dumps({"order": f"ServiceRequest/{ORDER_ID}",
                                                "procedure": "mri-wo", "ask": ASK})
            self.token_mode = "ok"  # or: http-400, no-access-token, bad-json, slow
            self.user: str | None = PRACTITIONER  # the id_token's fhirUser (None: no id_token)
            self.id_token_mode = "signed"  # or: unsigned, wrong-aud, wrong-key, expired
            self.fhir_context: list[dict[str, str]] | None = None  # SMART 2.1 fhirContext
            self.messaging_origin: str | None = None  # smart_web_messaging_origin
            self.list_orders = False  # the ServiceRequest search also lists ``orders``
            self.failing: set[str] = set()  # types whose reads and searches answer 500
            # ("order": the read of an order only)
            self.write_status = 201  # the answer to POST QuestionnaireResponse
            self.refused_searches: set[str] = set()  # resource types whose search answers 403
            self.authorize_error: str | None = None  # e.g. access_denied
            self.smart_config_extra: dict[str, Any] = {}
            self.config_requests = 0  # reads of the SMART configuration
            self.padded_pages = 0  # bytes of padding on each page of a search (0: none)
            self.pages_served = 0  # padded pages answered
            self.codes: dict[str, dict[str, str]] = {}
            self.tokens: set[str] = set()
            self.authorize_requests: list[dict[str, str]] = []
            self.token_requests: list[dict[str, str]] = []
            self.fhir_requests: list[tuple[str, str, str | None]] = []  # method, path, auth
            self.responses: list[dict[str, Any]] = []  # QuestionnaireResponses stored
            self.release = threading.Event()

    # ------------------------------------------------------------------ SMART

    def smart_configuration(self) -> dict[str, Any]:
        return {"issuer": self.base, "authorization_endpoint": f"{self.origin}/auth/authorize",
                "token_endpoint": f"{self.origin}/auth/token",
                "code_challenge_methods_supported": ["S256"],
                "jwks_uri": f"{self.origin}/auth/jwks",
                "capabilities": ["launch-ehr", "context-ehr-patient", "client-public"],
                **self.smart_config_extra}

    def authorize(self, query: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        self.authorize_requests.append(query)
        wanted = {"response_type": "code", "client_id": CLIENT_ID, "aud": self.base,
                  "launch": LAUNCH, "code_challenge_method": "S256"}
        if any(query.get(k) != v for k, v in wanted.items()) or not query.get("state") \
                or not query.get("code_challenge") or not query.get("redirect_uri"):
            return 400, {"error": "invalid_request"}, {}
        back = {"state": query["state"]}
        if self.authorize_error:
            back["error"] = self.authorize_error
        else:
            code = secrets.token_urlsafe(16)
            self.codes[code] = query
            back["code"] = code
        return 302, b"", {"Location": f"{query['redirect_uri']}?{urlencode(back)}"}

    def token(self, form: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        self.token_requests.append(form)
        asked = self.codes.pop(form.get("code", ""), None)
        if (asked is None or form.get("grant_type") != "authorization_code"
                or form.get("redirect_uri") != asked["redirect_uri"]
                or form.get("client_id") != CLIENT_ID
                or challenge_of(form.get("code_verifier", "")) != asked["code_challenge"]):
            return 400, {"error": "invalid_grant"}, {}
        mode = self.token_mode
        if mode == "http-400":
            return 400, {"error": "invalid_grant"}, {}
        if mode == "bad-json":
            return 200, b"{not json", {}
        if mode == "slow":
            self.release.wait(10)
        token = secrets.token_urlsafe(24)
        self.tokens.add(token)
        body = {"access_token": token, "token_type": "Bearer", "expires_in": 3600,
                "scope": self.scope, "patient": PATIENT, "encounter": ENCOUNTER}
        if self.app_context is not None:
            body["appContext"] = self.app_context
        if self.fhir_context is not None:
            body["fhirContext"] = self.fhir_context
        if self.messaging_origin is not None:
            body["smart_web_messaging_origin"] = self.messaging_origin
            body["smart_web_messaging_handle"] = "handle-1"
        if self.user is not None:
            body["id_token"] = self.id_token(form.get("client_id", ""))
        if mode == "no-access-token":
            del body["access_token"]
        return 200, body, {"Cache-Control": "no-store"}

    def id_token(self, client_id: str) -> str:
        mode = self.id_token_mode
        claims = {"iss": self.base, "sub": "u1", "fhirUser": self.user,
                  "aud": "someone-else" if mode == "wrong-aud" else client_id,
                  "exp": int(time.time()) + (-3600 if mode == "expired" else 3600),
                  "iat": int(time.time())}
        if mode == "unsigned":
            return unsigned_token(claims)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048) \
            if mode == "wrong-key" else KEY
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "test-1"})

    # ------------------------------------------------------------------ HTTP

    def get(self, path: str, authorization: str | None) -> tuple[int, Any, dict[str, str]]:
        parts = urlsplit(path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/fhir/.well-known/smart-configuration":
            with self.lock:
                self.config_requests += 1
            return 200, self.smart_configuration(), {}
        if parts.path == "/auth/authorize":
            return self.authorize(query)
        if parts.path == "/auth/jwks":
            return 200, JWKS, {}
        with self.lock:
            self.fhir_requests.append(("GET", path, authorization))
        if not self._authorised(authorization):
            return 401, outcome("login"), FHIR
        return self.fhir_read(parts.path.removeprefix("/fhir/").split("/"), query)

    def post(self, path: str, raw: bytes,
             headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        if path == "/auth/token":
            form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
            return self.token(form)
        authorization = headers.get("Authorization")
        with self.lock:
            self.fhir_requests.append(("POST", path, authorization))
        if path != "/fhir/QuestionnaireResponse":
            return 404, outcome("not-found"), FHIR
        if not self._authorised(authorization):
            return 401, outcome("login"), FHIR
        if self.write_status != 201:
            return self.write_status, outcome("forbidden"), FHIR
        resource = json.loads(raw)
        resource["id"] = f"qr-{len(self.responses) + 1}"
        self.responses.append(resource)
        return 201, b"", {"Location": f"{self.base}/QuestionnaireResponse/{resource['id']}/"
                                      "_history/1"}

    def _authorised(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        return scheme == "Bearer" and token in self.tokens

    def fhir_read(self, segments: list[str],
                  query: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        read_order = len(segments) == 2 and segments[0] == "ServiceRequest"
        if ("order" if read_order else segments[0]) in self.failing:
            return 500, outcome("exception"), FHIR
        if segments == ["Patient", PATIENT]:
            return 200, self.data["patient"], FHIR
        if len(segments) == 2 and segments[0] == "ServiceRequest" and segments[1] in self.orders:
            return 200, self.orders[segments[1]], FHIR
        if len(segments) == 1 and query.get("patient") == PATIENT:
            if segments[0] in self.refused_searches:
                return 403, outcome("forbidden"), FHIR
            if segments[0] == "QuestionnaireResponse":
                return 200, bundle(*deepcopy(self.responses)), FHIR
            if segments[0] == "AllergyIntolerance":
                return 200, self.data.get("allergies") or bundle(), FHIR
            if segments[0] == "ServiceRequest" and self.list_orders:
                found = self.data["servicerequests"]
                return 200, bundle(*[e["resource"] for e in found["entry"]],
                                   *self.orders.values()), FHIR
            if segments[0] in TYPES and self.padded_pages:
                return 200, self.padded_page(segments[0], query), FHIR
            if segments[0] in TYPES:
                return 200, self.data[TYPES[segments[0]]], FHIR
        return 404, outcome("not-found"), FHIR


    def padded_page(self, rtype: str, query: dict[str, str]) -> dict[str, Any]:
        """An empty searchset page of ``padded_pages`` bytes, with a next page, endlessly."""
        with self.lock:
            self.pages_served += 1
        page = int(query.get("page", "0")) + 1
        return {"resourceType": "Bundle", "type": "searchset", "entry": [],
                "meta": {"tag": [{"code": "x" * self.padded_pages}]},
                "link": [{"relation": "next",
                          "url": f"{self.base}/{rtype}?patient={PATIENT}&page={page}"}]}


FHIR = {"Content-Type": "application/fhir+json"}


def outcome(code: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code}]}
