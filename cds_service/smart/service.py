"""The app's parts (settings, engine, store, clock, keys, fetch policy) and its sessions.

A session lives in the database (every worker sees it) from the launch until
``CDS_SMART_SESSION_SECONDS`` later; the browser holds only its random id in a signed, HttpOnly
cookie. Launched in a window of its own, the cookie is SameSite=Lax (Secure outside
development). Launched in an EHR's frame (a side panel, often on another site), it is
``SameSite=None; Secure; Partitioned``: Partitioned keeps it for that EHR's page only, and is
kept where third-party cookies are blocked; the forms carry a per-session CSRF token and the
callback checks the OAuth state, so SameSite is not what protects them there. Expired rows are
deleted at each launch.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from fastapi import Request, Response

from cds_service.engine import Engine
from cds_service.record.fetch import FetchPolicy, Resolver, system_resolver
from cds_service.settings import Settings
from cds_service.smart.keys import SessionKeys, session_secret
from cds_service.smart.oauth import Grant
from cds_service.smart.outbound import Outbound
from cds_service.store import Store
from cds_service.store.models import AppSession

COOKIE = "cds_app_session"
PROBE = "cds_app_probe"  # set before a launch in a frame: does the browser keep cookies there?
# The app waits on the EHR while a clinician waits on the page: longer than a hook's fetch.
TIMEOUT_SECONDS = 5.0
BUDGET_SECONDS = 10.0


@dataclass
class Session:
    id: str  # the cookie's session id (the database holds only its hash)
    row: AppSession
    grant: Grant | None


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class SmartApp:
    """What the /app/ routes use, built once by ``create_app``."""

    def __init__(self, settings: Settings, engine: Engine, store: Store,
                 clock: Callable[[], datetime], audit_key: str,
                 resolver: Resolver = system_resolver):
        self.settings = settings
        self.engine = engine
        self.store = store
        self.clock = clock
        self.keys = SessionKeys(session_secret(settings, audit_key))
        self.resolver = resolver
        self.policy = FetchPolicy(
            allowed=FetchPolicy.parse_allowed(settings.fhir_allowed_servers),
            require_https=not settings.is_development, timeout_seconds=TIMEOUT_SECONDS,
            budget_seconds=BUDGET_SECONDS, max_pages=settings.fhir_max_pages,
            page_size=settings.fhir_page_size,
            max_response_bytes=settings.fhir_max_response_bytes, without_token=False)

        self.frame_ancestors = frame_ancestors(settings)

    def outbound(self) -> Outbound:
        return Outbound(self.policy, self.resolver)

    def base_url(self, request: Request) -> str:
        """CDS_PUBLIC_BASE_URL, else the request's own base (development)."""
        return (self.settings.public_base_url or str(request.base_url)).rstrip("/")

    async def begin(self, response: Response, request: Request, *, state: str, verifier: str,
                    iss: str, token_endpoint: str, redirect_uri: str) -> None:
        """A new session (its cookie set on ``response``); expired ones are deleted."""
        now = self.clock()
        await self.store.drop_app_sessions(now)
        session_id = self.keys.new_id()
        await self.store.save_app_session({
            "id": self.keys.row_key(session_id), "state": digest(state),
            "verifier": verifier, "iss": iss, "token_endpoint": token_endpoint,
            "redirect_uri": redirect_uri, "granted": None, "created_at": now,
            "expires_at": now + timedelta(seconds=self.settings.smart_session_seconds)})
        self.set_cookie(response, request, COOKIE, self.keys.cookie(session_id))

    def set_cookie(self, response: Response, request: Request, name: str, value: str) -> None:
        """A cookie of the app (HttpOnly, under /app). In an EHR's frame
        (``Sec-Fetch-Dest: iframe``): SameSite=None; Secure; Partitioned (a cookie of another
        site in the EHR's page, kept for that EHR only; the header is written here, as this
        Python's cookie module has no Partitioned). In a window of its own: SameSite=Lax
        (Secure outside development)."""
        path = f"{request.scope.get('root_path', '')}/app"
        seconds = self.settings.smart_session_seconds
        if request.headers.get("sec-fetch-dest") == "iframe":
            response.headers.append("set-cookie", f"{name}={value}; Max-Age={seconds}; "
                                    f"Path={path}; HttpOnly; SameSite=None; Secure; Partitioned")
            return
        response.set_cookie(name, value, max_age=seconds, path=path, httponly=True,
                            samesite="lax", secure=not self.settings.is_development)

    async def load(self, request: Request) -> Session | None:
        """The live session of the request's cookie, or None."""
        session_id = self.keys.session_id(request.cookies.get(COOKIE))
        if session_id is None:
            return None
        row = await self.store.app_session(self.keys.row_key(session_id), self.clock())
        if row is None:
            return None
        grant = None
        if row.granted:
            plain = self.keys.open(session_id, row.granted)
            grant = Grant.loads(plain) if plain is not None else None
        return Session(session_id, row, grant)

    def state_matches(self, session: Session, state: str) -> bool:
        return session.row.state is not None and hmac.compare_digest(
            session.row.state, digest(state))

    async def claim(self, session: Session, state: str) -> bool:
        """Spend the state (once): the callback cannot be replayed."""
        return await self.store.claim_app_session(session.row.id, digest(state), self.clock())

    async def keep(self, session: Session, grant: Grant) -> None:
        """Store the grant, encrypted for this session."""
        await self.store.grant_app_session(session.row.id,
                                           self.keys.seal(session.id, grant.dumps()))


def frame_ancestors(settings: Settings) -> str:
    """The CSP frame-ancestors source list: the app itself, the origins of the allow-listed
    FHIR servers and of CDS_SMART_FRAME_ANCESTORS (no other site may show the app framed)."""
    origins = []
    for value in [*settings.fhir_allowed_servers.split(","),
                  *settings.smart_frame_ancestors.split(",")]:
        parts = urlsplit(value.strip())
        if parts.scheme in ("http", "https") and parts.netloc and "'" not in parts.netloc \
                and ";" not in parts.netloc and " " not in parts.netloc:
            origins.append(f"{parts.scheme}://{parts.netloc}")
    return " ".join(["'self'", *dict.fromkeys(origins)])
