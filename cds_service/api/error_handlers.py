"""Every error the application answers is a FHIR OperationOutcome: a client error raised as
:class:`~cds_service.errors.ProtocolError`, an unknown endpoint or method, an invalid
parameter, and (logged, without detail for the client) any unexpected exception."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cds_service.errors import ProtocolError, error_response, issue, outcome_response

log = logging.getLogger("cds_service.app")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` with an OperationOutcome."""
    app.add_exception_handler(ProtocolError, protocol_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected_error)


async def protocol_error(_: Request, exc: ProtocolError) -> Response:
    return error_response(exc)


async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
    code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
    message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
    return outcome_response(exc.status_code, [issue(code, message)],
                            getattr(exc, "headers", None))


async def validation_error(_: Request, exc: RequestValidationError) -> Response:
    return outcome_response(400, [issue("structure", "invalid request")])


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error", extra={"path": request.url.path,
                                         "error": type(exc).__name__})
    return outcome_response(500, [issue("exception", "internal error")])
