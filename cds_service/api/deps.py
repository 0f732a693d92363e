"""What the routes share: their :class:`~cds_service.services.Services`, JSON answers, and the
checks of who calls (the EHR's JWT, a bearer token) and of the body (JSON, parsed once).

They are plain functions the handlers call, not FastAPI dependencies: the hook route is a plain
Starlette route, with no parameters for FastAPI to solve on each call.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from cds_service.errors import ProtocolError
from cds_service.security import AuthError, bearer_token
from cds_service.services import Services

log = logging.getLogger("cds_service.app")


def get_services(request: Request) -> Services:
    """The application's parts (built once by ``create_app``)."""
    found: Services = request.app.state.services
    return found


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def check_bearer(request: Request, token: str) -> None:
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise ProtocolError(401, "login", "authentication failed",
                            headers={"WWW-Authenticate": "Bearer"})


def tenant_of(claims: dict[str, Any] | None) -> str | None:
    """The EHR tenant a verified JWT names (its optional ``tenant`` claim), for the audit."""
    tenant = claims.get("tenant") if claims else None
    return tenant if isinstance(tenant, str) and tenant else None


def require_admin(request: Request, s: Services) -> None:
    """The admin token (CDS_ADMIN_TOKEN); without one configured the endpoint does not exist."""
    if not s.settings.admin_token:
        raise ProtocolError(404, "not-found", "no such endpoint")
    check_bearer(request, s.settings.admin_token)


async def authenticate(request: Request, s: Services) -> dict[str, Any] | None:
    """The calling EHR's JWT (not in development mode): its verified claims (None when no
    token is checked); 401 without detail when refused."""
    try:
        token = bearer_token(request.headers.get("authorization"))
        if s.verifier is None:
            return None
        if token is None:
            raise AuthError("no bearer token")
        if s.settings.public_base_url:
            audience = s.settings.public_base_url.rstrip("/") + request.url.path
        elif s.settings.is_development:  # only here may the Host header name the audience
            audience = str(request.url.replace(query="", fragment=""))
        else:
            raise AuthError("no CDS_PUBLIC_BASE_URL to check aud against")
        # a database outage does not stop this: the replay check falls back to this process
        return await s.verifier.verify(token, audience)
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
