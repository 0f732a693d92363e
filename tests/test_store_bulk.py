"""The SQLite audit's multi-row INSERTs (cds_service/store/bulk.py), on real SQLite files: the
rows are those SQLAlchemy's own executemany stores, and a batch is a few statements, not a
statement step per row (each step a hand-over of the interpreter lock between the driver's thread
and the event loop, which starved the writer under load: bench/RESULTS.md, sixth try).

How long the writer then takes under load is not tested here: it depends on when the busy event
loop lets the driver's thread have the lock, which is the benchmark's to measure."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from cds_service.store import Store
from cds_service.store.bulk import MultiRowInsert
from cds_service.store.models import CardShown, HookCall
from tests.test_store_values import call


def stored(path: Path, table: str) -> list[tuple[Any, ...]]:
    """Every row of a table as SQLite holds it (text, numbers), in a fixed order."""
    with sqlite3.connect(path) as db:
        return sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)


def varied_calls(n: int) -> list[Any]:
    """Calls whose values exercise every column's conversion: instants with and without a UTC
    offset of their own, JSON lists, absent optional values, a tenant."""
    calls = []
    for i in range(n):
        when = datetime(2026, 11, 2, 10, tzinfo=UTC) + timedelta(seconds=i, microseconds=i)
        c = call(created_at=when, scenario=None if i % 3 == 0 else "V3",
                 tenant="north" if i % 2 else None, latency_ms=i / 7)
        c.orders = [{"procedure": "mri-w", "pama": None if i % 4 else "not-appropriate",
                     "order_id": f"o-{i}", "variants": ["V3", "V6"][: i % 3]}]
        c.cards[0].order_id = f"o-{i}"
        c.cards[0].pama = None if i % 5 == 0 else "not-appropriate"
        calls.append(c)
    return calls


async def _sqlalchemy_executemany(store: Store, calls: list[dict[str, Any]],
                                  cards: list[dict[str, Any]]) -> None:
    """The path the multi-row statements replace on SQLite (PostgreSQL still takes it)."""
    async with store.engine.begin() as conn:
        await conn.execute(sqlite_insert(HookCall).on_conflict_do_nothing(
            index_elements=["id"]), calls)
        await conn.execute(sqlite_insert(CardShown).on_conflict_do_nothing(
            index_elements=["uuid"]), cards)


def test_multi_row_statements_store_what_sqlalchemy_stores(tmp_path: Path) -> None:
    audits = varied_calls(40)

    async def run() -> None:
        bulk = Store(f"sqlite+aiosqlite:///{tmp_path}/bulk.db", "k")
        plain = Store(f"sqlite+aiosqlite:///{tmp_path}/plain.db", "k")
        for store in (bulk, plain):
            await store.upgrade()
        assert (await bulk.record_calls(audits)).written == 40
        calls, cards, _ = plain._rows(audits)
        await _sqlalchemy_executemany(plain, calls, cards)
        for store in (bulk, plain):
            await store.dispose()

    asyncio.run(run())
    for table in ("hook_call", "card"):
        rows = stored(tmp_path / "bulk.db", table)
        assert len(rows) == 40
        assert rows == stored(tmp_path / "plain.db", table)
    # the instant is SQLite's date text in UTC, the lists are JSON text
    first = stored(tmp_path / "bulk.db", "hook_call")
    assert any(r[1] == "2026-11-02 10:00:00.000000" for r in first)
    assert all(isinstance(r[7], str) and r[7].startswith("[") for r in first)


def test_a_batch_is_one_statement_per_table_not_one_step_per_row(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/a.db"
    seen: list[tuple[str, bool]] = []

    async def run() -> None:
        store = Store(url, "k")
        await store.upgrade()
        event.listen(store.engine.sync_engine, "before_cursor_execute",
                     lambda _c, _cur, sql, _p, _ctx, many: seen.append((sql.split("(")[0], many)))
        result = await store.record_calls([call() for _ in range(2500)])
        assert result.written == 2500
        await store.dispose()

    asyncio.run(run())
    inserts = [s for s in seen if s[0].startswith("INSERT")]
    assert inserts == [("INSERT INTO hook_call ", False)] * 3 + [("INSERT INTO card ", False)] * 3
    assert len(stored(tmp_path / "a.db", "hook_call")) == 2500
    assert len(stored(tmp_path / "a.db", "card")) == 2500


def test_rows_are_split_to_fit_the_parameters_sqlite_allows(tmp_path: Path) -> None:
    audits = varied_calls(7)

    async def run() -> list[int]:
        store = Store(f"sqlite+aiosqlite:///{tmp_path}/a.db", "k")
        await store.upgrade()
        calls, cards, _ = store._rows(audits)
        dialect = store.engine.dialect
        small = [MultiRowInsert(sqlite_insert(model).on_conflict_do_nothing(
            index_elements=[key]), dialect, max_parameters=25)
            for model, key in ((HookCall, "id"), (CardShown, "uuid"))]
        assert [m.rows_per_statement for m in small] == [2, 2]  # 10 and 11 columns
        async with store.engine.begin() as conn:
            taken = [await small[0].run(conn, calls), await small[1].run(conn, cards)]
        async with store.engine.begin() as conn:  # the same rows again: stored once
            await small[0].run(conn, calls)
            await small[1].run(conn, cards)
        await store.dispose()
        return taken

    assert asyncio.run(run()) == [4, 4]
    assert len(stored(tmp_path / "a.db", "hook_call")) == 7
    assert len(stored(tmp_path / "a.db", "card")) == 7
