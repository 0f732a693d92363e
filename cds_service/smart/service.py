"""The app's parts (settings, engine, store, clock, keys, fetch policy) and its sessions.

A launch writes nothing to the database: its OAuth state and PKCE verifier travel in a sealed
(encrypted, signed) cookie to the EHR and back; the callback spends the state once (in the shared
store, every worker sees it) and only then creates the session, under a new random id (session
fixation: no id the browser had before the sign-in survives it). A session lives in the database
until ``CDS_SMART_SESSION_SECONDS`` later; the browser holds only its id in a signed, HttpOnly
cookie, ``__Host-`` prefixed where the app is served over https. Launched in a window of its own,
the cookies are SameSite=Lax. Launched in an EHR's frame (a side panel, often on another site),
they are ``SameSite=None; Secure; Partitioned``: Partitioned keeps them for that EHR's page only,
and is kept where third-party cookies are blocked; the forms carry a per-session CSRF token and
the callback checks the OAuth state, so SameSite is not what protects them there. Expired rows
are deleted at each sign-in.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from fastapi import Request, Response

from cds_service.engine import Engine
from cds_service.record.fetch import FetchPolicy, Resolver, system_resolver
from cds_service.settings import Settings
from cds_service.smart.keys import SessionKeys, session_secret
from cds_service.smart.launches import ConfigCache, Launch, LaunchLimiter
from cds_service.smart.oauth import Grant
from cds_service.smart.outbound import Outbound
from cds_service.smart.problems import unusable_configuration
from cds_service.store import DatabaseReplayCache, Store
from cds_service.store.models import AppSession

COOKIE = "cds_app_session"
LAUNCH = "cds_app_launch"  # a launch on its way to the EHR and back (sealed)
MAX_LAUNCH_COOKIE = 3800  # characters: browsers keep cookies of up to 4096 bytes
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
        self.configs = ConfigCache(settings.smart_config_cache_seconds)
        self.launches = LaunchLimiter(settings.smart_launches_per_minute,
                                      settings.smart_launches_per_minute_total)
        self.states = DatabaseReplayCache(store)  # each launch's state, used once

    def outbound(self) -> Outbound:
        """The EHR calls of one page view, under one byte budget (CDS_SMART_PAGE_BYTES)."""
        return Outbound(self.policy, self.resolver, self.settings.smart_page_bytes)

    def base_url(self, request: Request) -> str:
        """CDS_PUBLIC_BASE_URL, else the request's own base (development)."""
        return (self.settings.public_base_url or str(request.base_url)).rstrip("/")

    def secure(self, request: Request) -> bool:
        """Whether the app is served over https (its cookies then carry the ``__Host-``
        prefix: Secure, Path=/, no Domain, so no other host, not even a sibling subdomain, can
        set or overwrite them)."""
        return self.base_url(request).startswith("https://")

    def cookie_name(self, request: Request, name: str) -> str:
        return f"__Host-{name}" if self.secure(request) else name

    def start(self, response: Response, request: Request, launch: Launch) -> None:
        """The launch's cookie (sealed; nothing is written to the database before the EHR
        sends the browser back)."""
        sealed = self.keys.seal_launch(launch.dumps())
        if len(sealed) > MAX_LAUNCH_COOKIE:  # a browser would drop it
            raise unusable_configuration("its addresses are too long")
        self.set_cookie(response, request, LAUNCH, sealed)

    def launch_of(self, request: Request) -> Launch | None:
        """The launch this browser started (its cookie, sealed here, not expired), or None."""
        sealed = request.cookies.get(self.cookie_name(request, LAUNCH))
        return Launch.loads(self.keys.open_launch(sealed, self.settings.smart_session_seconds))

    def state_matches(self, launch: Launch, state: str) -> bool:
        return hmac.compare_digest(launch.state, digest(state))

    async def spend(self, launch: Launch) -> bool:
        """Use the launch's state once (every worker sees it): a callback cannot be replayed."""
        expires = time.time() + self.settings.smart_session_seconds
        return await self.states.check_and_store(f"smart-state|{launch.state}", expires)

    async def sign_in(self, response: Response, request: Request, launch: Launch,
                      grant: Grant) -> None:
        """A new session for the grant, under a new id (whatever session cookie the browser
        came with is replaced, its row deleted): the session is born at the sign-in."""
        now = self.clock()
        await self.store.drop_app_sessions(now)
        before = self.keys.session_id(request.cookies.get(self.cookie_name(request, COOKIE)))
        session_id = self.keys.new_id()
        await self.store.replace_app_session(
            self.keys.row_key(before) if before else None, {
                "id": self.keys.row_key(session_id), "state": None, "verifier": None,
                "iss": launch.iss, "token_endpoint": launch.token_endpoint,
                "redirect_uri": launch.redirect_uri,
                "granted": self.keys.seal(session_id, grant.dumps()), "created_at": now,
                "expires_at": now + timedelta(seconds=self.settings.smart_session_seconds)})
        self.set_cookie(response, request, COOKIE, self.keys.cookie(session_id))
        self.set_cookie(response, request, LAUNCH, "", seconds=0)

    def set_cookie(self, response: Response, request: Request, name: str, value: str,
                   seconds: int | None = None) -> None:
        """A cookie of the app, HttpOnly: over https ``__Host-`` prefixed (Secure, Path=/),
        over plain http (development only) under /app without the prefix, which browsers
        refuse there. In an EHR's frame (``Sec-Fetch-Dest: iframe``): SameSite=None; Secure;
        Partitioned (a cookie of another site in the EHR's page, kept for that EHR only; the
        header is written here, as this Python's cookie module has no Partitioned). In a
        window of its own: SameSite=Lax."""
        secure = self.secure(request)
        name = self.cookie_name(request, name)
        path = "/" if secure else f"{request.scope.get('root_path', '')}/app"
        seconds = self.settings.smart_session_seconds if seconds is None else seconds
        if request.headers.get("sec-fetch-dest") == "iframe":
            response.headers.append("set-cookie", f"{name}={value}; Max-Age={seconds}; "
                                    f"Path={path}; HttpOnly; SameSite=None; Secure; Partitioned")
            return
        response.set_cookie(name, value, max_age=seconds, path=path, httponly=True,
                            samesite="lax", secure=secure or not self.settings.is_development)

    async def load(self, request: Request) -> Session | None:
        """The live session of the request's cookie, or None."""
        session_id = self.keys.session_id(request.cookies.get(self.cookie_name(request, COOKIE)))
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
