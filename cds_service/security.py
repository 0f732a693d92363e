"""Verification of the calling EHR's JWT (CDS Hooks 2.0 "Trusting CDS Clients").

Asymmetric algorithms only; the issuer must be allow-listed with its JWKS (inline or by URL); the
key is chosen by ``kid``; ``aud`` is the exact URL called; ``exp``, ``iat`` and ``jti`` (replay) are
checked, and ``tenant`` when the issuer lists tenants. Failures raise :class:`AuthError`, whose
message is for our logs only and never contains the token.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import jwt

from cds_service.settings import Settings

ASYMMETRIC = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA"}
REFETCH_INTERVAL = 30.0


class AuthError(Exception):
    """The request is not authenticated (the reason is for our logs, never for the client)."""


@dataclass
class TrustedIssuer:
    iss: str
    jwks_url: str | None = None
    jwks: dict[str, Any] | None = None
    tenants: list[str] | None = None


def load_trusted_issuers(path: Path) -> list[TrustedIssuer]:
    """Read the trusted-issuer file; raise ValueError naming the problem."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc.msg} at line {exc.lineno}") from exc
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} must hold a non-empty JSON array of issuers")
    issuers = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("iss"), str) \
                or not entry["iss"]:
            raise ValueError(f"{path}: entry {i} needs an 'iss' string")
        jwks, url = entry.get("jwks"), entry.get("jwks_url")
        if jwks is None and url is None:
            raise ValueError(f"{path}: issuer {entry['iss']} needs 'jwks' or 'jwks_url'")
        if jwks is not None and not (isinstance(jwks, dict) and isinstance(jwks.get("keys"),
                                                                         list)):
            raise ValueError(f"{path}: issuer {entry['iss']}: 'jwks' must be {{\"keys\": [...]}}")
        if url is not None and not (isinstance(url, str) and url.startswith(("https://",
                                                                             "http://"))):
            raise ValueError(f"{path}: issuer {entry['iss']}: 'jwks_url' must be an http(s) URL")
        tenants = entry.get("tenants")
        if tenants is not None and not (isinstance(tenants, list)
                                        and all(isinstance(t, str) for t in tenants)):
            raise ValueError(f"{path}: issuer {entry['iss']}: 'tenants' must be strings")
        issuers.append(TrustedIssuer(entry["iss"], url, jwks, tenants))
    return issuers


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header; None when there is no header."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed Authorization header")
    return token.strip()


class ReplayStore(Protocol):
    """Where seen ``jti`` values are kept (in memory, or the shared database)."""

    async def check_and_store(self, key: str, expires_at: float) -> bool: ...


class ReplayCache:
    """Remembers ``jti`` values until their token expires (one process only)."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def check_and_store(self, key: str, expires_at: float) -> bool:
        """True the first time a key is seen (before it expires), False on a replay."""
        now = time.time()
        async with self._lock:
            if len(self._seen) > 1000:
                self._seen = {k: e for k, e in self._seen.items() if e > now}
            seen = self._seen.get(key)
            if seen is not None and seen > now:
                return False
            self._seen[key] = expires_at
            return True


class _Keys:
    """The JWKS of one issuer, fetched and cached when given by URL."""

    def __init__(self, issuer: TrustedIssuer):
        self.issuer = issuer
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at = 0.0
        self.attempted_at = 0.0
        if issuer.jwks is not None:
            self.keys = _parse_jwks(issuer.jwks)


def _parse_jwks(jwks: dict[str, Any]) -> dict[str, jwt.PyJWK]:
    keys = {}
    for raw in jwks.get("keys", []):
        if not isinstance(raw, dict) or not raw.get("kid") or raw.get("kty") == "oct":
            continue  # keys without kid cannot be chosen; symmetric keys are never trusted
        try:
            keys[str(raw["kid"])] = jwt.PyJWK(raw)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue
    return keys


class JwtVerifier:
    """Checks the EHR's JWT on each call."""

    def __init__(self, issuers: list[TrustedIssuer], settings: Settings,
                 replay: ReplayStore | None = None, http: httpx.AsyncClient | None = None):
        self.settings = settings
        self.algorithms = [a for a in settings.jwt_algorithm_list if a in ASYMMETRIC]
        self.replay = replay or ReplayCache()
        self.http = http
        self._issuers = {i.iss: _Keys(i) for i in issuers}

    async def verify(self, token: str, audience: str) -> dict[str, Any]:
        """The verified claims, or AuthError."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthError(f"unreadable token: {type(exc).__name__}") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise AuthError(f"algorithm {alg!r} not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("no kid in token header")
        keys = self._issuers.get(unverified.get("iss"))  # type: ignore[arg-type]
        if keys is None:
            raise AuthError("issuer not trusted")
        key = await self._key(keys, kid)
        leeway = self.settings.jwt_leeway_seconds
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=audience, issuer=keys.issuer.iss,
                leeway=leeway, options={"require": ["iss", "aud", "exp", "iat", "jti"]})
        except jwt.PyJWTError as exc:
            raise AuthError(f"token refused: {type(exc).__name__}") from None
        now = time.time()
        exp, iat = float(claims["exp"]), float(claims["iat"])
        if iat > now + leeway:
            raise AuthError("iat in the future")
        if exp - iat > self.settings.jwt_max_lifetime_seconds:
            raise AuthError("token lifetime too long")
        if keys.issuer.tenants is not None and claims.get("tenant") not in keys.issuer.tenants:
            raise AuthError("tenant not allowed")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise AuthError("jti missing")
        if not await self.replay.check_and_store(f"{keys.issuer.iss}|{jti}", exp + leeway):
            raise AuthError("jti replayed")
        return claims

    async def _key(self, keys: _Keys, kid: str) -> Any:
        issuer = keys.issuer
        if issuer.jwks_url:
            stale = time.monotonic() - keys.fetched_at > self.settings.jwks_cache_seconds
            unknown = kid not in keys.keys
            recently_tried = time.monotonic() - keys.attempted_at < REFETCH_INTERVAL
            if keys.fetched_at == 0.0 or stale or (unknown and not recently_tried):
                await self._fetch(keys)
        found = keys.keys.get(kid)
        if found is None:
            raise AuthError("unknown kid")
        return found.key

    async def _fetch(self, keys: _Keys) -> None:
        keys.attempted_at = time.monotonic()
        client = self.http or httpx.AsyncClient(follow_redirects=False)
        try:
            response = await client.get(str(keys.issuer.jwks_url),
                                        timeout=self.settings.jwks_timeout_seconds)
            response.raise_for_status()
            keys.keys = _parse_jwks(response.json())
            keys.fetched_at = time.monotonic()
        except (httpx.HTTPError, ValueError):
            pass  # keep the keys we had; an unknown kid is refused below
        finally:
            if self.http is None:
                await client.aclose()
