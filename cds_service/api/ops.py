"""Operations: liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response

from cds_service.api.deps import check_bearer, get_services, json_response
from cds_service.errors import ProtocolError


async def healthz() -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    s = get_services(request)
    problem = await s.store.writable()  # a read-only database is not ready either
    knowledge = bool(s.engine.knowledge.procedures)
    ok = problem is None and knowledge
    body: dict[str, Any] = {"status": "ready" if ok else "not ready",
                            "database": problem is None, "knowledge": knowledge}
    if problem:
        body["reason"] = problem
    return json_response(body, 200 if ok else 503)


async def metrics_endpoint(request: Request) -> Response:
    s = get_services(request)
    if s.settings.metrics_token:
        check_bearer(request, s.settings.metrics_token)
    elif s.settings.env == "production":
        raise ProtocolError(404, "not-found", "no such endpoint (set CDS_METRICS_TOKEN)")
    return Response(s.metrics.render(), media_type="text/plain; version=0.0.4")
