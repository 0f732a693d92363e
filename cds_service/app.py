"""The FastAPI application: its parts, middleware and error answers (the routes are in
:mod:`cds_service.routes`).

``create_app()`` is the factory (tests pass their own settings and clock); ``app`` is created on
first access so that ``uvicorn cds_service.app:app`` works and importing the module does not.
"""

from __future__ import annotations

import gc
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cds_service.codesystems import LEGACY_OVERRIDE_SYSTEM, SystemUrls
from cds_service.engine import Engine
from cds_service.errors import (
    ProtocolError,
    StartupError,
    error_response,
    issue,
    outcome_response,
)
from cds_service.knowledge import load_knowledge
from cds_service.limits import Limits
from cds_service.metrics import Metrics
from cds_service.openapi import build_openapi
from cds_service.record.fetch import FetchPolicy, FhirFetcher
from cds_service.render import load_templates
from cds_service.routes import SERVICES, Services, router
from cds_service.security import (
    FallbackReplayStore,
    JwtVerifier,
    ReplayStore,
    load_trusted_issuers,
    public_base_url_problem,
)
from cds_service.settings import Settings, get_settings
from cds_service.smart import SmartApp
from cds_service.smart import router as smart_router
from cds_service.store import (
    AuditWriter,
    DatabaseReplayCache,
    Store,
    StoreUnavailable,
)

log = logging.getLogger("cds_service.app")


class ConfigurationError(StartupError, RuntimeError):
    """The service cannot start with this configuration."""


