"""Verification of the calling EHR's JWT (CDS Hooks 2.0 "Trusting CDS Clients").

Asymmetric algorithms only; the issuer must be allow-listed with its JWKS (inline or by URL); the
key is chosen by ``kid`` and must fit the token's algorithm (key type, curve, and the JWK's own
``alg`` when it declares one); ``aud`` is the exact URL called; ``exp``, ``iat`` and ``jti``
(replay) are checked, and ``tenant`` when the issuer lists tenants. Failures raise
:class:`AuthError`, whose message is for our logs only and never contains the token.

A JWKS given by URL is fetched through one HTTP client per verifier, cached, and after a failed
fetch not asked again for 1 s, then 2 s, 4 s... up to a cap (per issuer), however many forged
tokens arrive. The replay check (shared database, this process's memory) is
:mod:`cds_service.replay`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

from cds_service.replay import FallbackReplayStore, ReplayCache, ReplayStore
from cds_service.settings import Settings

log = logging.getLogger("cds_service.security")

ASYMMETRIC = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA"}
REFETCH_INTERVAL = 30.0  # an unknown kid refetches the JWKS at most this often


class AuthError(Exception):
    """The request is not authenticated (the reason is for our logs, never for the client)."""


@dataclass
class TrustedIssuer:
    iss: str
    jwks_url: str | None = None
    jwks: dict[str, Any] | None = None
    tenants: list[str] | None = None


def load_trusted_issuers(path: Path, *, require_https: bool = False) -> list[TrustedIssuer]:
    """Read the trusted-issuer file; raise ValueError naming the problem.

    With ``require_https`` (outside development) a ``jwks_url`` must be https.
    """
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
        if url is not None and require_https and not url.startswith("https://"):
            raise ValueError(f"{path}: issuer {entry['iss']}: 'jwks_url' must be https outside "
                             "development mode (the keys that authenticate every call)")
        tenants = entry.get("tenants")
        if tenants is not None and not (isinstance(tenants, list)
                                        and all(isinstance(t, str) for t in tenants)):
            raise ValueError(f"{path}: issuer {entry['iss']}: 'tenants' must be strings")
        issuers.append(TrustedIssuer(entry["iss"], url, jwks, tenants))
    return issuers


def public_base_url_problem(url: str | None) -> str | None:
    """What is wrong with CDS_PUBLIC_BASE_URL as the base of every JWT audience, or None."""
    if not url:
        return "is required"
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.username is not None \
            or "?" in url or "#" in url:
        return f"must be a plain https URL (no query, fragment or user), not {url[:100]!r}"
    return None


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header; None when there is no header."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed Authorization header")
    return token.strip()


class _Keys:
    """The JWKS of one issuer (raw JWKs by kid), fetched and cached when given by URL."""

    def __init__(self, issuer: TrustedIssuer):
        self.issuer = issuer
        self.keys: dict[str, dict[str, Any]] = {}
        self.parsed: dict[tuple[str, str], jwt.PyJWK] = {}  # (kid, alg) -> key
        self.fetched_at: float | None = None  # last successful fetch
        self.attempted_at: float | None = None  # last fetch tried
        self.failures = 0  # failed fetches in a row
        self.retry_at = 0.0  # no fetch before this (back-off after failures)
        self.lock = asyncio.Lock()
        if issuer.jwks is not None:
            self.replace(_parse_jwks(issuer.jwks))

    def replace(self, keys: dict[str, dict[str, Any]]) -> None:
        self.keys = keys
        self.parsed = {}


def _parse_jwks(jwks: Any) -> dict[str, dict[str, Any]]:
    """The usable signature keys of a JWKS document by kid; ValueError if it is not a JWKS."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys = {}
    for raw in jwks["keys"]:
        if not isinstance(raw, dict) or not isinstance(raw.get("kid"), str) or not raw["kid"]:
            continue  # keys without kid cannot be chosen
        if raw.get("kty") == "oct" or raw.get("use", "sig") != "sig":
            continue  # symmetric keys are never trusted; encryption keys do not sign
        if "alg" in raw and raw["alg"] not in ASYMMETRIC:
            continue
        try:
            jwt.PyJWK(raw)  # a key PyJWT can build at all (its type, curve, numbers)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        keys[raw["kid"]] = raw
    return keys


