"""The connection to the database: engines for SQLite and PostgreSQL, the keyed hashes of
patient and order ids, the schema (Alembic), and whether the database takes writes now."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import delete, event, false, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from cds_service.errors import StoreUnavailable
from cds_service.store.models import HookCall
from cds_service.store.values import InvalidValue, is_data_error, is_read_only

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def json_text(value: Any) -> str:
    """A JSON column's text: orjson's (a tenth of the standard library's cost per audit row);
    the standard library's for what orjson refuses (a key that is not text, a lone surrogate)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Database:
    """The engine and what every kind of row needs (the :class:`~cds_service.store.Store` is
    this and the rows of each job)."""

    def __init__(self, url: str, hash_key: str, *, connect_timeout: float = 3.0):
        self.url = url
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        self._key = hash_key.encode()
        # HMAC-SHA256 keyed once; each hash copies it (the key is not set up again per value)
        self._keyed = hmac.new(self._key, digestmod=hashlib.sha256)
        if self.dialect == "sqlite":
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(
                url, poolclass=NullPool, connect_args={"timeout": 10}, json_serializer=json_text)
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_async_engine(
                url, pool_size=5, max_overflow=10, pool_pre_ping=True, pool_timeout=3,
                connect_args={"timeout": connect_timeout, "command_timeout": 5},
                json_serializer=json_text)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._upsert = pg_insert if self.dialect == "postgresql" else sqlite_insert

    def patient_hash(self, patient_id: str) -> str:
        return self._hash(patient_id.encode())

    def order_hash(self, patient_id: str, order_id: str | None) -> str | None:
        """A keyed hash of (patient, draft order): the same order of the same patient across
        calls (a later call about it supersedes an earlier card), and nothing readable."""
        if not order_id:
            return None
        return self._hash(f"{patient_id}\x1f{order_id}".encode())

    def _hash(self, data: bytes) -> str:
        h = self._keyed.copy()
        h.update(data)
        return h.hexdigest()

    async def dispose(self) -> None:
        await self.engine.dispose()

    async def upgrade(self, revision: str = "head") -> None:
        """Apply every Alembic migration not yet applied (up to ``revision``)."""
        def run(connection: Connection) -> None:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.set_main_option("sqlalchemy.url", self.url)
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)

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
                    if is_read_only(exc):
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
        if is_data_error(exc):
            return InvalidValue(f"the database refused a value ({type(exc).__name__})")
        return StoreUnavailable(type(exc).__name__)
