"""The JWT replay check (``jti``): this process's memory, the shared database, and the way from
one to the other when the database does not answer.

The database is asked with a deadline of its own (``CDS_JWT_REPLAY_TIMEOUT_SECONDS``): a database
that drops packets costs a call that long, not the driver's connect and command timeouts. Past
the deadline, or when the database fails, this process decides alone (it remembers every ``jti``
it accepted) and the service is *degraded*: no call waits for the database, and one probe at a
time, at most once per ``retry_seconds``, runs in the background. The probe writes the ``jti``s
accepted here meanwhile (kept, bounded, until then) to the shared store, so that once the
database answers again another worker refuses a token used during the outage.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import Protocol

from cds_service.errors import StoreUnavailable

log = logging.getLogger("cds_service.security")

PENDING_MAX = 50_000  # jti's accepted during an outage and kept for the shared store
WRITE_BATCH = 500  # of them written to the shared store at once


class ReplayStore(Protocol):
    """Where seen ``jti`` values are kept (in memory, or the shared database)."""

    async def check_and_store(self, key: str, expires_at: float) -> bool: ...


class SharedReplayStore(ReplayStore, Protocol):
    """A replay store shared by every process, which also takes ``jti``s accepted elsewhere."""

    async def remember(self, entries: list[tuple[str, float]]) -> int:
        """Store ``(key, expires_at)`` pairs; the number that another process had seen."""
        ...


class ReplayCache:
    """Remembers ``jti`` values until their token expires (one process only)."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []  # a heap: the next entry to expire first

    def __len__(self) -> int:
        return len(self._seen)

    async def check_and_store(self, key: str, expires_at: float) -> bool:
        """True the first time a key is seen (before it expires), False on a replay.

        Nothing here awaits, so concurrent calls cannot interleave (no lock needed).
        """
        now = time.time()
        while self._expiry and self._expiry[0][0] <= now:
            expired, old = heapq.heappop(self._expiry)
            if self._seen.get(old) == expired:
                del self._seen[old]
        seen = self._seen.get(key)
        if seen is not None and seen > now:
            return False
        self._seen[key] = expires_at
        heapq.heappush(self._expiry, (expires_at, key))
        return True


class FallbackReplayStore:
    """The shared (database) replay store, and this process's own when the database is down.

    Every ``jti`` is also remembered here, so a token replayed to this process is refused even
    while the database cannot be asked. ``on_fallback(failed)`` is called for each check decided
    here (``failed``: the database was asked and failed or missed the deadline, rather than
    skipped). Entering and leaving the degraded state is logged once.
    """

    def __init__(self, shared: SharedReplayStore, local: ReplayCache | None = None, *,
                 on_fallback: Callable[[bool], None] | None = None, retry_seconds: float = 1.0,
                 deadline_seconds: float = 0.5, pending_max: int = PENDING_MAX,
                 clock: Callable[[], float] = time.monotonic):
        self.shared = shared
        self.local = local or ReplayCache()
        self.on_fallback = on_fallback
        self.retry_seconds = retry_seconds
        self.deadline_seconds = deadline_seconds
        self.pending_max = pending_max
        self.clock = clock
        self.degraded = False
        self.pending: dict[str, float] = {}  # accepted here while degraded: key -> expires_at
        self.dropped = 0  # pending entries given up (over the bound) in this outage
        self.probes = 0  # probes started (one at a time)
        self._retry_at = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._stray: set[asyncio.Task[bool]] = set()  # checks that missed their deadline

    @property
    def in_flight(self) -> int:
        """Checks of the shared store that missed their deadline and are still waiting."""
        return len(self._stray)

    async def check_and_store(self, key: str, expires_at: float) -> bool:
        """True the first time ``key`` is seen; False on a replay."""
        if not await self.local.check_and_store(key, expires_at):
            return False  # replayed to this process: no need to ask anyone else
        if self.degraded:
            self._keep(key, expires_at)
            self._maybe_probe()
            return self._fell_back(False)
        asked = asyncio.create_task(self.shared.check_and_store(key, expires_at))
        done, _ = await asyncio.wait({asked}, timeout=self.deadline_seconds)
        if not done:  # no answer in time: decide here, and let the check finish on its own
            self._stray.add(asked)
            asked.add_done_callback(self._stray_done)
            return self._degrade(key, expires_at, "no answer within the deadline")
        try:
            return asked.result()
        except StoreUnavailable as exc:
            return self._degrade(key, expires_at, str(exc))

    def _degrade(self, key: str, expires_at: float, error: str) -> bool:
        self._keep(key, expires_at)
        self._retry_at = self.clock() + self.retry_seconds
        if not self.degraded:
            self.degraded = True
            log.warning("JWT replay store (database) unavailable: jti checked by this "
                        "process only until it is back", extra={"error": error})
        return self._fell_back(True)

    def _keep(self, key: str, expires_at: float) -> None:
        """Remember an accepted key for the shared store (the soonest to expire go first)."""
        self.pending[key] = expires_at
        if len(self.pending) > self.pending_max:
            now = time.time()
            for old in [k for k, exp in self.pending.items() if exp <= now]:
                del self.pending[old]
            while len(self.pending) > self.pending_max:
                del self.pending[min(self.pending, key=self.pending.__getitem__)]
                self.dropped += 1

    def _maybe_probe(self) -> None:
        if self._probe is None and not self._stray and self.clock() >= self._retry_at:
            self.probes += 1
            self._probe = asyncio.create_task(self._write_pending())

    def _stray_done(self, task: asyncio.Task[bool]) -> None:
        self._stray.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failure here is the outage already counted

    async def _write_pending(self) -> None:
        """The probe: write what was accepted here to the shared store; leave the degraded
        state once everything is written (nothing awaits between the check and the change)."""
        try:
            while self.pending:
                now = time.time()
                head = list(itertools.islice(self.pending.items(), WRITE_BATCH))
                batch = [(k, exp) for k, exp in head if exp > now]  # the expired need nothing
                try:
                    clashes = await self.shared.remember(batch) if batch else 0
                except StoreUnavailable:
                    self._retry_at = self.clock() + self.retry_seconds
                    return
                for k, exp in head:
                    if self.pending.get(k) == exp:
                        del self.pending[k]
                if clashes:
                    log.warning("jti accepted by this process during the database outage had "
                                "also been seen by another", extra={"count": clashes})
            self.degraded = False
            log.warning("JWT replay store (database) available again",
                        extra={"dropped": self.dropped})
            self.dropped = 0
        finally:
            self._probe = None

    def _fell_back(self, failed: bool) -> bool:
        if self.on_fallback is not None:
            self.on_fallback(failed)
        return True

    async def aclose(self, within: float = 1.0) -> None:
        """At shutdown: one last try (bounded) to write what was accepted here meanwhile."""
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        for task in list(self._stray):
            task.cancel()
        if self.pending:
            try:
                async with asyncio.timeout(within):
                    await self._write_pending()
            except TimeoutError:
                log.warning("jti accepted during the database outage not written to it",
                            extra={"count": len(self.pending)})
