"""Persistence of hook calls, cards and feedback (SQLAlchemy 2 async; SQLite or PostgreSQL).

Migrations are Alembic scripts under ``migrations/``; :meth:`Store.upgrade` applies them (at
start-up, or with ``cds-service db upgrade``). Patient ids are stored only as an HMAC-SHA256 of
the id under ``CDS_AUDIT_HASH_KEY``.

Two kinds of failure are kept apart everywhere: :class:`StoreUnavailable` (the database cannot be
reached or written now; retrying later can help) and :class:`InvalidValue` (a value no database
row can hold; retrying cannot help). Audit rows never fail for their values: every string is
fitted to its column (NUL replaced, cut to the column's length) before it is written.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import JSON, String, Table, delete, event, false, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from cds_service.store.models import AppSession, CardShown, FeedbackItem, HookCall, JwtSeen

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
FEEDBACK_BATCH = 200  # feedback rows per write transaction (SQLite holds its lock for one batch)
_IN_CHUNK = 500  # ids per IN (...) list

log = logging.getLogger("cds_service.store")


class StoreUnavailable(Exception):
    """The database could not be reached or refused the write; retrying later can help."""


class InvalidValue(ValueError):
    """A value the database can never hold (too long, NUL, out of range); retrying cannot help.

    ``field`` names the attribute of the record (e.g. ``card``), ``index`` its position in the
    list written, when known.
    """

    def __init__(self, message: str, field: str | None = None, index: int | None = None):
        super().__init__(message)
        self.field = field
        self.index = index


@dataclass
class CardAudit:
    uuid: str
    kind: str
    indicator: str
    procedure: str
    pama: str | None
    category: str | None
    suggestions: list[str]
    order_id: str | None = None  # the draft order it is about (stored as a keyed hash)


@dataclass
class CallAudit:
    """What one hook call decided (no PHI: the patient id is hashed before storing).

    ``id`` is fixed when the call is audited, so that writing the same audit twice (a retry after
    an outage, after a commit whose answer was lost) stores it once.
    """

    service_id: str
    hook: str
    hook_instance: str
    patient_id: str
    scenario: str | None
    orders: list[dict[str, Any]]
    cards: list[CardAudit]
    latency_ms: float
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


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


@dataclass
class AuditResult:
    """What :meth:`Store.record_calls` did with a batch."""

    written: int = 0
    invalid: int = 0  # calls the database refused even alone: dropped
    fixed: int = 0  # calls with a value cut to its column or cleaned of NUL


# ------------------------------------------------------------------ values and columns


class _Columns:
    """The string and JSON columns of a table, with their lengths, read from the model."""

    def __init__(self, table: Table):
        self.strings = {c.name: c.type.length for c in table.columns
                        if isinstance(c.type, String)}
        self.json = [c.name for c in table.columns if isinstance(c.type, JSON)]


_HOOK_CALL = _Columns(HookCall.__table__)  # type: ignore[arg-type]
_CARD = _Columns(CardShown.__table__)  # type: ignore[arg-type]
_FEEDBACK = _Columns(FeedbackItem.__table__)  # type: ignore[arg-type]

# FeedbackRecord attribute -> feedback column
FEEDBACK_COLUMNS = {"card": "card_uuid", "override_system": "override_system",
                    "override_code": "override_code", "override_display": "override_display",
                    "user_comment": "user_comment"}


def column_length(column: str, table: str = "feedback") -> int | None:
    """The length of a string column (None for unbounded text), from the models."""
    return {"feedback": _FEEDBACK, "hook_call": _HOOK_CALL, "card": _CARD}[table].strings[column]


def fit_text(value: str, limit: int | None = None) -> str:
    """``value`` as any database can store it: NUL replaced, UTF-8-encodable, at most ``limit``."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    if limit is not None and len(value) > limit:
        value = value[:limit]
    return value


