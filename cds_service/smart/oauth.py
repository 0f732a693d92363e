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

from cds_service.record.fetch import normalize_base
from cds_service.smart.outbound import Outbound, Reply
from cds_service.smart.problems import Problem, ehr_down

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
ERROR_CODE = re.compile(r"[\x20-\x7e]{1,80}")  # an OAuth error code as it may be shown
# The signed-in user, as the id_token's fhirUser claim names a practitioner (relative or absolute).
FHIR_USER = re.compile(r"(?:https?://[^\s]{1,400}/)?(Practitioner|PractitionerRole)/[A-Za-z0-9\-.]{1,64}")
WRITE_SCOPE = re.compile(r"(patient|user)/(QuestionnaireResponse|\*)\.([a-z*]+)(\?.*)?")


@dataclass(frozen=True)
class SmartConfig:
    authorization_endpoint: str
    token_endpoint: str


@dataclass(frozen=True)
class Grant:
    """What the token response granted (kept encrypted server-side, never shown or logged)."""

    access_token: str = field(repr=False)
    patient: str
    scope: str
    app_context: str | None = None
    # the practitioner signed in (the id_token's fhirUser claim), the author of saved answers
    user: str | None = None

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
    methods = doc.get("code_challenge_methods_supported")
    if not isinstance(methods, list) or "S256" not in methods:
        raise ehr_down(what, "PKCE with S256 is not offered (code_challenge_methods_supported)")
    return SmartConfig(authorize, token)


def authorize_url(config: SmartConfig, *, client_id: str, redirect_uri: str, scope: str,
                  state: str, iss: str, launch: str, challenge: str) -> str:
    """The authorisation request the browser is sent to (its own query parameters kept)."""
    return str(httpx.URL(config.authorization_endpoint).copy_merge_params({
        "response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
        "scope": scope, "state": state, "aud": iss, "launch": launch,
        "code_challenge": challenge, "code_challenge_method": "S256"}))


async def exchange(out: Outbound, token_endpoint: str, *, code: str, redirect_uri: str,
                   client_id: str, verifier: str, requested_scope: str) -> Grant:
    """POST the code with its PKCE verifier to the token endpoint; the grant it answers."""
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
    return Grant(token, patient, scope if isinstance(scope, str) else requested_scope,
                 context if isinstance(context, str) else None, practitioner_of(body))


def practitioner_of(body: dict[str, Any]) -> str | None:
    """The practitioner the id_token's ``fhirUser`` claim names (``Practitioner/123``), or None.

    The token came straight from the token endpoint over TLS (OpenID Connect Core 3.1.3.7: its
    signature need not be checked then); the claim only names the author of the answers saved,
    it grants nothing. A patient or related person signed in: None (their answers are not a
    clinician's)."""
    id_token = body.get("id_token")
    if not isinstance(id_token, str) or id_token.count(".") != 2 or len(id_token) > 16_000:
        return None
    payload = id_token.split(".")[1]
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        return None
    user = claims.get("fhirUser") if isinstance(claims, dict) else None
    if not isinstance(user, str):
        return None
    match = FHIR_USER.fullmatch(user)
    return user[match.start(1):] if match else None


def can_write_responses(scope: str) -> bool:
    """Whether the granted scopes let the app create a QuestionnaireResponse (SMART v2
    ``.c``/``.cruds``, or v1 ``.write``/``.*``; patient or user level; a type or ``*``)."""
    for item in scope.split():
        match = WRITE_SCOPE.fullmatch(item)
        if not match:
            continue
        perms = match.group(3)
        if perms in ("write", "*") or ("c" in perms and set(perms) <= set("cruds")):
            return True
    return False
