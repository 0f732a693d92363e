"""The CDS Hooks services: discovery and the hook call. A hook call reads as the pipeline it is:

    parse (JSON, limits, model) -> record (prefetch, FHIR fetch) -> rate (facts, decision, cards)
    -> answer (response, metrics, audit)

The handler reaches what it uses through :class:`~cds_service.services.Services`; nothing here
builds clients, reads settings files or imports on the hot path.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

import anyio.to_thread
from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from cds_service.api.deps import (
    authenticate,
    get_services,
    json_response,
    read_json,
    tenant_of,
)
from cds_service.engine import OrderResult, Rated
from cds_service.errors import ProtocolError, issue, outcome_response, validation_issues
from cds_service.limits import Limits, check_request, check_resources
from cds_service.protocol import Discovery, HookRequest, ServiceDescription
from cds_service.record import (
    PREFETCH_TEMPLATES,
    PatientRecord,
    Source,
    SourceState,
    record_from_prefetch,
)
from cds_service.services import Services
from cds_service.settings import Settings
from cds_service.store import CallAudit, CardAudit

log = logging.getLogger("cds_service.app")

# The CDS Hooks version the services implement (discovery ``version``): 3.0.0's obligations on
# a service are met (see docs/integrating.md), and every answer stays one a 2.0 client reads.
SPEC_VERSION = "3.0.0"
# The hook definitions served (discovery ``hookVersion``), from the CDS Hooks hook library:
# order-select 1.0; order-sign 1.1.0, its change log's version that also covers orders re-signed
# after revision (a status other than draft), which the service rates like drafts.
HOOK_VERSIONS = {"order-select": "1.0", "order-sign": "1.1.0"}

SERVICES: dict[str, ServiceDescription] = {
    "lbp-imaging-order-select": ServiceDescription(
        hook="order-select", id="lbp-imaging-order-select",
        title="Lumbar imaging appropriateness (order select)",
        description="Rates a selected lumbar spine imaging order against the ACR "
                    "Appropriateness Criteria for Low Back Pain and suggests the study that "
                    "fits the patient's scenario; returns a PAMA appropriateness rating.",
        prefetch={k: q for k, (_, q) in PREFETCH_TEMPLATES.items()},
        version=SPEC_VERSION, hookVersion=HOOK_VERSIONS["order-select"]),
    "lbp-imaging-order-sign": ServiceDescription(
        hook="order-sign", id="lbp-imaging-order-sign",
        title="Lumbar imaging appropriateness (order sign)",
        description="Rates every draft lumbar spine imaging order at signing (and orders "
                    "re-signed after revision) against the ACR Appropriateness Criteria for "
                    "Low Back Pain; returns PAMA ratings.",
        prefetch={k: q for k, (_, q) in PREFETCH_TEMPLATES.items()},
        version=SPEC_VERSION, hookVersion=HOOK_VERSIONS["order-sign"]),
}


def known_service(service_id: str) -> ServiceDescription:
    described = SERVICES.get(service_id)
    if described is None:
        raise ProtocolError(404, "not-found", f"unknown CDS service '{service_id}'",
                            ["service"])
    return described


async def discovery(request: Request) -> Response:
    await authenticate(request, get_services(request))
    body = Discovery(services=list(SERVICES.values()))
    return json_response(body.model_dump(mode="json", exclude_none=True))


async def hook(request: Request) -> Response:
    service_id: str = request.path_params["service_id"]
    s = get_services(request)
    described = known_service(service_id)  # an unknown service is a 404, ahead of the 401
    tenant = tenant_of(await authenticate(request, s))
    started = time.perf_counter()
    call, size = await parse_hook(request, described, s.limits)
    if isinstance(call, Response):
        return call
    targets = s.engine.imaging_targets(call)  # found once, used by the fetch and the rating
    if not targets:  # nothing to rate: the chart is not even read
        return json_response({"cards": []})
    record, fetch_outcomes = await patient_record(call, s)
    now = s.clock()
    offload = heavy(size, len(targets), record, s.settings)  # keep the event loop free

    async def rate() -> list[Rated]:
        if offload:
            return await anyio.to_thread.run_sync(s.engine.rate, call, record, now, targets)
        return s.engine.rate(call, record, now, targets)

    results = await rate()
    if await saved_answers(call, record, results, fetch_outcomes, s):  # rated with them
        results = await rate()
    return await answer(service_id, call, record, results, fetch_outcomes, s, now, started,
                        offload, tenant)


PER_ORDER_COST = 100  # an order's own work (facts, decision, card), in record resources


def heavy(size: int, orders: int, record: PatientRecord, settings: Settings) -> bool:
    """Whether a call is evaluated in a worker thread: a large body, or an estimated cost
    (orders x (record resources + an order's own work)) at least ``offload_cost``. Two hundred
    drafts against a 300-condition chart is a small body and a long evaluation."""
    resources = sum(len(source.resources) for source in record.sources().values())
    return (size >= settings.offload_body_bytes
            or orders * (resources + PER_ORDER_COST) >= settings.offload_cost)


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
                                           auth.access_token if auth else None,
                                           scope=auth.scope if auth else None)
        outcomes = fetched.outcomes
        drop_over_limits(record, outcomes, s.limits)
        for outcome in outcomes.values():  # counted whatever the answer
            s.metrics.fetches.labels(outcome).inc()
    return record, outcomes


async def saved_answers(call: HookRequest, record: PatientRecord, rated: list[Rated],
                        outcomes: dict[str, str], s: Services) -> bool:
    """The clinician's saved answers, read from the FHIR server with one search when the
    prefetch lacks them and the answer would otherwise ask questions (the SMART app saves them
    there; an EHR need not prefetch them): True when any came."""
    key = "questionnaireresponses"
    if (record.questionnaire_responses.state is SourceState.COMPLETE or key in outcomes
            or not call.fhirServer):
        return False  # received, already asked for with the rest, or nowhere to ask
    if not any(s.engine.questions.for_facts(r.decision.deciding) for r in rated):
        return False  # nothing would be asked: the answers change nothing
    auth = call.fhirAuthorization
    fetched = await s.fetcher.complete(record, call.fhirServer,
                                       auth.access_token if auth else None, keys=[key],
                                       scope=auth.scope if auth else None)
    outcomes.update(fetched.outcomes)
    drop_over_limits(record, outcomes, s.limits)
    for outcome in fetched.outcomes.values():
        s.metrics.fetches.labels(outcome).inc()
    return bool(record.questionnaire_responses.resources)


def drop_over_limits(record: PatientRecord, outcomes: dict[str, str], limits: Limits) -> None:
    """A fetched source over the request limits is not used (its facts stay unknown)."""
    for key, source in record.sources().items():
        if outcomes.get(key) in (None, "not-allowed", "no-server", "no-token", "not-granted"):
            continue
        if source.resources and check_resources(key, source.resources, limits):
            record.replace_source(key, Source(SourceState.MISSING, note="over limits"))
            outcomes[key] = "over-limits"


async def answer(service_id: str, call: HookRequest, record: PatientRecord,
                 rated: list[Rated], fetch_outcomes: dict[str, str], s: Services,
                 now: datetime, started: float, offload: bool = False,
                 tenant: str | None = None) -> Response:
    """Answer: 412 when an order cannot be rated without what is missing; else the cards and
    ratings, counted in the metrics and queued for the audit."""
    missing = record.missing_keys()
    if missing and any(not r.decision.determinate for r in rated):
        log.info("undecidable without data", extra={
            "hookInstance": call.hookInstance, "missing": missing, "fetch": fetch_outcomes})
        return outcome_response(412, [issue(
            "incomplete", missing_prefetch(missing, fetch_outcomes),
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
        s.audits.submit(audit_row(service_id, call, results, elapsed * 1000, now, tenant))
    log.info("hook evaluated", extra={
        "hookInstance": call.hookInstance, "hook": call.hook, "service": service_id,
        "cards": len(said.cards), "ratings": len(said.actions), "missing": missing,
        "fetch": fetch_outcomes, "ms": round(elapsed * 1000, 2)})
    return json_response(said.body())


def missing_prefetch(missing: list[str], fetch_outcomes: dict[str, str]) -> str:
    """The 412's diagnostics: each missing prefetch key by name, its query, and why the FHIR
    server did not supply it (as CDS Hooks 3.0's example names the key)."""
    named = [f"'{k}' ({PREFETCH_TEMPLATES[k][1]}; "
             f"fetch: {fetch_outcomes.get(k, 'not tried')})" if k in PREFETCH_TEMPLATES
             else f"'{k}'" for k in missing]
    return (f"prefetch key{'s' if len(missing) > 1 else ''} {', '.join(named)} needed to rate "
            "the order: missing from the request and not fetched from the FHIR server")


def audit_row(service_id: str, request: HookRequest, results: list[OrderResult],
              latency_ms: float, created_at: datetime, tenant: str | None = None) -> CallAudit:
    """What the audit keeps of a call (the store hashes the patient and order ids; the EHR
    tenant its JWT named is kept as named)."""
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
        cards=cards, latency_ms=round(latency_ms, 3), created_at=created_at, tenant=tenant)
