"""CDS Hooks 2.0 request and response models.

Requests are read leniently where real clients differ (``Bundle.type`` missing, unknown draft order
types, no ``encounterId``) and strictly where the service cannot work without a field. Responses
are serialised without ``None`` values: optional fields are omitted, never sent as null.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from cds_service import lengths

HOOKS = ("order-select", "order-sign")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class FhirAuthorization(_Lenient):
    access_token: str = Field(min_length=1)
    token_type: str = "Bearer"
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None
    patient: str | None = None

    def __repr__(self) -> str:  # never show the token, even in a traceback
        return f"FhirAuthorization(token_type={self.token_type!r}, scope={self.scope!r})"

    __str__ = __repr__


class DraftOrders(_Lenient):
    """A Bundle of unsigned orders; ``type`` is often missing and entries may be of any type."""

    resourceType: Literal["Bundle"] = "Bundle"
    entry: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("entry", mode="before")
    @classmethod
    def _entries(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, list):
            return [e for e in value if isinstance(e, dict)]
        return value

    @model_validator(mode="after")
    def _one_order_per_id(self) -> DraftOrders:
        # Two drafts with one id would get two contradictory updates of one resource.
        seen: set[tuple[str, str]] = set()
        for resource in self.resources():
            rid, rtype = resource.get("id"), resource.get("resourceType")
            if not isinstance(rid, str) or not rid or not isinstance(rtype, str):
                continue
            key = (rtype, rid)
            if key in seen:
                raise ValueError(f"two draft orders are {rtype}/{rid[:64]}; "
                                 "each draft order needs its own id")
            seen.add(key)
        return self

    def resources(self) -> list[dict[str, Any]]:
        return [e["resource"] for e in self.entry if isinstance(e.get("resource"), dict)]


class OrderContext(_Lenient):
    userId: str | None = None
    patientId: str = Field(min_length=1)
    encounterId: str | None = None
    selections: list[str] | None = None
    draftOrders: DraftOrders


class HookRequest(_Lenient):
    hook: str = Field(min_length=1)
    hookInstance: str = Field(min_length=1)
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: OrderContext
    prefetch: dict[str, Any] | None = None
    extension: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _server_with_token(self) -> HookRequest:
        if self.fhirAuthorization is not None and not self.fhirServer:
            raise ValueError("fhirServer is required when fhirAuthorization is present")
        return self


# ---------------------------------------------------------------- responses


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Coding(_Out):
    system: str
    code: str
    display: str | None = None


class CardSource(_Out):
    label: str
    url: str | None = None
    icon: str | None = None
    topic: Coding | None = None


class Action(_Out):
    type: Literal["create", "update", "delete"]
    description: str
    resource: dict[str, Any] | None = None
    resourceId: str | None = None


class Suggestion(_Out):
    label: str
    uuid: str
    isRecommended: bool | None = None
    actions: list[Action] | None = None


class Link(_Out):
    label: str
    url: str
    type: Literal["absolute", "smart"]
    appContext: str | None = None


class Card(_Out):
    uuid: str
    summary: str = Field(max_length=139)
    indicator: Literal["info", "warning", "critical"]
    source: CardSource
    detail: str | None = None
    suggestions: list[Suggestion] | None = None
    selectionBehavior: Literal["at-most-one", "any"] | None = None
    overrideReasons: list[Coding] | None = None
    links: list[Link] | None = None


class ServiceResponse(_Out):
    cards: list[Card]
    systemActions: list[Action] | None = None
    extension: dict[str, Any] | None = None


class ServiceDescription(_Out):
    hook: str
    id: str
    title: str | None = None
    description: str
    prefetch: dict[str, str] | None = None
    usageRequirements: str | None = None
    # CDS Hooks 3.0 (a 2.0 client ignores them): the specification and hook versions served
    version: str | None = None
    hookVersion: str | None = None


class Discovery(_Out):
    services: list[ServiceDescription]


# ---------------------------------------------------------------- feedback


# Feedback is stored as sent: a value no database row can hold is refused here with 400 (naming
# the field), not accepted and then failed on with 503 (which the client would retry for ever).
# The lengths are declared in cds_service.lengths, which the table models size their columns by.


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _storable_instant(value: datetime) -> datetime:
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is outside the range of instants that can be stored "
                         "(years 1 to 9999 in UTC)") from None
    return value


StoredText = Annotated[str, AfterValidator(_no_nul)]


class FeedbackCoding(_Lenient):
    system: StoredText | None = Field(default=None, max_length=lengths.CODING_SYSTEM)
    code: StoredText = Field(min_length=1, max_length=lengths.CODING_CODE)
    display: StoredText | None = Field(default=None, max_length=lengths.CODING_DISPLAY)


class OverrideReason(_Lenient):
    reason: FeedbackCoding | None = None
    userComment: StoredText | None = None


class AcceptedSuggestion(_Lenient):
    id: StoredText = Field(min_length=1)


class FeedbackItem(_Lenient):
    card: StoredText = Field(min_length=1, max_length=lengths.CARD_ID)
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] | None = None
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: Annotated[AwareDatetime, AfterValidator(_storable_instant)]

    @model_validator(mode="after")
    def _accepted_needs_suggestions(self) -> FeedbackItem:
        if self.outcome == "accepted" and not self.acceptedSuggestions:
            raise ValueError("acceptedSuggestions is required when outcome is accepted")
        return self


class Feedback(_Lenient):
    feedback: list[FeedbackItem] = Field(min_length=1)
