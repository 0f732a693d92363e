"""The FastAPI application: discovery, the two hook services, feedback, health.

Routes stay thin: parse, authenticate, build the patient record, call the engine, serialise.
``create_app()`` is the factory (tests pass their own settings and clock); ``app`` is created on
first access so that ``uvicorn cds_service.app:app`` works and importing the module does not.
"""

from __future__ import annotations

import gc
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.to_thread
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cds_service.engine import Engine, OrderResult
from cds_service.errors import (
    ProtocolError,
    error_response,
    issue,
    outcome_response,
    validation_issues,
)
from cds_service.knowledge import load_knowledge
from cds_service.limits import Limits, check_request, check_resources
from cds_service.metrics import Metrics
from cds_service.openapi import build_openapi
from cds_service.protocol import (
    Discovery,
    Feedback,
    HookRequest,
    ServiceDescription,
    ServiceResponse,
)
from cds_service.record import PREFETCH_TEMPLATES, PatientRecord, record_from_prefetch
from cds_service.record.fetch import FetchPolicy, FhirFetcher
from cds_service.record.prefetch import SOURCE_ATTRS, Source, SourceState
from cds_service.render import load_templates
from cds_service.report import build_report, parse_day, render_html
from cds_service.security import (
    AuthError,
    FallbackReplayStore,
    JwtVerifier,
    ReplayStore,
    bearer_token,
    load_trusted_issuers,
    public_base_url_problem,
)
from cds_service.settings import Settings, get_settings
from cds_service.store import (
    AuditWriter,
    CallAudit,
    CardAudit,
    DatabaseReplayCache,
    FeedbackRecord,
    InvalidValue,
    Store,
    StoreUnavailable,
    column_length,
)

log = logging.getLogger("cds_service.app")

SERVICES: dict[str, ServiceDescription] = {
    "lbp-imaging-order-select": ServiceDescription(
        hook="order-select", id="lbp-imaging-order-select",
        title="Lumbar imaging appropriateness (order select)",
        description="Rates a selected lumbar spine imaging order against the ACR "
                    "Appropriateness Criteria for Low Back Pain and suggests the study that "
                    "fits the patient's scenario; returns a PAMA appropriateness rating.",
        prefetch={k: q for k, (_, q) in PREFETCH_TEMPLATES.items()}),
    "lbp-imaging-order-sign": ServiceDescription(
        hook="order-sign", id="lbp-imaging-order-sign",
        title="Lumbar imaging appropriateness (order sign)",
        description="Rates every draft lumbar spine imaging order at signing against the ACR "
                    "Appropriateness Criteria for Low Back Pain; returns PAMA ratings.",
        prefetch={k: q for k, (_, q) in PREFETCH_TEMPLATES.items()}),
}


class ConfigurationError(RuntimeError):
    """The service cannot start with this configuration."""


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


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
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()


def check_production(settings: Settings) -> None:
    """Outside development mode, name every secret setting that is missing, then refuse a
    trusted-issuer file that cannot be used (or has an http JWKS URL) and a missing or
    non-https CDS_PUBLIC_BASE_URL (the JWT audience is built from it, never from Host)."""
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


def drop_over_limits(record: PatientRecord, outcomes: dict[str, str], limits: Limits) -> None:
    """A fetched source over the request limits is not used (its facts stay unknown)."""
    for key, source in record.sources().items():
        if outcomes.get(key) in (None, "not-allowed", "no-server"):
            continue
        if source.resources and check_resources(key, source.resources, limits):
            setattr(record, SOURCE_ATTRS[key], Source(SourceState.MISSING, note="over limits"))
            outcomes[key] = "over-limits"


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