class BodyLimit:
    """Reject request bodies above the limit with 413 before they are read whole, and bodies
    that do not arrive within the read timeout with 408 (a slow client holds no worker)."""

    def __init__(self, app: ASGIApp, limit: int, read_timeout: float = 10.0):
        self.app = app
        self.limit = limit
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(scope, receive, send)
                    return
        seen = 0
        deadline: float | None = None

        async def limited() -> Message:
            nonlocal seen, deadline
            if deadline is None:
                deadline = anyio.current_time() + self.read_timeout
            try:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    message = await receive()
            except TimeoutError:
                raise _TooSlow() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)
        except _TooSlow:
            response = outcome_response(408, [issue(
                "timeout", f"request body not received within {self.read_timeout:g} s")],
                headers={"Connection": "close"})
            await response(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = outcome_response(413, [issue(
            "too-long", f"request body larger than {self.limit} bytes")])
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class CountRequests:
    """Count requests by route template and status (no ids in labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics
        # plain Starlette routes name their endpoint, not themselves, in the scope
        self.templates = {r.endpoint: r.path for r in router.routes if isinstance(r, Route)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = getattr(scope.get("route"), "path", None) or self.templates.get(
                scope.get("endpoint"), "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.refresh_audit_queue()  # a hook call queues its audit row


def check_production(settings: Settings) -> None:
    """Outside development mode, name every secret setting that is missing, then refuse a
    trusted-issuer file that cannot be used (or has an http JWKS URL), a missing or
    non-https CDS_PUBLIC_BASE_URL (the JWT audience is built from it, never from Host), and a
    CDS_SMART_SESSION_SECRET too short to sign with."""
    if settings.is_development:
        return
    missing = [name for name, value in (("CDS_TRUSTED_ISSUERS_FILE",
                                         settings.trusted_issuers_file),
                                        ("CDS_AUDIT_HASH_KEY", settings.audit_hash_key))
               if not value]
    if missing:
        raise ConfigurationError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required outside "
            "development mode (CDS_ENV=development accepts calls without a token)")
    build_verifier(settings)  # the trusted-issuer file: readable, JWKS URLs https
    problem = public_base_url_problem(settings.public_base_url)
    if problem:
        raise ConfigurationError(
            f"CDS_PUBLIC_BASE_URL {problem} outside development mode: it is the base URL the "
            "EHR calls (e.g. https://cds.example.org), and every JWT audience (aud) is checked "
            "against it, never against the request's Host header")
    secret = settings.smart_session_secret
    if settings.smart_app_enabled and secret is not None and len(secret) < 32:
        raise ConfigurationError(
            "CDS_SMART_SESSION_SECRET must be at least 32 characters: it signs the SMART app's "
            "session cookies and encrypts the EHR's access tokens it keeps (unset, a secret is "
            "derived from CDS_AUDIT_HASH_KEY)")


def build_verifier(settings: Settings, replay: ReplayStore | None = None,
                   metrics: Metrics | None = None) -> JwtVerifier | None:
    """The JWT verifier, or None in development mode without trusted issuers.

    ``replay`` is the shared (database) replay store; while it is unavailable this process's
    own store decides, counted in ``cds_jwt_replay_fallback_total``. Outside development a JWKS
    URL must be https. The caller closes the verifier (``aclose``) at shutdown.
    """
    if settings.trusted_issuers_file is None:
        if settings.is_development:
            return None
        raise ConfigurationError("CDS_TRUSTED_ISSUERS_FILE is required outside development mode")
    try:
        issuers = load_trusted_issuers(settings.trusted_issuers_file,
                                       require_https=not settings.is_development)
    except ValueError as exc:
        raise ConfigurationError(f"CDS_TRUSTED_ISSUERS_FILE: {exc}") from exc
    if replay is not None:
        def fell_back(failed: bool) -> None:
            if metrics is not None:
                metrics.jwt_replay_fallback.inc()
                if failed:  # the database was asked (not skipped while it recovers)
                    metrics.db_errors.labels("jwt-replay").inc()

        replay = FallbackReplayStore(replay, on_fallback=fell_back)
    return JwtVerifier(issuers, settings, replay=replay)


def audit_hash_key(settings: Settings) -> str:
    """CDS_AUDIT_HASH_KEY; in development a random key kept in the data directory."""
    if settings.audit_hash_key:
        return settings.audit_hash_key
    if not settings.is_development:
        raise ConfigurationError("CDS_AUDIT_HASH_KEY is required outside development mode "
                                 "(the secret that hashes patient ids in the audit)")
    path = settings.data_dir / "audit-hash.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def override_systems(engine: Engine, settings: Settings) -> frozenset[str]:
    """The override-reason systems feedback may name: today's, and those our cards carried
    under former canonical bases (CDS_CANONICAL_BASE_PREVIOUS) or before the systems resolved."""
    former = [SystemUrls.under(root).override_reason
              for root in settings.previous_canonical_roots]
    return frozenset([engine.systems.override_reason, LEGACY_OVERRIDE_SYSTEM, *former])


def create_app(settings: Settings | None = None, *,
               clock: Callable[[], datetime] | None = None) -> FastAPI:
    """Build the application; raise ConfigurationError if it must not start."""
    settings = settings or get_settings()
    clock = clock or (lambda: datetime.now(UTC))
    knowledge = load_knowledge(settings.knowledge_dir)
    templates = load_templates(settings.cards_dir)
    engine = Engine(knowledge, templates, settings)
    check_production(settings)
    store = Store(settings.database, audit_hash_key(settings))
    metrics = Metrics()
    verifier = build_verifier(settings, DatabaseReplayCache(store), metrics)
    fetcher = FhirFetcher(FetchPolicy(
        allowed=FetchPolicy.parse_allowed(settings.fhir_allowed_servers),
        require_https=not settings.is_development,
        timeout_seconds=settings.fhir_timeout_seconds,
        budget_seconds=settings.fhir_budget_seconds, max_pages=settings.fhir_max_pages,
        max_response_bytes=settings.fhir_max_response_bytes,
        without_token=(settings.is_development if settings.fhir_fetch_without_token is None
                       else settings.fhir_fetch_without_token)))
    if verifier is None:
        log.warning("DEVELOPMENT MODE: calls without a JWT are accepted and tokens are not "
                    "verified. Never expose this instance to a network.")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.migrate_on_start:
            try:
                await store.upgrade()
            except StoreUnavailable as exc:
                metrics.db_errors.labels("migrate").inc()
                log.error("database migration failed; hooks still answer",
                          extra={"error": str(exc)})
        audits.start()
        # The FHIR models and knowledge are a large, permanent heap: keep them out of the
        # cyclic garbage collector's full passes (which otherwise stall requests for ~50 ms).
        gc.collect()
        gc.freeze()
        yield
        await audits.stop()
        await fetcher.aclose()
        if verifier is not None:
            await verifier.aclose()
        await store.dispose()
        metrics.close()

    limits = Limits(max_depth=settings.max_json_depth, max_drafts=settings.max_draft_orders,
                    max_codings=settings.max_codings_per_concept,
                    max_code_length=settings.max_code_length)

    show_openapi = settings.env != "production" or settings.openapi_public
    app = FastAPI(title="Lumbar imaging appropriateness CDS service", version="0.1.0",
                  docs_url=None, redoc_url=None, lifespan=lifespan,  # no CDN pages
                  openapi_url="/openapi.json" if show_openapi else None)
    document: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not document:
            document.update(build_openapi(app, SERVICES))
        return document

    app.openapi = openapi  # type: ignore[method-assign]

    def audit_event(kind: str, rows: int, detail: str) -> None:
        """Audit writer events: at most one per batch written or tried, never one per row."""
        metrics.refresh_audit_queue()
        if kind == "written":
            metrics.audit_written.inc(rows)
        elif kind == "dropped":
            metrics.audit_dropped.labels(detail).inc(rows)
            log.error("audit rows dropped", extra={"rows": rows, "reason": detail})
        elif kind == "retrying":
            metrics.db_errors.labels("audit").inc()
            failures = audits.failures
            if failures & (failures - 1) == 0:  # the 1st, 2nd, 4th, 8th... failure in a row
                log.warning("audit rows held: database not writable, retrying", extra={
                    "rows": rows, "error": detail, "attempt": failures})
        elif kind == "resumed":
            log.info("audit writes resumed", extra={"rows": rows})
        elif kind == "fixed":
            metrics.audit_fixed.inc(rows)
            log.info("audit values cut to their column or cleaned of NUL",
                     extra={"rows": rows})

    audits = AuditWriter(store, audit_event, interval=settings.audit_flush_seconds,
                         batch=settings.audit_batch_rows, max_queue=settings.audit_queue_rows,
                         retry_max=settings.audit_retry_max_seconds)
    metrics.watch_audit_queue(audits.pending)
    app.state.services = Services(
        settings=settings, engine=engine, store=store, audits=audits, verifier=verifier,
        fetcher=fetcher, metrics=metrics, clock=clock, limits=limits,
        offered={r["code"]: r["display"] for kind in templates.kinds.values()
                 for r in kind.override_reasons},
        override_systems=override_systems(engine, settings))
    for name in ("settings", "engine", "clock", "verifier", "fetcher", "store", "metrics",
                 "audits"):  # the parts, by name, for tests and tools
        setattr(app.state, name, getattr(app.state.services, name))

    @app.exception_handler(ProtocolError)
    async def _protocol(_: Request, exc: ProtocolError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return outcome_response(exc.status_code, [issue(code, message)],
                                getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return outcome_response(400, [issue("structure", "invalid request")])

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error", extra={"path": request.url.path,
                                             "error": type(exc).__name__})
        return outcome_response(500, [issue("exception", "internal error")])

    app.include_router(router)
    if settings.smart_app_enabled:  # off: no /app/ routes (and no card links)
        app.state.smart = SmartApp(settings, engine, store, clock, audit_hash_key(settings))
        app.include_router(smart_router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes,
                       read_timeout=settings.body_read_timeout_seconds)
    app.add_middleware(CountRequests, metrics=metrics)  # outside: counts 413 and 408 too
    app.add_middleware(  # outermost, so that even a 413 carries the CORS headers
        CORSMiddleware, allow_origins=settings.cors_origin_list,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Content-Type", "Authorization"], max_age=600)
    return app


def __getattr__(name: str) -> Any:
    """``cds_service.app:app`` builds the application from the environment on first use."""
    if name == "app":
        from cds_service.logs import configure_logging

        settings = get_settings()
        configure_logging(settings.log_level, settings.log_json)
        application = create_app(settings)
        globals()["app"] = application
        return application
    raise AttributeError(name)
