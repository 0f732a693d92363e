"""The HTTP routes. A hook call reads as the pipeline it is:

    parse (JSON, limits, model) -> record (prefetch, FHIR fetch) -> rate (facts, decision, cards)
    -> answer (response, metrics, audit)

The routes reach what they use through :class:`Services` (built once by ``create_app`` and kept
on ``app.state.services``); nothing here builds clients, reads settings files or imports on the
hot path.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio.to_thread
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.routing import Route

from cds_service.codesystems import PATH, search_bundle
from cds_service.engine import Engine, OrderResult, Rated
from cds_service.errors import ProtocolError, issue, outcome_response, validation_issues
from cds_service.limits import Limits, check_request, check_resources
from cds_service.metrics import Metrics
from cds_service.protocol import (
    Discovery,
    Feedback,
    HookRequest,
    ServiceDescription,
)
from cds_service.questionnaire import QUESTIONNAIRE_PATH
from cds_service.record import PREFETCH_TEMPLATES, PatientRecord, record_from_prefetch
from cds_service.record.fetch import FhirFetcher
from cds_service.record.prefetch import SOURCE_ATTRS, Source, SourceState
from cds_service.report import build_report, parse_day, render_html
from cds_service.security import AuthError, JwtVerifier, bearer_token
from cds_service.settings import Settings
from cds_service.store import (
    AuditWriter,
    CallAudit,
    CardAudit,
    FeedbackRecord,
    InvalidValue,
    Store,
    StoreUnavailable,
    column_length,
)

log = logging.getLogger("cds_service.app")
router = APIRouter()

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
# Where an InvalidValue of a stored feedback field is in the request body.
FEEDBACK_FIELDS = {"card": "card", "outcome_timestamp": "outcomeTimestamp",
                   "accepted_suggestions": "acceptedSuggestions",
                   "user_comment": "overrideReason.userComment",
                   "override_system": "overrideReason.reason.system",
                   "override_code": "overrideReason.reason.code",
                   "override_display": "overrideReason.reason.display"}


@dataclass
class Services:
    """What the routes use, built once per application."""

    settings: Settings
    engine: Engine
    store: Store
    audits: AuditWriter
    verifier: JwtVerifier | None
    fetcher: FhirFetcher
    metrics: Metrics
    clock: Callable[[], datetime]
    limits: Limits
    # override reason code -> the display the cards offer (feedback may name one by code alone)
    offered: dict[str, str] = field(default_factory=dict)
    # the override-reason systems of our cards: today's and those of former canonical bases
    override_systems: frozenset[str] = frozenset()


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


# ------------------------------------------------------------------ checks shared by the routes


def check_bearer(request: Request, token: str) -> None:
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise ProtocolError(401, "login", "authentication failed",
                            headers={"WWW-Authenticate": "Bearer"})


def admin(request: Request, s: Services) -> None:
    if not s.settings.admin_token:
        raise ProtocolError(404, "not-found", "no such endpoint")
    check_bearer(request, s.settings.admin_token)


async def authenticate(request: Request, s: Services) -> None:
    """The calling EHR's JWT (not in development mode); 401 without detail when refused."""
    try:
        token = bearer_token(request.headers.get("authorization"))
        if s.verifier is None:
            return
        if token is None:
            raise AuthError("no bearer token")
        if s.settings.public_base_url:
            audience = s.settings.public_base_url.rstrip("/") + request.url.path
        elif s.settings.is_development:  # only here may the Host header name the audience
            audience = str(request.url.replace(query="", fragment=""))
        else:
            raise AuthError("no CDS_PUBLIC_BASE_URL to check aud against")
        # a database outage does not stop this: the replay check falls back to this process
        await s.verifier.verify(token, audience)
    except AuthError as exc:
        log.info("authentication refused", extra={"reason": str(exc), "path": request.url.path})
        raise ProtocolError(401, "login", "authentication failed",
                            headers={"WWW-Authenticate": "Bearer"}) from None


