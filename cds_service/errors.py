"""The service's own exceptions, and FHIR OperationOutcome answers for every error it returns.

    Exception
     +-- StartupError          the service cannot start: one type for ``cds-service`` to catch
     |    +-- ConfigurationError   (cds_service.services) settings that cannot run
     |    +-- KnowledgeError       (cds_service.knowledge) a knowledge file is wrong
     |    +-- TemplateProblem      (cds_service.render) a card template is wrong
     +-- ProtocolError         a client error, answered with a 4xx OperationOutcome
     +-- StoreUnavailable      the database cannot be reached or written now (raised by
                               cds_service.store, caught by the routes and the JWT replay check)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from fastapi.responses import Response
from pydantic import ValidationError


class StartupError(Exception):
    """The service cannot start (configuration, knowledge or card templates): the message names
    the file or setting and the fix."""


class StoreUnavailable(Exception):
    """The database could not be reached or refused the write; retrying later can help."""


class ProtocolError(Exception):
    """A client error to answer with a 4xx OperationOutcome."""

    def __init__(self, status: int, code: str, message: str,
                 expression: Iterable[str] = (), headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.expression = list(expression)
        self.headers = headers or {}


def operation_outcome(issues: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": issues}


def issue(code: str, message: str, expression: Iterable[str] = (),
          severity: str = "error") -> dict[str, Any]:
    out: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": message}
    expr = [e for e in expression if e]
    if expr:
        out["expression"] = expr
    return out


def outcome_response(status: int, issues: list[dict[str, Any]],
                     headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(operation_outcome(issues)), status_code=status,
                    media_type="application/fhir+json", headers=headers)


def error_response(err: ProtocolError) -> Response:
    return outcome_response(err.status, [issue(err.code, err.message, err.expression)],
                            err.headers)


def validation_issues(exc: ValidationError, prefix: str = "") -> list[dict[str, Any]]:
    """One issue per pydantic error, naming the field as a dotted path."""
    issues = []
    for err in exc.errors(include_url=False, include_input=False):
        path = ".".join(str(p) for p in err["loc"] if p != "__root__")
        where = f"{prefix}.{path}" if prefix and path else (prefix or path)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = f"{where} is required"
        elif where:
            message = f"{where}: {message}"
        issues.append(issue("structure" if err["type"] != "missing" else "required",
                            message, [where] if where else []))
    return issues[:20]