def _text_fits(value: str, limit: int | None) -> bool:
    if "\x00" in value or (limit is not None and len(value) > limit):
        return False
    return value.isascii() or fit_text(value) == value


def _json_fits(value: Any) -> bool:
    if isinstance(value, str):
        return _text_fits(value, None)
    if isinstance(value, list):
        return all(_json_fits(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _text_fits(k, None) and _json_fits(v)
                   for k, v in value.items())
    return True


def _fit_json(value: Any) -> Any:
    if isinstance(value, str):
        return fit_text(value)
    if isinstance(value, list):
        return [_fit_json(v) for v in value]
    if isinstance(value, dict):
        return {fit_text(str(k)): _fit_json(v) for k, v in value.items()}
    return value


def _fit_row(columns: _Columns, row: dict[str, Any]) -> bool:
    """Fit every string of ``row`` to its column in place; True when something changed."""
    changed = False
    for name, limit in columns.strings.items():
        value = row.get(name)
        if isinstance(value, str) and not _text_fits(value, limit):
            row[name] = fit_text(value, limit)
            changed = True
    for name in columns.json:
        value = row.get(name)
        if value is not None and not _json_fits(value):
            row[name] = _fit_json(value)
            changed = True
    return changed


def storable_instant(value: datetime) -> datetime:
    """``value`` in UTC; ValueError when it has no offset or its UTC time is out of range."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("the time must have a UTC offset")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the instant is outside the range that can be stored "
                         "(years 1 to 9999 in UTC)") from None


def _is_data_error(exc: BaseException) -> bool:
    """Did the database refuse the values themselves (not the connection or the transaction)?"""
    if isinstance(exc, DataError | IntegrityError):
        return True
    if isinstance(exc, StatementError) and not isinstance(exc, DBAPIError):
        return True  # the driver or a type could not convert a value before sending it
    code = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    return code[:2] in ("22", "23")  # PostgreSQL: data exception, integrity violation


def _is_read_only(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) == "25006":  # read_only_sql_transaction
        return True
    return getattr(orig, "sqlite_errorname", "") == "SQLITE_READONLY" or "readonly" in str(orig)


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


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
        self._upsert = pg_insert if self.dialect == "postgresql" else sqlite_insert

    def patient_hash(self, patient_id: str) -> str:
        return hmac.new(self._key, patient_id.encode(), hashlib.sha256).hexdigest()

    def order_hash(self, patient_id: str, order_id: str | None) -> str | None:
        """A keyed hash of (patient, draft order): the same order of the same patient across
        calls (a later call about it supersedes an earlier card), and nothing readable."""
        if not order_id:
            return None
        return hmac.new(self._key, f"{patient_id}\x1f{order_id}".encode(),
                        hashlib.sha256).hexdigest()

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

    async def writable(self, within: float = 2.0) -> str | None:
        """None when the database accepts writes now; otherwise why not (no values, no ids).

        The probe is a ``DELETE ... WHERE false`` on the audit table in a transaction that is
        rolled back: it changes nothing but needs write access (a read-only SQLite file, a
        PostgreSQL standby or ``default_transaction_read_only`` refuse it).
        """
        try:
            async with asyncio.timeout(within), self.engine.connect() as conn, conn.begin() as tx:
                await conn.execute(select(1))
                try:
                    await conn.execute(delete(HookCall).where(false()))
                except SQLAlchemyError as exc:
                    if _is_read_only(exc):
                        return "database is read-only"
                    return f"database refuses writes ({type(exc).__name__})"
                finally:
                    await tx.rollback()
        except TimeoutError:
            return "database did not answer in time (busy or unreachable)"
        except (SQLAlchemyError, OSError) as exc:
            return f"database unreachable ({type(exc).__name__})"
        return None

    def _failure(self, exc: BaseException) -> Exception:
        """The exception to raise for a database error: invalid values or unavailable."""
        if _is_data_error(exc):
            return InvalidValue(f"the database refused a value ({type(exc).__name__})")
        return StoreUnavailable(type(exc).__name__)

    # ------------------------------------------------------------------ writes

    async def record_calls(self, audits: list[CallAudit]) -> AuditResult:
        """Store a batch of hook calls; one bad call never takes the others with it.

        Values are fitted to their columns first. The batch is one transaction (executemany);
        if it fails while the database still accepts writes, the calls are written one per
        transaction and only those that still fail are dropped (``invalid`` in the result).
        Raises StoreUnavailable when the database cannot be written: the caller keeps the batch
        and retries it; calls already written are skipped then (by their id), not doubled.
        """
        if not audits:
            return AuditResult()
        calls, cards, fixed = self._rows(audits)
        try:
            await self._insert_calls(calls, cards)
            return AuditResult(written=len(calls), fixed=fixed)
        except (SQLAlchemyError, OSError) as exc:
            if not _is_data_error(exc):
                reason = await self.writable()
                if reason is not None:
                    raise StoreUnavailable(f"{type(exc).__name__}: {reason}") from exc
        cards_of: dict[str, list[dict[str, Any]]] = {}
        for card in cards:
            cards_of.setdefault(card["hook_call_id"], []).append(card)
        result = AuditResult(fixed=fixed)
        for call in calls:
            try:
                await self._insert_calls([call], cards_of.get(call["id"], []))
                result.written += 1
            except (SQLAlchemyError, OSError) as exc:
                if not _is_data_error(exc):
                    reason = await self.writable()
                    if reason is not None:
                        raise StoreUnavailable(f"{type(exc).__name__}: {reason}") from exc
                result.invalid += 1
        return result

    async def _insert_calls(self, calls: list[dict[str, Any]],
                            cards: list[dict[str, Any]]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                self._upsert(HookCall).on_conflict_do_nothing(index_elements=["id"]), calls)
            if cards:
                await conn.execute(
                    self._upsert(CardShown).on_conflict_do_nothing(index_elements=["uuid"]),
                    cards)

    def _rows(self, audits: list[CallAudit]) -> tuple[list[dict[str, Any]],
                                                      list[dict[str, Any]], int]:
        calls, cards, fixed = [], [], 0
        for a in audits:
            orders = [{**{k: v for k, v in o.items() if k != "order_id"},
                       "order_hash": self.order_hash(a.patient_id, o.get("order_id"))}
                      for o in a.orders]
            call = {"id": a.id, "created_at": a.created_at, "service_id": a.service_id,
                    "hook": a.hook, "hook_instance": a.hook_instance,
                    "patient_hash": self.patient_hash(a.patient_id),
                    "scenario": a.scenario, "orders": orders, "latency_ms": a.latency_ms}
            changed = _fit_row(_HOOK_CALL, call)
            for c in a.cards:
                card = {"uuid": c.uuid, "hook_call_id": a.id, "created_at": a.created_at,
                        "service_id": a.service_id, "kind": c.kind, "indicator": c.indicator,
                        "procedure": c.procedure, "pama": c.pama, "category": c.category,
                        "suggestions": c.suggestions,
                        "order_hash": self.order_hash(a.patient_id, c.order_id)}
                changed = _fit_row(_CARD, card) or changed
                cards.append(card)
            calls.append(call)
            fixed += changed
        return calls, cards, fixed

    @staticmethod
    def check_feedback(items: list[FeedbackRecord]) -> None:
        """Raise InvalidValue naming the first value of ``items`` no database row can hold."""
        for index, item in enumerate(items):
            for attr, column in FEEDBACK_COLUMNS.items():
                value = getattr(item, attr)
                if value is None:
                    continue
                limit = _FEEDBACK.strings[column]
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
                for chunk in _chunks(uuids, _IN_CHUNK):
                    known.update((await conn.execute(
                        select(CardShown.uuid).where(CardShown.uuid.in_(chunk)))).scalars())
            for chunk in _chunks(items, batch):
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

    # ------------------------------------------------------------------ reads

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
                for chunk in _chunks(uuids, _IN_CHUNK):
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


    # ------------------------------------------------------------------ SMART app sessions

    async def save_app_session(self, values: dict[str, Any]) -> None:
        """Insert an app session (``values``: every column) or replace the row of its id."""
        stmt = self._upsert(AppSession).values(**values).on_conflict_do_update(
            index_elements=["id"], set_={k: v for k, v in values.items() if k != "id"})
        try:
            async with self.engine.begin() as conn:
                await conn.execute(stmt)
        except (SQLAlchemyError, OSError) as exc:
            raise self._failure(exc) from exc

    async def app_session(self, key: str, now: datetime) -> AppSession | None:
        """The app session of that key, unless it is unknown or expired."""
        try:
            async with self.sessions() as session:
                return (await session.execute(select(AppSession).where(
                    AppSession.id == key, AppSession.expires_at > now))).scalar_one_or_none()
        except (SQLAlchemyError, OSError) as exc:
            raise self._failure(exc) from exc

    async def claim_app_session(self, key: str, state: str, now: datetime) -> bool:
        """Use the session's ``state`` once: True when it matched and was live (the state and
        the PKCE verifier are cleared in the same statement: a second callback finds none)."""
        stmt = update(AppSession).where(
            AppSession.id == key, AppSession.state == state, AppSession.expires_at > now,
        ).values(state=None, verifier=None)
        try:
            async with self.engine.begin() as conn:
                return bool((await conn.execute(stmt)).rowcount)
        except (SQLAlchemyError, OSError) as exc:
            raise self._failure(exc) from exc

    async def grant_app_session(self, key: str, granted: str) -> None:
        """Store what the EHR granted (encrypted by the caller) in the session."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(update(AppSession).where(AppSession.id == key)
                                   .values(granted=granted))
        except (SQLAlchemyError, OSError) as exc:
            raise self._failure(exc) from exc

    async def drop_app_sessions(self, now: datetime) -> int:
        """Delete the expired app sessions; how many there were."""
        try:
            async with self.engine.begin() as conn:
                result = await conn.execute(delete(AppSession).where(
                    AppSession.expires_at <= now))
                return int(result.rowcount or 0)
        except (SQLAlchemyError, OSError) as exc:
            raise self._failure(exc) from exc


