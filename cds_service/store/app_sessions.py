"""Sessions of the SMART app (/app/), shared by every worker through the database."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError

from cds_service.store.database import Database
from cds_service.store.models import AppSession


class AppSessionRows(Database):
    """The app sessions: saved, read while live, their ``state`` used once, expired ones
    dropped."""

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
