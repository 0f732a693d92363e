"""Tables: one row per hook call (audit), per card shown, per feedback item, per SMART app
session."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from cds_service import lengths


class UtcDateTime(TypeDecorator[datetime]):
    """An instant, stored in UTC on every database and read back as an aware UTC datetime.

    PostgreSQL keeps the instant (``timestamptz``); SQLite has no time-zone type and SQLAlchemy
    writes the wall-clock time without its offset, so two instants written with different
    offsets would collide. Converting to UTC before binding makes both databases agree, in
    rows and in ``WHERE`` comparisons. A naive value is taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None,
                             dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class HookCall(Base):
    """One evaluated hook call. The patient is kept only as a keyed hash."""

    __tablename__ = "hook_call"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    service_id: Mapped[str] = mapped_column(String(100), index=True)
    hook: Mapped[str] = mapped_column(String(40))
    hook_instance: Mapped[str] = mapped_column(String(100), index=True)
    patient_hash: Mapped[str] = mapped_column(String(64), index=True)
    scenario: Mapped[str | None] = mapped_column(String(40), nullable=True)
    orders: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    latency_ms: Mapped[float] = mapped_column(Float)
    # the EHR tenant the caller's JWT named (its ``tenant`` claim), when it named one
    tenant: Mapped[str | None] = mapped_column(String(lengths.TENANT), nullable=True,
                                               index=True)


class CardShown(Base):
    """A card the service returned, with what it was about."""

    __tablename__ = "card"

    uuid: Mapped[str] = mapped_column(String(64), primary_key=True)
    hook_call_id: Mapped[str] = mapped_column(ForeignKey("hook_call.id", ondelete="CASCADE"),
                                              index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    service_id: Mapped[str] = mapped_column(String(100), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    indicator: Mapped[str] = mapped_column(String(20))
    procedure: Mapped[str] = mapped_column(String(40))
    pama: Mapped[str | None] = mapped_column(String(40), nullable=True)
    category: Mapped[str | None] = mapped_column(String(20), nullable=True)
    suggestions: Mapped[list[str]] = mapped_column(JSON)
    # keyed hash of (patient, draft order id): a later call about the same order supersedes it
    order_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class FeedbackItem(Base):
    """One feedback item as the EHR sent it; the same item twice is one row."""

    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("card_uuid", "outcome", "outcome_timestamp",
                                       name="uq_feedback_item"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    card_uuid: Mapped[str] = mapped_column(String(lengths.CARD_ID), index=True)
    known_card: Mapped[bool] = mapped_column(Boolean)
    service_id: Mapped[str] = mapped_column(String(100), index=True)
    outcome: Mapped[str] = mapped_column(String(20))
    accepted_suggestions: Mapped[list[str]] = mapped_column(JSON)
    override_system: Mapped[str | None] = mapped_column(String(lengths.CODING_SYSTEM),
                                                        nullable=True)
    override_code: Mapped[str | None] = mapped_column(String(lengths.CODING_CODE),
                                                      nullable=True)
    override_display: Mapped[str | None] = mapped_column(String(lengths.CODING_DISPLAY),
                                                         nullable=True)
    user_comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    outcome_timestamp: Mapped[datetime] = mapped_column(UtcDateTime)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)


class JwtSeen(Base):
    """A JWT id seen by any replica, kept until the token expires (replay protection)."""

    __tablename__ = "jwt_seen"

    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class AppSession(Base):
    """A session of the SMART app (/app/), shared by every worker. The browser holds only a
    random id, in a signed cookie; the row is keyed by a hash of it. What the EHR granted
    (access token, patient, appContext, scope) is kept encrypted under a key derived from the
    session secret and that id, so the table alone reveals neither tokens nor patients."""

    __tablename__ = "app_session"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of the cookie id
    state: Mapped[str | None] = mapped_column(String(64), nullable=True)  # SHA-256 of `state`
    verifier: Mapped[str | None] = mapped_column(String(128), nullable=True)  # PKCE, until used
    iss: Mapped[str] = mapped_column(String(lengths.SMART_URL))
    token_endpoint: Mapped[str] = mapped_column(String(lengths.SMART_URL))
    redirect_uri: Mapped[str] = mapped_column(String(lengths.SMART_URL))
    granted: Mapped[str | None] = mapped_column(Text, nullable=True)  # encrypted (Fernet)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
