"""The feedback report for administrators (guarded by CDS_ADMIN_TOKEN)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from cds_service.api.deps import get_services, json_response, require_admin
from cds_service.errors import ProtocolError
from cds_service.report import build_report, parse_day, render_html
from cds_service.store import InvalidValue, StoreUnavailable, column_length


async def report(request: Request, start: str | None = None, end: str | None = None,
                 service: str | None = None) -> Response:
    s = get_services(request)
    require_admin(request, s)
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
    body = build_report(cards, feedback_rows, since, until, service, latest,
                        s.reasons.category)
    if "application/json" in request.headers.get("accept", ""):
        return json_response(body)
    return Response(render_html(body), media_type="text/html; charset=utf-8")
