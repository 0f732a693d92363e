"""The audit of hook calls: what one call decided (:class:`CallAudit`), how a batch of them is
written (:class:`CallRows`, every value fitted to its column first), and the
:class:`AuditWriter` that writes them in batches off the request path."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.dml import Insert

from cds_service.errors import StoreUnavailable
from cds_service.ids import new_uuid
from cds_service.store.bulk import MultiRowInsert, sqlite_max_parameters
from cds_service.store.database import Database
from cds_service.store.models import CardShown, HookCall
from cds_service.store.values import CARD_COLUMNS, HOOK_CALL_COLUMNS, fit_row, is_data_error

log = logging.getLogger("cds_service.store")


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
    id: str = field(default_factory=new_uuid)
    tenant: str | None = None  # the EHR tenant the caller's JWT named


@dataclass
class AuditResult:
    """What :meth:`Store.record_calls` did with a batch."""

    written: int = 0
    invalid: int = 0  # calls the database refused even alone: dropped
    fixed: int = 0  # calls with a value cut to its column or cleaned of NUL


class CallRows(Database):
    """Writing the audit of hook calls: one row per call, one per card shown."""

    # SQLite: the two INSERTs as multi-row statements (store/bulk.py says why), built on first use
    _multi_row: tuple[MultiRowInsert, MultiRowInsert] | None = None

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
            if not is_data_error(exc):
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
                if not is_data_error(exc):
                    reason = await self.writable()
                    if reason is not None:
                        raise StoreUnavailable(f"{type(exc).__name__}: {reason}") from exc
                result.invalid += 1
        return result

    async def _insert_calls(self, calls: list[dict[str, Any]],
                            cards: list[dict[str, Any]]) -> None:
        calls_insert, cards_insert = self._audit_inserts()
        if self.dialect == "sqlite":
            multi_row = self._sqlite_inserts(calls_insert, cards_insert)
            async with self.engine.begin() as conn:
                await multi_row[0].run(conn, calls)
                await multi_row[1].run(conn, cards)
            return
        async with self.engine.begin() as conn:
            await conn.execute(calls_insert, calls)
            if cards:
                await conn.execute(cards_insert, cards)

    def _audit_inserts(self) -> tuple[Insert, Insert]:
        """The two INSERTs of a batch (a call or card already stored is skipped: a retry after a
        commit whose answer was lost stores it once)."""
        return (self._upsert(HookCall).on_conflict_do_nothing(index_elements=["id"]),
                self._upsert(CardShown).on_conflict_do_nothing(index_elements=["uuid"]))

    def _sqlite_inserts(self, calls_insert: Insert,
                        cards_insert: Insert) -> tuple[MultiRowInsert, MultiRowInsert]:
        if self._multi_row is None:
            dialect, limit = self.engine.dialect, sqlite_max_parameters()
            self._multi_row = (MultiRowInsert(calls_insert, dialect, limit),
                               MultiRowInsert(cards_insert, dialect, limit))
        return self._multi_row

    def _rows(self, audits: list[CallAudit]) -> tuple[list[dict[str, Any]],
                                                      list[dict[str, Any]], int]:
        calls, cards, fixed = [], [], 0
        for a in audits:
            # each order's hash once (its card names the same order)
            ids = {o.get("order_id") for o in a.orders} | {c.order_id for c in a.cards}
            hashes = {i: self.order_hash(a.patient_id, i) for i in ids}
            orders = [{**{k: v for k, v in o.items() if k != "order_id"},
                       "order_hash": hashes[o.get("order_id")]}
                      for o in a.orders]
            call = {"id": a.id, "created_at": a.created_at, "service_id": a.service_id,
                    "hook": a.hook, "hook_instance": a.hook_instance,
                    "patient_hash": self.patient_hash(a.patient_id),
                    "scenario": a.scenario, "orders": orders, "latency_ms": a.latency_ms,
                    "tenant": a.tenant}
            changed = fit_row(HOOK_CALL_COLUMNS, call)
            for c in a.cards:
                card = {"uuid": c.uuid, "hook_call_id": a.id, "created_at": a.created_at,
                        "service_id": a.service_id, "kind": c.kind, "indicator": c.indicator,
                        "procedure": c.procedure, "pama": c.pama, "category": c.category,
                        "suggestions": c.suggestions,
                        "order_hash": hashes[c.order_id]}
                changed = fit_row(CARD_COLUMNS, card) or changed
                cards.append(card)
            calls.append(call)
            fixed += changed
        return calls, cards, fixed


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

    def __init__(self, store: CallRows, on_event: AuditEvent, *, interval: float = 0.5,
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
