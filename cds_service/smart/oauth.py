"""SMART App Launch 2.x, EHR launch: discovery, the authorisation request (PKCE S256, state)
and the exchange of the code for a token. Every failure is a :class:`Problem` (a page)."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import orjson

from cds_service import lengths
from cds_service.record.fetch import normalize_base
from cds_service.scopes import can_create
from cds_service.smart.outbound import Outbound, Reply
from cds_service.smart.problems import Problem, ehr_down, unusable_configuration

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
ERROR_CODE = re.compile(r"[\x20-\x7e]{1,80}")  # an OAuth error code as it may be shown
# The signed-in user, as the id_token's fhirUser claim names a practitioner (relative or absolute).
FHIR_USER = re.compile(r"(?:https?://[^\s]{1,400}/)?(Practitioner|PractitionerRole)/[A-Za-z0-9\-.]{1,64}")


@dataclass(frozen=True)
class SmartConfig:
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str | None = None  # the keys that sign the id_token
    issuer: str | None = None  # the id_token's iss


@dataclass(frozen=True)
class Grant:
    """What the token response granted (kept encrypted server-side, never shown or logged)."""

    access_token: str = field(repr=False)
    patient: str
    scope: str
    app_context: str | None = None
    # the practitioner signed in (the validated id_token's fhirUser), the author of saved answers
    user: str | None = None
    # SMART 2.1 fhirContext references (an EHR that launches the app on an order)
    fhir_context: list[str] | None = None
    encounter: str | None = None  # "Encounter/<id>" of the launch, when the EHR gives one
    # SMART Web Messaging: the EHR window's origin and the handle its messages carry
    messaging_origin: str | None = None
    messaging_handle: str | None = None
    # why the id_token names no one (it did not validate, or none came)
    user_problem: str | None = None

    def dumps(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: bytes) -> Grant | None:
        try:
            value = orjson.loads(raw)
            return cls(**value) if isinstance(value, dict) else None
        except (orjson.JSONDecodeError, TypeError):
            return None


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, its S256 code_challenge): RFC 7636."""
    verifier = secrets.token_urlsafe(64)  # 86 characters of the unreserved set
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _json(reply: Reply) -> Any:
    try:
        return orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        return None


async def discover(out: Outbound, iss: str) -> SmartConfig:
    """The EHR's authorization and token endpoints, from ``{iss}/.well-known/smart-configuration``
    (which must offer PKCE with S256)."""
    what = "Reading the EHR's SMART configuration"
    reply = await out.send("GET", f"{normalize_base(iss)}/.well-known/smart-configuration",
                           headers={"Accept": "application/json"})
    if isinstance(reply, str):
        raise ehr_down(what, reply)
    doc = _json(reply)
    if reply.status != 200 or not isinstance(doc, dict):
        raise ehr_down(what, f"HTTP {reply.status}" if reply.status != 200 else "not JSON")
    authorize, token = doc.get("authorization_endpoint"), doc.get("token_endpoint")
    if out.target(authorize) is None or out.target(token) is None:
        raise ehr_down(what, "no usable authorization_endpoint and token_endpoint")
    if len(token) > lengths.SMART_URL:
        raise unusable_configuration(f"its token_endpoint is longer than {lengths.SMART_URL} "
                                     "characters")
    methods = doc.get("code_challenge_methods_supported")
    if not isinstance(methods, list) or "S256" not in methods:
        raise ehr_down(what, "PKCE with S256 is not offered (code_challenge_methods_supported)")
    jwks = doc.get("jwks_uri")
    issuer = doc.get("issuer")
    return SmartConfig(authorize, token, jwks if out.target(jwks) is not None else None,
                       issuer if isinstance(issuer, str) else None)


def authorize_url(config: SmartConfig, *, client_id: str, redirect_uri: str, scope: str,
                  state: str, iss: str, launch: str, challenge: str) -> str:
    """The authorisation request the browser is sent to (its own query parameters kept)."""
    return str(httpx.URL(config.authorization_endpoint).copy_merge_params({
        "response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
        "scope": scope, "state": state, "aud": iss, "launch": launch,
        "code_challenge": challenge, "code_challenge_method": "S256"}))


async def exchange(out: Outbound, token_endpoint: str, *, code: str, redirect_uri: str,
                   client_id: str, verifier: str,
                   requested_scope: str) -> tuple[Grant, str | None]:
    """POST the code with its PKCE verifier to the token endpoint; the grant it answers (the
    user not yet known) and its id_token (to validate, :mod:`cds_service.smart.identity`)."""
    reply = await out.send("POST", token_endpoint, headers={"Accept": "application/json"},
                           data={"grant_type": "authorization_code", "code": code,
                                 "redirect_uri": redirect_uri, "client_id": client_id,
                                 "code_verifier": verifier})
    if isinstance(reply, str):
        raise ehr_down("Asking the EHR's token endpoint for access", reply)
    body = _json(reply)
    body = body if isinstance(body, dict) else {}
    if reply.status != 200:
        error = body.get("error")
        said = error if isinstance(error, str) and ERROR_CODE.fullmatch(error) else None
        raise Problem(502, "The EHR did not give the app access",
                      f"Its token endpoint refused the sign-in (HTTP {reply.status}"
                      + (f", {said})." if said else ")."))
    token, patient = body.get("access_token"), body.get("patient")
    kind = body.get("token_type")
    if not isinstance(token, str) or not token or not isinstance(kind, str) \
            or kind.lower() != "bearer":
        raise ehr_down("The EHR's token response", "no bearer access_token")
    if not isinstance(patient, str) or not FHIR_ID.fullmatch(patient):
        raise ehr_down("The EHR's token response", "no patient in context")
    context = body.get("appContext")
    if isinstance(context, dict):  # some EHRs send the object rather than its JSON text
        context = orjson.dumps(context).decode()
    scope = body.get("scope")
    id_token = body.get("id_token")
    return Grant(token, patient, scope if isinstance(scope, str) else requested_scope,
                 context if isinstance(context, str) else None, None,
                 _references(body.get("fhirContext")), _encounter(body.get("encounter")),
                 _origin(body.get("smart_web_messaging_origin")
                         or body.get("smart_messaging_origin")),
                 _handle(body.get("smart_web_messaging_handle"))), \
        id_token if isinstance(id_token, str) and len(id_token) <= 16_000 else None


def _references(items: Any) -> list[str] | None:
    """The references of SMART 2.1 ``fhirContext`` (at most ten, each short)."""
    if not isinstance(items, list):
        return None
    found = [i["reference"] for i in items[:10] if isinstance(i, dict)
             and isinstance(i.get("reference"), str) and len(i["reference"]) <= 500]
    return found or None


def _encounter(value: Any) -> str | None:
    return f"Encounter/{value}" if isinstance(value, str) and FHIR_ID.fullmatch(value) else None


ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]{1,253}(:\d{1,5})?")


def _origin(value: Any) -> str | None:
    """A web origin (scheme, host, port) the app may post its messages to."""
    return value if isinstance(value, str) and ORIGIN.fullmatch(value) else None


def _handle(value: Any) -> str | None:
    ok = isinstance(value, str) and 0 < len(value) <= 200 and value.isprintable()
    return value if ok else None


def can_write_responses(scope: str) -> bool:
    """Whether the granted scopes let the app create a QuestionnaireResponse (SMART v2
    ``.c``/``.cruds``, or v1 ``.write``/``.*``; patient or user level; a type or ``*``)."""
    return can_create(scope, "QuestionnaireResponse")
