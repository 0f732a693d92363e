"""Persistence of hook calls, cards and feedback (SQLAlchemy 2 async; SQLite or PostgreSQL).

Migrations are Alembic scripts under ``migrations/``; :meth:`Store.upgrade` applies them (at
start-up, or with ``cds-service db upgrade``). Patient ids are stored only as an HMAC-SHA256 of
the id under ``CDS_AUDIT_HASH_KEY``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from cds_service.store.models import CardShown, FeedbackItem, HookCall, JwtSeen

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class StoreUnavailable(Exception):
    """The database could not be reached or refused the write."""


@dataclass
class CardAudit:
    uuid: str
    kind: str
    indicator: str
    procedure: str
    pama: str | None
    category: str | None
    suggestions: list[str]


@dataclass
class CallAudit:
    """What one hook call decided (no PHI: the patient id is hashed before storing)."""

    service_id: str
    hook: str
    hook_instance: str
    patient_id: str
    scenario: str | None
    orders: list[dict[str, Any]]
    cards: list[CardAudit]
    latency_ms: float
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


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


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Store:
    """The service's database."""

    def __init__(self, url: str, hash_key: str, *, connect_timeout: float = 3.0):
        self.url = url
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        self._key = hash_key.encode()
        if self.dialect == "sqlite":
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(
                url, poolclass=NullPool, connect_args={"timeout": 10})
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_async_engine(
                url, pool_size=5, max_overflow=10, pool_pre_ping=True, pool_timeout=3,
                connect_args={"timeout": connect_timeout, "command_timeout": 5})
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    def patient_hash(self, patient_id: str) -> str:
        return hmac.new(self._key, patient_id.encode(), hashlib.sha256).hexdigest()

    async def dispose(self) -> None:
        await self.engine.dispose()

    # ------------------------------------------------------------------ schema

    async def upgrade(self) -> None:
        """Apply every Alembic migration not yet applied."""
        def run(connection: Connection) -> None:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.set_main_option("sqlalchemy.url", self.url)
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")

        try:
            async with self.engine.begin() as conn:
                await conn.run_sync(run)
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(f"migration failed: {type(exc).__name__}") from exc

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await asyncio.wait_for(conn.execute(select(1)), timeout=2)
            return True
        except (SQLAlchemyError, OSError, TimeoutError):
            return False

    # ------------------------------------------------------------------ writes

    async def record_calls(self, audits: list[CallAudit]) -> None:
        """Store a batch of hook calls in one transaction."""
        try:
            calls, cards = self._rows(audits)
            async with self.engine.begin() as conn:
                await conn.execute(insert(HookCall), calls)
                if cards:
                    await conn.execute(insert(CardShown), cards)
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from exc

    def _rows(self, audits: list[CallAudit]) -> tuple[list[dict[str, Any]],
                                                      list[dict[str, Any]]]:
        calls, cards = [], []
        for a in audits:
            call_id = str(uuid.uuid4())
            calls.append({"id": call_id, "created_at": a.created_at, "service_id": a.service_id,
                          "hook": a.hook, "hook_instance": a.hook_instance,
                          "patient_hash": self.patient_hash(a.patient_id),
                          "scenario": a.scenario, "orders": a.orders,
                          "latency_ms": a.latency_ms})
            cards += [{"uuid": c.uuid, "hook_call_id": call_id, "created_at": a.created_at,
                       "service_id": a.service_id, "kind": c.kind, "indicator": c.indicator,
                       "procedure": c.procedure, "pama": c.pama, "category": c.category,
                       "suggestions": c.suggestions} for c in a.cards]
        return calls, cards

    async def store_feedback(self, service_id: str,
                             items: list[FeedbackRecord]) -> dict[str, int]:
        """Store every item (idempotent); unknown cards are kept and flagged."""
        upsert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        now = datetime.now(UTC)
        try:
            async with self.sessions.begin() as session:
                uuids = {i.card for i in items}
                known = set((await session.execute(
                    select(CardShown.uuid).where(CardShown.uuid.in_(uuids)))).scalars())
                stored = 0
                for item in items:
                    stmt = upsert(FeedbackItem).values(
                        card_uuid=item.card, known_card=item.card in known,
                        service_id=service_id, outcome=item.outcome,
                        accepted_suggestions=item.accepted_suggestions,
                        override_system=item.override_system,
                        override_code=item.override_code,
                        override_display=item.override_display,
                        user_comment=item.user_comment,
                        outcome_timestamp=item.outcome_timestamp, received_at=now,
                    ).on_conflict_do_nothing(
                        index_elements=["card_uuid", "outcome", "outcome_timestamp"])
                    result = await session.execute(stmt)
                    stored += max(result.rowcount or 0, 0)  # type: ignore[attr-defined]
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from exc
        return {"received": len(items), "stored": stored, "duplicates": len(items) - stored,
                "unknown_cards": len({i.card for i in items} - known)}

    # ------------------------------------------------------------------ reads

    async def rows(self, start: datetime | None, end: datetime | None,
                   service: str | None) -> tuple[list[CardShown], list[FeedbackItem]]:
        """Cards shown in the window and the feedback about them (or about unknown cards)."""
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
                for i in range(0, len(uuids), 500):
                    feedback += (await session.execute(select(FeedbackItem).where(
                        FeedbackItem.card_uuid.in_(uuids[i:i + 500])))).scalars()
                feedback += (await session.execute(unknown)).scalars()
                return cards, feedback
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from exc