async def read_json(request: Request) -> tuple[Any, int]:
    """The parsed body (parsed once) and its size in bytes."""
    body = await request.body()
    if not body:
        raise ProtocolError(400, "structure", "request body is empty")
    try:
        return orjson.loads(body), len(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(400, "structure", f"malformed JSON: {exc}") from None


def known_service(service_id: str) -> ServiceDescription:
    described = SERVICES.get(service_id)
    if described is None:
        raise ProtocolError(404, "not-found", f"unknown CDS service '{service_id}'",
                            ["service"])
    return described


# ------------------------------------------------------------------ small routes


@router.get("/healthz")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/cds-services")
async def discovery(request: Request) -> Response:
    await authenticate(request, services(request))
    body = Discovery(services=list(SERVICES.values()))
    return json_response(body.model_dump(mode="json", exclude_none=True))


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    s = services(request)
    problem = await s.store.writable()  # a read-only database is not ready either
    knowledge = bool(s.engine.knowledge.procedures)
    ok = problem is None and knowledge
    body: dict[str, Any] = {"status": "ready" if ok else "not ready",
                            "database": problem is None, "knowledge": knowledge}
    if problem:
        body["reason"] = problem
    return json_response(body, 200 if ok else 503)


@router.get("/metrics")
async def metrics_endpoint(request: Request) -> Response:
    s = services(request)
    if s.settings.metrics_token:
        check_bearer(request, s.settings.metrics_token)
    elif s.settings.env == "production":
        raise ProtocolError(404, "not-found", "no such endpoint (set CDS_METRICS_TOKEN)")
    return Response(s.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/admin/report")
async def report(request: Request, start: str | None = None, end: str | None = None,
                 service: str | None = None) -> Response:
    s = services(request)
    admin(request, s)
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
        await s.audits.flush()
    except StoreUnavailable:
        pass  # not writable (read-only?): report what is stored; the queue is kept
    try:
        cards, feedback_rows, latest = await s.store.rows(since, until, service)
    except InvalidValue:
        raise ProtocolError(400, "value", "a filter value cannot be used",
                            ["start", "end", "service"]) from None
    except StoreUnavailable:
        s.metrics.db_errors.labels("report").inc()
        raise ProtocolError(503, "transient", "database unavailable",
                            headers={"Retry-After": "5"}) from None
    body = build_report(cards, feedback_rows, since, until, service, latest)
    if "application/json" in request.headers.get("accept", ""):
        return json_response(body)
    return Response(render_html(body), media_type="text/html; charset=utf-8")


# ------------------------------------------------------------------ the code systems


def fhir_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/fhir+json")


@router.get(f"{PATH}/{{cs_id}}")
async def code_system(cs_id: str, request: Request) -> Response:
    """One of the service's code systems, at its canonical URL (public, like a terminology)."""
    found = services(request).engine.code_systems.get(cs_id)
    if found is None:
        raise ProtocolError(404, "not-found", f"no CodeSystem '{cs_id}' here", ["id"])
    return fhir_response(found)


@router.get(f"{QUESTIONNAIRE_PATH}/{{q_id}}")
async def questionnaire(q_id: str, request: Request) -> Response:
    """The Questionnaire of the questions that decide a rating (what the SMART app asks)."""
    found = services(request).engine.questionnaire
    if q_id != found["id"]:
        raise ProtocolError(404, "not-found", f"no Questionnaire '{q_id}' here", ["id"])
    return fhir_response(found)


@router.get(PATH)
async def code_system_search(request: Request, url: str | None = None) -> Response:
    s = services(request)
    return fhir_response(search_bundle(s.engine.code_systems, s.settings.canonical_root, url))


# ------------------------------------------------------------------ the hook call


async def hook(request: Request) -> Response:
    service_id: str = request.path_params["service_id"]
    s = services(request)
    described = known_service(service_id)
    await authenticate(request, s)
    started = time.perf_counter()
    call, size = await parse_hook(request, described, s.limits)
    if isinstance(call, Response):
        return call
    targets = s.engine.imaging_targets(call)  # found once, used by the fetch and the rating
    if not targets:  # nothing to rate: the chart is not even read
        return json_response({"cards": []})
    record, fetch_outcomes = await patient_record(call, s)
    now = s.clock()
    offload = size >= s.settings.offload_body_bytes  # keep the event loop free for other calls
    if offload:
        results = await anyio.to_thread.run_sync(s.engine.rate, call, record, now, targets)
    else:
        results = s.engine.rate(call, record, now, targets)
    return await answer(service_id, call, record, results, fetch_outcomes, s, now, started,
                        offload)


async def parse_hook(request: Request, described: ServiceDescription,
                     limits: Limits) -> tuple[HookRequest | Response, int]:
    """Parse: the body once, the service's hook, the cost limits, the CDS Hooks model."""
    data, size = await read_json(request)
    if not isinstance(data, dict):
        raise ProtocolError(400, "structure", "request body must be a JSON object")
    name = data.get("hook")
    if isinstance(name, str) and name != described.hook:
        raise ProtocolError(400, "not-supported",
                            f"hook '{name}' is not served by '{described.id}' "
                            f"(it serves '{described.hook}')", ["hook"])
    over = check_request(data, limits)
    if over:
        raise ProtocolError(413, "too-costly", over.message, [over.where])
    try:
        return HookRequest.model_validate(data), size
    except ValidationError as exc:
        return outcome_response(400, validation_issues(exc)), size


async def patient_record(call: HookRequest,
                         s: Services) -> tuple[PatientRecord, dict[str, str]]:
    """Record: the prefetch, and from the FHIR server what it lacks (when an order needs it)."""
    record = record_from_prefetch(call.prefetch, call.context.patientId)
    for key, source in record.sources().items():
        over = check_resources(key, source.resources, s.limits)
        if over:
            raise ProtocolError(413, "too-costly", over.message, [over.where])
    outcomes: dict[str, str] = {}
    if record.missing_keys():  # (the hook has an imaging order to rate)
        auth = call.fhirAuthorization
        fetched = await s.fetcher.complete(record, call.fhirServer,
                                           auth.access_token if auth else None)
        outcomes = fetched.outcomes
        drop_over_limits(record, outcomes, s.limits)
        for outcome in outcomes.values():  # counted whatever the answer
            s.metrics.fetches.labels(outcome).inc()
    return record, outcomes


def drop_over_limits(record: PatientRecord, outcomes: dict[str, str], limits: Limits) -> None:
    """A fetched source over the request limits is not used (its facts stay unknown)."""
    for key, source in record.sources().items():
        if outcomes.get(key) in (None, "not-allowed", "no-server", "no-token"):
            continue
        if source.resources and check_resources(key, source.resources, limits):
            setattr(record, SOURCE_ATTRS[key], Source(SourceState.MISSING, note="over limits"))
            outcomes[key] = "over-limits"


async def answer(service_id: str, call: HookRequest, record: PatientRecord,
                 rated: list[Rated], fetch_outcomes: dict[str, str], s: Services,
                 now: datetime, started: float, offload: bool = False) -> Response:
    """Answer: 412 when an order cannot be rated without what is missing; else the cards and
    ratings, counted in the metrics and queued for the audit."""
    missing = record.missing_keys()
    if missing and any(not r.decision.determinate for r in rated):
        log.info("undecidable without data", extra={
            "hookInstance": call.hookInstance, "missing": missing, "fetch": fetch_outcomes})
        return outcome_response(412, [issue(
            "incomplete", "prefetch data needed to rate the order is missing and could not "
            f"be fetched from the FHIR server: {', '.join(missing)}",
            [f"prefetch.{k}" for k in missing])])
    said = (await anyio.to_thread.run_sync(s.engine.answer, rated) if offload
            else s.engine.answer(rated))
    results = said.orders
    for r in results:
        for kind, card in zip(r.kinds, r.cards, strict=True):
            s.metrics.cards.labels(kind, card.indicator).inc()
        if r.decision.pama:
            s.metrics.ratings.labels(r.decision.pama).inc()
    elapsed = time.perf_counter() - started
    s.metrics.latency.labels(call.hook).observe(elapsed)
    if results:
        s.audits.submit(audit_row(service_id, call, results, elapsed * 1000, now))
    log.info("hook evaluated", extra={
        "hookInstance": call.hookInstance, "hook": call.hook, "service": service_id,
        "cards": len(said.cards), "ratings": len(said.actions), "missing": missing,
        "fetch": fetch_outcomes, "ms": round(elapsed * 1000, 2)})
    return json_response(said.body())


def audit_row(service_id: str, request: HookRequest, results: list[OrderResult],
              latency_ms: float, created_at: datetime) -> CallAudit:
    """What the audit keeps of a call (the store hashes the patient and order ids)."""
    variants = next((r.decision.variants for r in results if r.decision.variants), None)
    cards = []
    for r in results:
        for kind, card in zip(r.kinds, r.cards, strict=True):
            cards.append(CardAudit(
                uuid=card.uuid, kind=kind, indicator=card.indicator, procedure=r.procedure.id,
                pama=r.decision.pama, category=r.decision.category,
                suggestions=[sg.uuid for sg in card.suggestions or []],
                order_id=str(r.order.get("id") or "")))
    return CallAudit(
        service_id=service_id, hook=request.hook, hook_instance=request.hookInstance,
        patient_id=request.context.patientId,
        scenario="+".join(sorted(variants)) if variants else None,
        orders=[{"procedure": r.procedure.id, "pama": r.decision.pama,
                 "category": r.decision.category, "order_id": str(r.order.get("id") or ""),
                 "variants": sorted(r.decision.variants or [])} for r in results],
        cards=cards, latency_ms=round(latency_ms, 3), created_at=created_at)


# ------------------------------------------------------------------ feedback


async def feedback(request: Request) -> Response:
    service_id: str = request.path_params["service_id"]
    s = services(request)
    known_service(service_id)
    await authenticate(request, s)
    data, _ = await read_json(request)
    items = data.get("feedback") if isinstance(data, dict) else None
    if isinstance(items, list) and len(items) > s.settings.feedback_max_items:
        raise ProtocolError(413, "too-costly", f"at most {s.settings.feedback_max_items} "
                            "feedback items per request; send the rest in further requests",
                            ["feedback"])
    try:
        parsed = Feedback.model_validate(data)
    except ValidationError as exc:
        return outcome_response(400, validation_issues(exc))
    records = [feedback_record(f, s) for f in parsed.feedback]
    try:
        await s.audits.flush()  # the cards this feedback is about are written first
        counts = await s.store.store_feedback(service_id, records)
    except InvalidValue as exc:  # can never be stored: retrying would not help
        where = "feedback" if exc.index is None else f"feedback.{exc.index}"
        path = FEEDBACK_FIELDS.get(exc.field or "")
        where = f"{where}.{path}" if path else where
        raise ProtocolError(400, "value", f"{where}: {exc}", [where]) from None
    except StoreUnavailable as exc:
        s.metrics.db_errors.labels("feedback").inc()
        log.warning("feedback not stored; asked the client to retry",
                    extra={"service": service_id, "error": str(exc)})
        raise ProtocolError(503, "transient", "feedback could not be stored; retry later",
                            headers={"Retry-After": "5"}) from None
    for f in parsed.feedback:
        s.metrics.feedback.labels(f.outcome).inc()
    log.info("feedback stored", extra={"service": service_id, **counts})
    return json_response(counts)


def feedback_record(item: Any, s: Services) -> FeedbackRecord:
    """A feedback item as stored; an override reason named by code alone gets the display
    the service offered (when it is one of ours)."""
    reason = item.overrideReason.reason if item.overrideReason else None
    display = None
    if reason is not None:
        ours = reason.system is None or reason.system in s.override_systems
        display = reason.display or (s.offered.get(reason.code) if ours else None)
    return FeedbackRecord(
        card=item.card, outcome=item.outcome, outcome_timestamp=item.outcomeTimestamp,
        accepted_suggestions=[a.id for a in item.acceptedSuggestions or []],
        override_system=reason.system if reason else None,
        override_code=reason.code if reason else None,
        override_display=str(display) if display else None,
        user_comment=item.overrideReason.userComment if item.overrideReason else None)


# The hook call and its feedback are plain routes, matched before the others: nearly all traffic
# is theirs, and they read their own bodies (no parameters for FastAPI to solve on each call).
# openapi.py describes them.
router.routes[:0] = [
    Route("/cds-services/{service_id}", hook, methods=["POST"], name="hook"),
    Route("/cds-services/{service_id}/feedback", feedback, methods=["POST"], name="feedback"),
]