class JwtVerifier:
    """Checks the EHR's JWT on each call."""

    def __init__(self, issuers: list[TrustedIssuer], settings: Settings,
                 replay: ReplayStore | None = None, http: httpx.AsyncClient | None = None,
                 *, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.algorithms = [a for a in settings.jwt_algorithm_list if a in ASYMMETRIC]
        self.replay = replay or ReplayCache()
        self.http = http  # the JWKS client: given, or made on the first fetch and kept
        self._owns_http = http is None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self.clock = clock
        self._issuers = {i.iss: _Keys(i) for i in issuers}

    async def aclose(self) -> None:
        """Close the JWKS client this verifier made, and write to the shared replay store what
        this process accepted alone (at shutdown)."""
        if isinstance(self.replay, FallbackReplayStore):
            await self.replay.aclose()
        if self._owns_http and self.http is not None:
            await self.http.aclose()

    async def verify(self, token: str, audience: str) -> dict[str, Any]:
        """The verified claims, or AuthError."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthError(f"unreadable token: {type(exc).__name__}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthError(f"algorithm {str(alg)[:20]!r} not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("no kid in token header")
        iss = unverified.get("iss")
        keys = self._issuers.get(iss) if isinstance(iss, str) else None
        if keys is None:
            raise AuthError("issuer not trusted")
        key = await self._key(keys, kid, alg)
        leeway = self.settings.jwt_leeway_seconds
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=audience, issuer=keys.issuer.iss,
                leeway=leeway, options={"require": ["iss", "aud", "exp", "iat", "jti"]})
        except jwt.PyJWTError as exc:
            raise AuthError(f"token refused: {type(exc).__name__}") from None
        except (TypeError, ValueError) as exc:  # never a 500 for what a caller sent
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

    async def _key(self, keys: _Keys, kid: str, alg: str) -> jwt.PyJWK:
        """The issuer's key ``kid`` bound to ``alg``; AuthError if there is none that fits."""
        if keys.issuer.jwks_url and self._wants_fetch(keys, kid) \
                and not (keys.lock.locked() and kid in keys.keys):  # held keys serve meanwhile
            async with keys.lock:  # concurrent calls wait for one fetch instead of each making one
                if self._wants_fetch(keys, kid):
                    await self._fetch(keys)
        raw = keys.keys.get(kid)
        if raw is None:
            raise AuthError("unknown kid")
        if raw.get("alg", alg) != alg:
            raise AuthError("algorithm does not match the key's alg")
        found = keys.parsed.get((kid, alg))
        if found is None:
            try:  # PyJWT refuses a key of another type (or curve) than the algorithm needs
                found = jwt.PyJWK(raw, algorithm=alg)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                raise AuthError("key does not fit the algorithm") from None
            keys.parsed[(kid, alg)] = found
        return found

    def _wants_fetch(self, keys: _Keys, kid: str) -> bool:
        now = self.clock()
        if now < keys.retry_at:
            return False  # backing off after a failed fetch
        if keys.fetched_at is None or now - keys.fetched_at > self.settings.jwks_cache_seconds:
            return True
        return kid not in keys.keys and (keys.attempted_at is None
                                         or now - keys.attempted_at >= REFETCH_INTERVAL)

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self.http is None or (self._owns_http and (self._http_loop is not loop
                                                      or self.http.is_closed)):
            # one client for every fetch; a new one only if the event loop changed (tests) or
            # the application was shut down and started again
            self.http = httpx.AsyncClient(
                follow_redirects=False, timeout=self.settings.jwks_timeout_seconds,
                headers={"Accept": "application/jwk-set+json, application/json"})
            self._http_loop = loop
        return self.http

    async def _fetch(self, keys: _Keys) -> None:
        keys.attempted_at = self.clock()
        url = str(keys.issuer.jwks_url)
        try:
            response = await self._client().get(url)
            response.raise_for_status()
            parsed = _parse_jwks(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            # keep the keys we had (an unknown kid is refused) and back off: 1 s, 2 s, 4 s...
            keys.failures += 1
            delay = min(self.settings.jwks_retry_min_seconds * 2 ** (keys.failures - 1),
                        self.settings.jwks_retry_max_seconds)
            keys.retry_at = self.clock() + delay
            log.warning("JWKS fetch failed", extra={
                "issuer": keys.issuer.iss, "error": type(exc).__name__,
                "status": getattr(getattr(exc, "response", None), "status_code", None),
                "failures": keys.failures, "retry_in_seconds": delay})
            return
        keys.replace(parsed)
        keys.fetched_at = self.clock()
        keys.failures = 0
        keys.retry_at = 0.0