AuditEvent = Callable[[str, int, str], None]


class AuditWriter:
    """Writes hook-call audits in batches off the request path, losing none that it can keep.

    ``submit`` never blocks and never touches the database: it appends to a bounded in-memory
    queue of ``max_queue`` calls. A background task writes a batch of up to ``batch`` calls
    (executemany, one transaction) as soon as that many are queued, or ``interval`` seconds after
    the first one arrived, whichever comes first; under load the batches grow to ``batch``.

    When the database cannot be written the calls stay queued and the write is retried with
    exponential back-off (``retry_min`` doubling up to ``retry_max`` seconds) until it succeeds.
    Calls are lost only when the queue is full (or the database is still down at shutdown),
    and then they are counted. ``on_event(kind, rows, detail)`` is called at most once per
    batch, never per call:

    - ``dropped``: ``rows`` calls lost; detail ``queue-full``, ``invalid`` (refused by the
      database even alone) or ``shutdown``;
    - ``retrying``: a write failed, ``rows`` calls are held; detail is the reason;
    - ``resumed``: the database took a batch again after failures;
    - ``fixed``: ``rows`` calls had a value cut to its column or cleaned of NUL;
    - ``written``: ``rows`` calls were stored.
    """

    def __init__(self, store: Store, on_event: AuditEvent, *, interval: float = 0.5,
                 batch: int = 1000, max_queue: int = 50_000, retry_min: float = 0.1,
                 retry_max: float = 30.0, shutdown_seconds: float = 5.0):
        self.store = store
        self.on_event = on_event
        self.interval = interval
        self.batch = max(1, batch)
        self.max_queue = max(self.batch, max_queue)
        self.retry_min = retry_min
        self.retry_max = max(retry_min, retry_max)
        self.shutdown_seconds = shutdown_seconds
        self.written = 0
        self.dropped = 0
        self._queue: deque[CallAudit] = deque()
        self._unreported_drops = 0
        self._failures = 0  # consecutive failed writes
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def pending(self) -> int:
        """Calls queued and not yet written."""
        return len(self._queue)

    @property
    def failures(self) -> int:
        """Writes that failed in a row (0 while the database takes them)."""
        return self._failures

    def start(self) -> None:
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, audit: CallAudit) -> None:
        """Queue one call (never blocks); counted as dropped when the queue is full."""
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            self._unreported_drops += 1
            return
        queue.append(audit)
        if (len(queue) == 1 or len(queue) == self.batch) and not self._failures:
            self._wake.set()

    async def flush(self) -> None:
        """Write everything queued so far (before reads that need the cards).

        Raises StoreUnavailable when the database cannot be written; the calls stay queued.
        """
        async with self._lock:
            while self._queue:
                await self._write_batch()

    async def _write_batch(self) -> None:
        """Write the oldest batch (the caller holds the lock); on failure it stays queued."""
        queue = self._queue
        items = [queue.popleft() for _ in range(min(self.batch, len(queue)))]
        try:
            result = await self.store.record_calls(items)
        except StoreUnavailable as exc:
            queue.extendleft(reversed(items))
            self._failures += 1
            self.on_event("retrying", len(queue), str(exc))
            raise
        except BaseException:
            queue.extendleft(reversed(items))  # cancelled: written again later, not twice
            raise
        finally:
            self._report_drops()
        if self._failures:
            self._failures = 0
            self.on_event("resumed", result.written, "")
        self.written += result.written
        if result.written:
            self.on_event("written", result.written, "")
        if result.invalid:
            self.dropped += result.invalid
            self.on_event("dropped", result.invalid, "invalid")
        if result.fixed:
            self.on_event("fixed", result.fixed, "")

    def _report_drops(self) -> None:
        if self._unreported_drops:
            count, self._unreported_drops = self._unreported_drops, 0
            self.on_event("dropped", count, "queue-full")

    async def _pause(self, seconds: float | None) -> None:
        """Sleep until woken (a batch is ready, stop) or ``seconds`` have passed."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    async def _run(self) -> None:
        delay = 0.0
        while not self._closing:
            if delay:
                await self._pause(delay)
            elif not self._queue:
                await self._pause(None)
                continue
            elif len(self._queue) < self.batch:
                await self._pause(self.interval)
            if self._closing:
                break
            if not self._queue:  # a flush wrote it meanwhile
                delay = 0.0
                continue
            try:
                async with self._lock:
                    await self._write_batch()
                delay = 0.0
            except StoreUnavailable:
                delay = min(max(delay * 2, self.retry_min), self.retry_max)
            except Exception as exc:  # never let the writer die: log, wait, go on
                log.error("audit writer failed; retrying", extra={"error": type(exc).__name__})
                delay = min(max(delay * 2, self.retry_min), self.retry_max)

    async def stop(self) -> None:
        """Stop the background task and write what is queued (retrying for a few seconds)."""
        self._closing = True
        self._wake.set()
        if self._task:
            await self._task
            self._task = None
        deadline = time.monotonic() + self.shutdown_seconds
        delay = self.retry_min
        while True:
            try:
                await self.flush()
                break
            except StoreUnavailable:
                if time.monotonic() + delay > deadline:
                    lost, self._queue = len(self._queue), deque()
                    self.dropped += lost
                    self.on_event("dropped", lost, "shutdown")
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
        self._report_drops()


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
