"""JWT replay protection shared by every replica through the database."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from sqlalchemy import delete, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from cds_service.errors import StoreUnavailable
from cds_service.store.database import Database
from cds_service.store.models import JwtSeen


class DatabaseReplayCache:
    """JWT replay protection shared by every replica through the database."""

    def __init__(self, store: Database):
        self.store = store
        self._writes = 0

    async def check_and_store(self, key: str, expires_at: float) -> bool:
        """True the first time ``key`` is seen before it expires; False on a replay."""
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

    async def remember(self, entries: list[tuple[str, float]]) -> int:
        """Store ``(key, expires_at)`` pairs accepted by a process on its own (while the database
        did not answer); the number another process had already stored, unexpired."""
        if not entries:
            return 0
        upsert = pg_insert if self.store.dialect == "postgresql" else sqlite_insert
        now = datetime.now(UTC)
        rows = {hashlib.sha256(k.encode()).hexdigest(): datetime.fromtimestamp(exp, UTC)
                for k, exp in entries}
        statement = upsert(JwtSeen).values(
            [{"key": k, "expires_at": exp} for k, exp in rows.items()])
        statement = statement.on_conflict_do_update(
            index_elements=["key"], set_={"expires_at": statement.excluded.expires_at},
            where=JwtSeen.expires_at < now)  # a stale row is taken over, a live one kept
        try:
            async with self.store.engine.begin() as conn:
                result = await conn.execute(statement)
        except (SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from exc
        return len(rows) - max(result.rowcount, 0)
