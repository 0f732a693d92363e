"""What an anonymous launch may cost: the EHR's SMART configuration is read once per ``iss`` for
minutes (concurrent launches wait for one read), launches are limited per client address and in
all, and a launch writes nothing to the database (its state travels in a sealed cookie until the
callback, which writes the session).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

from cds_service.smart.oauth import SmartConfig
from cds_service.smart.problems import Problem

MAX_CACHED = 64  # issuers whose configuration is kept (the allow-list is short)
FAILURE_SECONDS = 5.0  # a configuration that could not be read is not asked for again sooner
WINDOW_SECONDS = 60.0


class ConfigCache:
    """The SMART configuration of each ``iss``, read once per ``seconds``."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self._kept: dict[str, tuple[float, SmartConfig | Problem]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, iss: str, read: Callable[[], Awaitable[SmartConfig]]) -> SmartConfig:
        """The configuration of ``iss`` (``read`` when none is kept); a Problem while a failed
        read is recent."""
        found = self._fresh(iss)
        if found is None:
            lock = self._locks.setdefault(iss, asyncio.Lock())
            async with lock:  # concurrent launches of one EHR: one read
                found = self._fresh(iss)
                if found is None:
                    try:
                        found = await read()
                        self._keep(iss, found, self.seconds)
                    except Problem as problem:
                        self._keep(iss, problem, min(FAILURE_SECONDS, self.seconds))
                        raise
            if not lock.locked():
                self._locks.pop(iss, None)
        if isinstance(found, Problem):  # a new one: a raised exception keeps its traceback
            raise Problem(found.status, found.title, found.text, found.advice, found.headers)
        return found

    def _fresh(self, iss: str) -> SmartConfig | Problem | None:
        kept = self._kept.get(iss)
        if kept is None or kept[0] <= self.clock():
            return None
        return kept[1]

    def _keep(self, iss: str, value: SmartConfig | Problem, seconds: float) -> None:
        if len(self._kept) >= MAX_CACHED and iss not in self._kept:
            del self._kept[min(self._kept, key=lambda k: self._kept[k][0])]
        self._kept[iss] = (self.clock() + seconds, value)


class LaunchLimiter:
    """At most ``per_address`` launches a minute from one client address, ``total`` from all
    (per process: a flood of anonymous launches costs the EHR and the service little)."""

    def __init__(self, per_address: int, total: int,
                 clock: Callable[[], float] = time.monotonic):
        self.per_address = per_address
        self.total = total
        self.clock = clock
        self._window = -1.0
        self._counts: dict[str, int] = {}
        self._all = 0

    def allow(self, address: str) -> bool:
        window = self.clock() // WINDOW_SECONDS
        if window != self._window:
            self._window, self._counts, self._all = window, {}, 0
        count = self._counts.get(address, 0)
        if count >= self.per_address or self._all >= self.total:
            return False
        self._counts[address] = count + 1
        self._all += 1
        return True

    def retry_after(self) -> int:
        """Seconds until the next window."""
        return max(1, int(WINDOW_SECONDS - self.clock() % WINDOW_SECONDS) + 1)


def too_many(retry_after: int) -> Problem:
    return Problem(429, "Too many launches right now",
                   "The app was opened more often in the last minute than it allows.",
                   "Wait a minute, then open the app again from the card.",
                   headers={"Retry-After": str(retry_after)})


@dataclass(frozen=True)
class Launch:
    """A launch on its way to the EHR and back: kept in a sealed cookie, not in the database."""

    state: str  # SHA-256 of the OAuth state
    verifier: str  # PKCE
    iss: str
    token_endpoint: str
    redirect_uri: str

    def dumps(self) -> bytes:
        return orjson.dumps([self.state, self.verifier, self.iss, self.token_endpoint,
                             self.redirect_uri])

    @classmethod
    def loads(cls, raw: bytes | None) -> Launch | None:
        try:
            value = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return None
        if not isinstance(value, list) or len(value) != 5 \
                or not all(isinstance(v, str) for v in value):
            return None
        return cls(*value)
