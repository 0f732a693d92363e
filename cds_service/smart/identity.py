"""Who is signed in: the id_token of the token response, validated (OpenID Connect Core 3.1.3.7)
before its ``fhirUser`` claim names the author of the answers saved.

The token's signature is checked with the issuer's published keys (``jwks_uri`` of the EHR's
SMART configuration), its ``iss`` must be the EHR's issuer, its ``aud`` the app's client id, and it
must not have expired. A token that fails any check names no one: the answers are then saved
without an author (and read as not a clinician's), and the page says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from cds_service.security import ASYMMETRIC
from cds_service.smart.oauth import FHIR_USER, SmartConfig
from cds_service.smart.outbound import Outbound

log = logging.getLogger("cds_service.smart")
LEEWAY_SECONDS = 60


@dataclass(frozen=True)
class Signed:
    """The practitioner the validated id_token names (``Practitioner/123``), or why none."""

    user: str | None
    problem: str | None = None


def _keys(doc: Any) -> list[jwt.PyJWK]:
    keys = []
    for raw in doc.get("keys", []) if isinstance(doc, dict) else []:
        if not isinstance(raw, dict) or raw.get("kty") == "oct" or raw.get("use", "sig") != "sig":
            continue
        try:
            keys.append(jwt.PyJWK(raw))
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
    return keys


async def signed_in_user(out: Outbound, config: SmartConfig, id_token: str | None,
                         client_id: str, iss: str) -> Signed:
    """Validate ``id_token`` and read its ``fhirUser`` (a Practitioner or PractitionerRole)."""
    if not id_token:
        return Signed(None, "no id_token")
    try:
        header = jwt.get_unverified_header(id_token)
    except jwt.PyJWTError:
        return Signed(None, "the id_token is not a JWT")
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in ASYMMETRIC:
        return Signed(None, "the id_token is not signed with a public key")
    if not config.jwks_uri:
        return Signed(None, "the EHR publishes no keys (jwks_uri)")
    reply = await out.send("GET", config.jwks_uri, headers={"Accept": "application/json"})
    if isinstance(reply, str) or reply.status != 200:
        return Signed(None, "the EHR's keys could not be read")
    try:
        keys = _keys(orjson.loads(reply.body))
    except orjson.JSONDecodeError:
        keys = []
    chosen = [k for k in keys if k.key_id == kid] if kid else keys
    for key in chosen:
        try:
            claims = jwt.decode(id_token, key, algorithms=[alg], audience=client_id,
                                issuer=config.issuer or iss, leeway=LEEWAY_SECONDS,
                                options={"require": ["exp", "iss", "aud"]})
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError as exc:
            log.info("app id_token refused", extra={"problem": type(exc).__name__})
            return Signed(None, "the id_token did not pass its checks")
        return Signed(practitioner_named(claims.get("fhirUser")))
    return Signed(None, "the id_token's signature does not match the EHR's keys")


def practitioner_named(user: Any) -> str | None:
    """``Practitioner/123`` from a fhirUser claim (relative or absolute); None for a patient
    or a related person (their answers are not a clinician's)."""
    if not isinstance(user, str):
        return None
    match = FHIR_USER.fullmatch(user)
    return user[match.start(1):] if match else None
