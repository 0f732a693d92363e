"""Feedback on the cards (accepted, overridden): checked, then stored once per item."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from cds_service.api.deps import authenticate, get_services, json_response, read_json
from cds_service.api.hooks import known_service
from cds_service.errors import ProtocolError, outcome_response, validation_issues
from cds_service.protocol import Feedback
from cds_service.services import Services
from cds_service.store import FeedbackRecord, InvalidValue, StoreUnavailable

log = logging.getLogger("cds_service.app")

# Where an InvalidValue of a stored feedback field is in the request body.
FEEDBACK_FIELDS = {"card": "card", "outcome_timestamp": "outcomeTimestamp",
                   "accepted_suggestions": "acceptedSuggestions",
                   "user_comment": "overrideReason.userComment",
                   "override_system": "overrideReason.reason.system",
                   "override_code": "overrideReason.reason.code",
                   "override_display": "overrideReason.reason.display"}


async def feedback(request: Request) -> Response:
    service_id: str = request.path_params["service_id"]
    s = get_services(request)
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
    the service offered (when it is one of ours, or an HL7 Non-Adherence Reason code)."""
    reason = item.overrideReason.reason if item.overrideReason else None
    display = None
    if reason is not None:
        display = reason.display or s.reasons.display(reason.system, reason.code)
    return FeedbackRecord(
        card=item.card, outcome=item.outcome, outcome_timestamp=item.outcomeTimestamp,
        accepted_suggestions=[a.id for a in item.acceptedSuggestions or []],
        override_system=reason.system if reason else None,
        override_code=reason.code if reason else None,
        override_display=str(display) if display else None,
        user_comment=item.overrideReason.userComment if item.overrideReason else None)