class AuditWriter:
    """Writes hook-call audits in batches off the request path.

    ``submit`` never blocks; a background task commits what has queued up every ``interval``
    seconds in one transaction. A failed batch is dropped and reported through ``on_error``
    (the hook answers are never held up by the database).
    """

    def __init__(self, store: Store, on_error: Any, *, interval: float = 0.05,
                 batch: int = 500, max_queue: int = 10_000):
        self.store = store
        self.on_error = on_error
        self.interval = interval
        self.batch = batch
        self.queue: asyncio.Queue[CallAudit] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, audit: CallAudit) -> None:
        try:
            self.queue.put_nowait(audit)
        except asyncio.QueueFull:
            self.on_error("audit-queue-full", 1)

    async def flush(self) -> None:
        """Write everything queued so far (used before reads that need the cards)."""
        async with self._lock:
            while not self.queue.empty():
                await self._write_batch()

    async def _write_batch(self) -> None:
        items: list[CallAudit] = []
        while not self.queue.empty() and len(items) < self.batch:
            items.append(self.queue.get_nowait())
        if not items:
            return
        try:
            await self.store.record_calls(items)
        except StoreUnavailable as exc:
            self.on_error(str(exc), len(items))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.queue.empty():
                async with self._lock:
                    await self._write_batch()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()


class DatabaseReplayCache:
    """JWT replay protection shared by every replica through the database."""

    def __init__(self, store: Store):
        self.store = store
        self._writes = 0

    async def check_and_store(self, key: str, expires_at: float) -> bool:
        """True the first time ``key`` is seen before it expires; False on a replay."""
        from sqlalchemy import delete, update

        upsert = pg_insert if self.store.dialect == "postgresql" else sqlite_insert
        now = datetime.now(UTC)
        expires = datetime.fromtimestamp(expires_at, UTC)
        key = hashlib.sha256(key.encode()).hexdigest()  # no token material stored as such
        try:
            async with self.store.engine.begin() as conn:
                result = await conn.execute(upsert(JwtSeen).values(
                    key=key, expires_at=expires).on_conflict_do_nothing(index_elements=["key"]))
                if not result.rowcount:
                    # seen before: a replay unless that entry has expired
                    stale = await conn.execute(update(JwtSeen).where(
                        JwtSeen.key == key, JwtSeen.expires_at < now).values(expires_at=expires))
                    if not stale.rowcount:
                        return False
                self._writes += 1
                if self._writes % 500 == 0:
                    await conn.execute(delete(JwtSeen).where(JwtSeen.expires_at < now))
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from exc
        return True
