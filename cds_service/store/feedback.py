"""Feedback on the cards: checking and storing the items (idempotent, in short transactions),
and reading the cards shown with the feedback about them, as the report needs them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from cds_service.store.database import Database
from cds_service.store.models import CardShown, FeedbackItem, HookCall
from cds_service.store.values import (
    FEEDBACK_COLUMNS,
    FEEDBACK_TABLE_COLUMNS,
    InvalidValue,
    chunks,
    fit_text,
    storable_instant,
)

FEEDBACK_BATCH = 200  # feedback rows per write transaction (SQLite holds its lock for one batch)
_IN_CHUNK = 500  # ids per IN (...) list


@dataclass
class FeedbackRecord:
    card: str
    outcome: str
    outcome_timestamp: datetime
    accepted_suggestions: list[str] = field(default_factory=list)
    override_system: str | None = None
    override_code: str | None = None
    override_display: str | None = None
    user_comment: str | None = None


class FeedbackRows(Database):
    """Feedback items (each stored once), and the cards shown with their feedback."""

    @staticmethod
    def check_feedback(items: list[FeedbackRecord]) -> None:
        """Raise InvalidValue naming the first value of ``items`` no database row can hold."""
        for index, item in enumerate(items):
            for attr, column in FEEDBACK_COLUMNS.items():
                value = getattr(item, attr)
                if value is None:
                    continue
                limit = FEEDBACK_TABLE_COLUMNS.strings[column]
                if "\x00" in value:
                    raise InvalidValue("must not contain NUL characters", attr, index)
                if limit is not None and len(value) > limit:
                    raise InvalidValue(f"longer than {limit} characters", attr, index)
                if fit_text(value) != value:
                    raise InvalidValue("is not valid Unicode text", attr, index)
            if any("\x00" in s or fit_text(s) != s for s in item.accepted_suggestions):
                raise InvalidValue("must not contain NUL characters", "accepted_suggestions",
                                   index)
            try:
                storable_instant(item.outcome_timestamp)
            except ValueError as exc:
                raise InvalidValue(str(exc), "outcome_timestamp", index) from None

    async def store_feedback(self, service_id: str, items: list[FeedbackRecord], *,
                             batch: int = FEEDBACK_BATCH) -> dict[str, int]:
        """Store every item (idempotent); unknown cards are kept and flagged.

        Raises InvalidValue (before writing anything) for a value no row can hold, and
        StoreUnavailable when the database cannot be written. The items are written ``batch``
        per transaction, so that a large post never holds SQLite's write lock for long; a post
        that fails half-way is safe to repeat (items already stored count as duplicates).
        """
        self.check_feedback(items)
        now = datetime.now(UTC)
        uuids = sorted({i.card for i in items})
        stored = 0
        try:
            known: set[str] = set()
            async with self.engine.connect() as conn:  # a read, outside any write transaction
                for chunk in chunks(uuids, _IN_CHUNK):
                    known.update((await conn.execute(
                        select(CardShown.uuid).where(CardShown.uuid.in_(chunk)))).scalars())
            for chunk in chunks(items, batch):
                rows = [{"card_uuid": i.card, "known_card": i.card in known,
                         "service_id": service_id, "outcome": i.outcome,
                         "accepted_suggestions": i.accepted_suggestions,
                         "override_system": i.override_system,
                         "override_code": i.override_code,
                         "override_display": i.override_display,
                         "user_comment": i.user_comment,
                         "outcome_timestamp": i.outcome_timestamp, "received_at": now}
                        for i in chunk]
                stmt = self._upsert(FeedbackItem).values(rows).on_conflict_do_nothing(
                    index_elements=["card_uuid", "outcome", "outcome_timestamp"],
                ).returning(FeedbackItem.id)
                async with self.engine.begin() as conn:
                    stored += len((await conn.execute(stmt)).all())
        except (SQLAlchemyError, OSError) as exc:
            raise self._failure(exc) from exc
        return {"received": len(items), "stored": stored, "duplicates": len(items) - stored,
                "unknown_cards": len(set(uuids) - known)}

    async def rows(self, start: datetime | None, end: datetime | None, service: str | None
                   ) -> tuple[list[CardShown], list[FeedbackItem], dict[str, datetime]]:
        """Cards shown in the window, the feedback about them (or about unknown cards), and for
        each draft order they are about, the time of the latest call about it (even after the
        window: a later call supersedes a card that got no feedback).

        Raises InvalidValue for a filter no row can match that the database refuses (a NUL),
        StoreUnavailable when the database cannot be read.
        """
        try:
            async with self.sessions() as session:
                q = select(CardShown)
                unknown = select(FeedbackItem).where(FeedbackItem.known_card.is_(False))
                if start:
                    q = q.where(CardShown.created_at >= start)
                    unknown = unknown.where(FeedbackItem.outcome_timestamp >= start)
                if end:
                    q = q.where(CardShown.created_at < end)
                    unknown = unknown.where(FeedbackItem.outcome_timestamp < end)
                if service:
                    q = q.where(CardShown.service_id == service)
                    unknown = unknown.where(FeedbackItem.service_id == service)
                cards = list((await session.execute(q)).scalars())
                feedback: list[FeedbackItem] = []
                uuids = [c.uuid for c in cards]
                for chunk in chunks(uuids, _IN_CHUNK):
                    feedback += (await session.execute(select(FeedbackItem).where(
                        FeedbackItem.card_uuid.in_(chunk)))).scalars()
                feedback += (await session.execute(unknown)).scalars()
                latest = await self._latest_calls(session, cards)
                return cards, feedback, latest
        except (SQLAlchemyError, OSError) as exc:
            raise self._failure(exc) from exc

    @staticmethod
    async def _latest_calls(session: Any, cards: list[CardShown]) -> dict[str, datetime]:
        """order hash -> time of the latest hook call about that order (from the first card)."""
        wanted = {c.order_hash for c in cards if c.order_hash}
        if not wanted:
            return {}
        first = min(c.created_at for c in cards)
        latest: dict[str, datetime] = {}
        calls = await session.execute(select(HookCall.created_at, HookCall.orders).where(
            HookCall.created_at >= first))
        for created_at, orders in calls:
            for o in orders if isinstance(orders, list) else []:
                key = o.get("order_hash") if isinstance(o, dict) else None
                if key in wanted and (key not in latest or created_at > latest[key]):
                    latest[key] = created_at
        return latest