def _audit(service_id: str, request: HookRequest, results: list[OrderResult],
           latency_ms: float, created_at: datetime) -> CallAudit:
    variants = next((r.decision.variants for r in results if r.decision.variants), None)
    cards = []
    for r in results:
        for kind, card in zip(r.kinds, r.cards, strict=True):
            cards.append(CardAudit(
                uuid=card.uuid, kind=kind, indicator=card.indicator, procedure=r.procedure.id,
                pama=r.decision.pama, category=r.decision.category,
                suggestions=[s.uuid for s in card.suggestions or []],
                order_id=str(r.order.get("id") or "")))
    return CallAudit(
        service_id=service_id, hook=request.hook, hook_instance=request.hookInstance,
        patient_id=request.context.patientId,
        scenario="+".join(sorted(variants)) if variants else None,
        orders=[{"procedure": r.procedure.id, "pama": r.decision.pama,
                 "category": r.decision.category, "order_id": str(r.order.get("id") or ""),
                 "variants": sorted(r.decision.variants or [])} for r in results],
        cards=cards, latency_ms=round(latency_ms, 3), created_at=created_at)


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
    app.state.settings = settings
    app.state.engine = engine
    app.state.clock = clock
    app.state.verifier = verifier
    app.state.fetcher = fetcher
    app.state.store = store
    app.state.metrics = metrics

    def audit_failed(kind: str, rows: int, detail: str) -> None:
        """Audit writer events: at most one per batch written or tried, never one per row."""
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

    audits = AuditWriter(store, audit_failed, interval=settings.audit_flush_seconds,
                         batch=settings.audit_batch_rows, max_queue=settings.audit_queue_rows,
                         retry_max=settings.audit_retry_max_seconds)
    metrics.audit_queue.set_function(audits.pending)
    app.state.audits = audits

    # The override reasons the cards offer: feedback naming one by code alone (as the sandbox
    # sends it) is stored with the display the service offered.
    offered = {r["code"]: r["display"] for kind in templates.kinds.values()
               for r in kind.override_reasons}

    def offered_display(reason: Any) -> str | None:
        if reason.display:
            return str(reason.display)
        ours = reason.system in (None, templates.override_system)
        return offered.get(reason.code) if ours else None

    def admin(request: Request) -> None:
        token = settings.admin_token
        if not token:
            raise ProtocolError(404, "not-found", "no such endpoint")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ProtocolError(401, "login", "authentication failed",
                                headers={"WWW-Authenticate": "Bearer"})

    async def authenticate(request: Request) -> None:
        try:
            token = bearer_token(request.headers.get("authorization"))
            if verifier is None:
                return
            if token is None:
                raise AuthError("no bearer token")
            if settings.public_base_url:
                audience = settings.public_base_url.rstrip("/") + request.url.path
            elif settings.is_development:  # only here may the Host header name the audience
                audience = str(request.url.replace(query="", fragment=""))
            else:
                raise AuthError("no CDS_PUBLIC_BASE_URL to check aud against")
            # a database outage does not stop this: the replay check falls back to this process
            await verifier.verify(token, audience)
        except AuthError as exc:
            log.info("authentication refused", extra={"reason": str(exc),
                                                      "path": request.url.path})
            raise ProtocolError(401, "login", "authentication failed",
                                headers={"WWW-Authenticate": "Bearer"}) from None

    async def read_json(request: Request) -> Any:
        body = await request.body()
        if not body:
            raise ProtocolError(400, "structure", "request body is empty")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(400, "structure", f"malformed JSON: {exc}") from None

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

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/cds-services")
    async def discovery(request: Request) -> Response:
        await authenticate(request)
        body = Discovery(services=list(SERVICES.values()))
        return _json(body.model_dump(mode="json", exclude_none=True))

    @app.get("/readyz")
    async def readyz() -> Response:
        problem = await store.writable()  # a read-only database is not ready either
        knowledge = bool(engine.knowledge.procedures)
        ok = problem is None and knowledge
        body: dict[str, Any] = {"status": "ready" if ok else "not ready",
                                "database": problem is None, "knowledge": knowledge}
        if problem:
            body["reason"] = problem
        return _json(body, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        token = settings.metrics_token
        if token:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise ProtocolError(401, "login", "authentication failed",
                                    headers={"WWW-Authenticate": "Bearer"})
        elif settings.env == "production":
            raise ProtocolError(404, "not-found", "no such endpoint (set CDS_METRICS_TOKEN)")
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/admin/report")
    async def report(request: Request, start: str | None = None, end: str | None = None,
                     service: str | None = None) -> Response:
        admin(request)
        try:
            since, until = parse_day(start), parse_day(end)
        except ValueError:
            raise ProtocolError(400, "value", "start and end must be ISO dates",
                                ["start", "end"]) from None
        limit = column_length("service_id", "card") or 0
        if service is not None and ("\x00" in service or len(service) > limit):
            raise ProtocolError(400, "value", f"service must be a service id (at most {limit} "
                                "characters, no NUL)", ["service"])
        try:
            await audits.flush()
        except StoreUnavailable:
            pass  # not writable (read-only?): report what is stored; the queue is kept
        try:
            cards, feedback, latest = await store.rows(since, until, service)
        except InvalidValue:
            raise ProtocolError(400, "value", "a filter value cannot be used",
                                ["start", "end", "service"]) from None
        except StoreUnavailable:
            metrics.db_errors.labels("report").inc()
            raise ProtocolError(503, "transient", "database unavailable",
                                headers={"Retry-After": "5"}) from None
        body = build_report(cards, feedback, since, until, service, latest)
        if "application/json" in request.headers.get("accept", ""):
            return _json(body)
        return Response(render_html(body), media_type="text/html; charset=utf-8")

    @app.post("/cds-services/{service_id}")
    async def service(service_id: str, request: Request) -> Response:
        described = SERVICES.get(service_id)
        if described is None:
            raise ProtocolError(404, "not-found", f"unknown CDS service '{service_id}'",
                                ["service"])
        await authenticate(request)
        started = time.perf_counter()
        data = await read_json(request)
        size = len(await request.body())
        if not isinstance(data, dict):
            raise ProtocolError(400, "structure", "request body must be a JSON object")
        hook = data.get("hook")
        if isinstance(hook, str) and hook != described.hook:
            raise ProtocolError(400, "not-supported",
                                f"hook '{hook}' is not served by '{service_id}' "
                                f"(it serves '{described.hook}')", ["hook"])
        over = check_request(data, limits)
        if over:
            raise ProtocolError(413, "too-costly", over.message, [over.where])
        try:
            hook_request = HookRequest.model_validate(data)
        except ValidationError as exc:
            return outcome_response(400, validation_issues(exc))
        record = record_from_prefetch(hook_request.prefetch, hook_request.context.patientId)
        for key, source in record.sources().items():
            over = check_resources(key, source.resources, limits)
            if over:
                raise ProtocolError(413, "too-costly", over.message, [over.where])
        fetch_outcomes: dict[str, str] = {}
        if record.missing_keys() and engine.imaging_targets(hook_request):
            auth = hook_request.fhirAuthorization
            report = await fetcher.complete(record, hook_request.fhirServer,
                                            auth.access_token if auth else None)
            fetch_outcomes = report.outcomes
            drop_over_limits(record, fetch_outcomes, limits)
            for outcome in fetch_outcomes.values():  # counted whatever the answer
                metrics.fetches.labels(outcome).inc()
        now = clock()
        if size >= settings.offload_body_bytes:  # keep the event loop free for other calls
            results = await anyio.to_thread.run_sync(engine.rate, hook_request, record, now)
        else:
            results = engine.rate(hook_request, record, now)
        missing = record.missing_keys()
        if missing and any(not r.decision.determinate for r in results):
            log.info("undecidable without data", extra={
                "hookInstance": hook_request.hookInstance, "missing": missing,
                "fetch": fetch_outcomes})
            return outcome_response(412, [issue(
                "incomplete", "prefetch data needed to rate the order is missing and could not "
                f"be fetched from the FHIR server: {', '.join(missing)}",
                [f"prefetch.{k}" for k in missing])])
        cards, actions = engine.respond(results)
        for r in results:
            for kind, card in zip(r.kinds, r.cards, strict=True):
                metrics.cards.labels(kind, card.indicator).inc()
            if r.decision.pama:
                metrics.ratings.labels(r.decision.pama).inc()
        elapsed = time.perf_counter() - started
        metrics.latency.labels(hook_request.hook).observe(elapsed)
        if results:
            audits.submit(_audit(service_id, hook_request, results, elapsed * 1000, now))
        response = ServiceResponse(cards=cards, systemActions=actions or None).to_json()
        if actions:  # the sandbox reads the older Argonaut location: same actions, dumped once
            response["extension"] = {"systemActions": response["systemActions"]}
        log.info("hook evaluated", extra={
            "hookInstance": hook_request.hookInstance, "hook": hook_request.hook,
            "service": service_id, "cards": len(cards), "ratings": len(actions),
            "missing": missing, "fetch": fetch_outcomes,
            "ms": round(elapsed * 1000, 2)})
        return _json(response)

    @app.post("/cds-services/{service_id}/feedback")
    async def feedback(service_id: str, request: Request) -> Response:
        if service_id not in SERVICES:
            raise ProtocolError(404, "not-found", f"unknown CDS service '{service_id}'",
                                ["service"])
        await authenticate(request)
        data = await read_json(request)
        items = data.get("feedback") if isinstance(data, dict) else None
        if isinstance(items, list) and len(items) > settings.feedback_max_items:
            raise ProtocolError(413, "too-costly", f"at most {settings.feedback_max_items} "
                                "feedback items per request; send the rest in further requests",
                                ["feedback"])
        try:
            parsed = Feedback.model_validate(data)
        except ValidationError as exc:
            return outcome_response(400, validation_issues(exc))
        records = [FeedbackRecord(
            card=f.card, outcome=f.outcome, outcome_timestamp=f.outcomeTimestamp,
            accepted_suggestions=[a.id for a in f.acceptedSuggestions or []],
            override_system=f.overrideReason.reason.system
            if f.overrideReason and f.overrideReason.reason else None,
            override_code=f.overrideReason.reason.code
            if f.overrideReason and f.overrideReason.reason else None,
            override_display=offered_display(f.overrideReason.reason)
            if f.overrideReason and f.overrideReason.reason else None,
            user_comment=f.overrideReason.userComment if f.overrideReason else None)
            for f in parsed.feedback]
        try:
            await audits.flush()  # the cards this feedback is about are written first
            counts = await store.store_feedback(service_id, records)
        except InvalidValue as exc:  # can never be stored: retrying would not help
            where = "feedback" if exc.index is None else f"feedback.{exc.index}"
            path = {"card": "card", "outcome_timestamp": "outcomeTimestamp",
                    "accepted_suggestions": "acceptedSuggestions",
                    "user_comment": "overrideReason.userComment",
                    "override_system": "overrideReason.reason.system",
                    "override_code": "overrideReason.reason.code",
                    "override_display": "overrideReason.reason.display"}.get(exc.field or "")
            where = f"{where}.{path}" if path else where
            raise ProtocolError(400, "value", f"{where}: {exc}", [where]) from None
        except StoreUnavailable as exc:
            metrics.db_errors.labels("feedback").inc()
            log.warning("feedback not stored; asked the client to retry",
                        extra={"service": service_id, "error": str(exc)})
            raise ProtocolError(503, "transient", "feedback could not be stored; retry later",
                                headers={"Retry-After": "5"}) from None
        for f in parsed.feedback:
            metrics.feedback.labels(f.outcome).inc()
        log.info("feedback stored", extra={"service": service_id, **counts})
        return _json(counts)

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
