"""The audit's driver-level insert stores exactly what SQLAlchemy's own insert stores.

Rows go into a real SQLite file and (with CDS_TEST_POSTGRES_URL) a real PostgreSQL database
twice, once through each path; the stored values are then read back raw (as the driver returns
them) and through the ORM, and must be equal column by column.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import StatementError

from cds_service.store import Store
from cds_service.store.bulk import DriverInsert
from cds_service.store.models import CardShown, HookCall
from cds_service.store.values import is_data_error
from tests import test_store as base


@pytest.fixture(params=base.BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from base.database(request.param, tmp_path)


def call_row(i: int, **changes: Any) -> dict[str, Any]:
    row = {"id": f"call-{i}", "service_id": "lbp-imaging-order-select", "hook": "order-select",
           "hook_instance": f"hi-{i}", "patient_hash": "a" * 64, "scenario": None,
           # an offset other than UTC, and a whole second (no microseconds to print)
           "created_at": datetime(2026, 3, 1, 9, 30, 0, tzinfo=timezone(timedelta(hours=-5))),
           "orders": [{"procedure": "mri-lumbar-w", "pama": None, "variants": ["V3"],
                       "text": "é ✓ \"quoted\""}],
           "latency_ms": 1.5, "tenant": None}
    return {**row, **changes}


def card_row(i: int, call: str) -> dict[str, Any]:
    return {"uuid": f"card-{i}", "hook_call_id": call, "service_id": "lbp-imaging-order-select",
            "created_at": datetime(2026, 3, 1, 14, 30, 0, 123456, tzinfo=UTC),
            "kind": "contrast-not-indicated", "indicator": "warning",
            "procedure": "mri-lumbar-w", "pama": "not-appropriate",
            "category": "UNA", "suggestions": ["s-1", "s-2"],
            "order_hash": None}


async def stored(db: Store) -> dict[str, dict[str, dict[str, Any]]]:
    """Every row of both audit tables as the driver returns it (SQLite: dates and JSON as
    text), and as the ORM reads it, keyed by table then by row id."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    async with db.engine.connect() as conn:
        for table, key in (("hook_call", "id"), ("card", "uuid")):
            rows = await conn.exec_driver_sql(f"SELECT * FROM {table}")  # noqa: S608
            out[table] = {str(r._mapping[key]): dict(r._mapping) for r in rows}
        for model, key in ((HookCall, "id"), (CardShown, "uuid")):
            rows = (await conn.execute(select(model))).all()
            out[model.__tablename__ + " orm"] = {
                str(r._mapping[key]): dict(r._mapping) for r in rows}
    return out


def same(orm: dict[str, Any], drv: dict[str, Any]) -> None:
    for column in orm:
        if column in ("id", "uuid", "hook_call_id"):
            continue
        assert orm[column] == drv[column], column


def test_driver_insert_stores_what_sqlalchemy_stores(db_url: str) -> None:
    db = Store(db_url, "k")
    calls = [call_row(1, scenario="V3", tenant="t"), call_row(2)]
    cards = [card_row(1, "call-1")]

    async def run() -> dict[str, dict[str, dict[str, Any]]]:
        await db.upgrade()
        async with db.engine.begin() as conn:
            await conn.execute(db._upsert(HookCall).on_conflict_do_nothing(
                index_elements=["id"]), [{**c, "id": f"orm-{c['id']}"} for c in calls])
            await conn.execute(db._upsert(CardShown).on_conflict_do_nothing(
                index_elements=["uuid"]), [{**c, "uuid": f"orm-{c['uuid']}",
                                            "hook_call_id": "orm-call-1"} for c in cards])
        drv_calls = [{**c, "id": f"drv-{c['id']}"} for c in calls]
        drv_cards = [{**c, "uuid": f"drv-{c['uuid']}", "hook_call_id": "drv-call-1"}
                     for c in cards]
        await db._insert_calls(drv_calls, drv_cards)
        await db._insert_calls(drv_calls, drv_cards)  # again: stored once, nothing raised
        try:
            return await stored(db)
        finally:
            await db.dispose()

    rows = asyncio.run(run())
    assert sorted(rows["hook_call"]) == ["drv-call-1", "drv-call-2", "orm-call-1", "orm-call-2"]
    assert sorted(rows["card"]) == ["drv-card-1", "orm-card-1"]
    for table in ("hook_call", "card", "hook_call orm", "card orm"):
        ids = sorted(i.split("-", 1)[1] for i in rows[table])
        for i in dict.fromkeys(ids):
            same(rows[table][f"orm-{i}"], rows[table][f"drv-{i}"])
    # the driver path converted the instant to UTC, as the ORM path does
    assert rows["hook_call orm"]["drv-call-1"]["created_at"] == datetime(
        2026, 3, 1, 14, 30, tzinfo=UTC)
    assert rows["card orm"]["drv-card-1"]["suggestions"] == ["s-1", "s-2"]
    assert rows["hook_call orm"]["drv-call-1"]["orders"] == call_row(1)["orders"]


def test_a_value_no_type_can_bind_is_a_data_error(db_url: str) -> None:
    db = Store(db_url, "k")
    insert = DriverInsert(db._upsert(HookCall), db.engine.dialect)
    with pytest.raises(StatementError) as caught:
        insert.parameters([call_row(1, orders=[{"x": object()}])])
    assert is_data_error(caught.value) and "object" not in caught.value.statement
    with pytest.raises(KeyError):  # a row must name every column
        insert.parameters([{k: v for k, v in call_row(1).items() if k != "tenant"}])
    asyncio.run(db.dispose())
