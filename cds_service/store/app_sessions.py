"""Sessions of the SMART app (/app/), shared by every worker through the database."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError

from cds_service.store.database import Database
from cds_service.store.models import AppSession


class AppSessionRows(Database):
    """The app sessions: created at the sign-in (replacing the browser's earlier one), read
    while live, expired ones dropped."""

    async def app_session(self, key: str, now: datetime) -> AppSession | None:
        """The app session of that key, unless it is unknown or expired."""
        try:
            async with self.sessions() as session:
                return (await session.execute(select(AppSession).where(
                    AppSession.id == key, AppSession.expires_at > now))).scalar_one_or_none()
        except (SQLAlchemyError, OSError) as exc:
            raise self._failure(exc) from exc

    async def replace_app_session(self, old: str | None, values: dict[str, Any]) -> None:
        """Insert a new app session (``values``: every column), deleting the row of ``old``
        (the session the browser had before) in the same transaction."""
        try:
            async with self.engine.begin() as conn:
                if old is not None:
                    await conn.execute(delete(AppSession).where(AppSession.id == old))
                await conn.execute(self._upsert(AppSession).values(**values))
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
