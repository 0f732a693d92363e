"""The audit writer under load and through outages, on real SQLite and PostgreSQL databases.

No mocks: the database is made unreachable (SQLite: its folder moved away; PostgreSQL:
connections refused) or read-only (SQLite: the file made immutable or read-only; PostgreSQL:
``default_transaction_read_only``) and brought back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cds_service.settings import Settings
from cds_service.store import AuditWriter, Store
from cds_service.store.models import CardShown, HookCall
from tests import test_store as base
from tests.conftest import SELECT, ValidatingClient
from tests.test_store_values import call

ADMIN = {"Authorization": f"Bearer {base.ADMIN}", "Accept": "application/json"}
Events = list[tuple[str, int, str]]


@pytest.fixture(params=base.BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from base.database(request.param, tmp_path)


async def wait_until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


def _pg_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _pg_kick(name: str) -> None:
    """Close every session on the database (a failover or restart does the same)."""
    base._pg_admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")


def unreachable(url: str, tmp_path: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    """Functions that make the database unreachable and bring it back."""
    if url.startswith("sqlite"):
        live, gone = tmp_path / "data", tmp_path / "data-away"
        return lambda: shutil.move(live, gone), lambda: shutil.move(gone, live)
    name = _pg_name(url)

    def down() -> None:
        base._pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        _pg_kick(name)

    def up() -> None:
        base._pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')

    return down, up


def read_only(url: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """Functions that make the database read-only and writable again."""
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[1])
        if os.geteuid() == 0:  # root ignores file modes: make the file immutable instead
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
                pytest.skip("cannot make a file read-only for root here (no chattr +i)")
            subprocess.run(["chattr", "-i", str(path)], check=True)
            return (lambda: subprocess.run(["chattr", "+i", str(path)], check=True),
                    lambda: subprocess.run(["chattr", "-i", str(path)], check=True))
        return lambda: path.chmod(0o444), lambda: path.chmod(0o644)
    name = _pg_name(url)

    def down() -> None:
        base._pg_admin(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        _pg_kick(name)

    def up() -> None:
        base._pg_admin(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        _pg_kick(name)

    return down, up


# ------------------------------------------------------------------ 5. load


def test_20000_audits_as_fast_as_possible_are_all_written(db_url: str) -> None:
    """The shipped settings keep up: every call is written, none dropped, no flush needed."""
    settings = Settings()
    events: Events = []
    total = 20_000
    stats: dict[str, float] = {}

    async def run() -> int:
        store = Store(db_url, "k")
        await store.upgrade()
        writer = AuditWriter(store, lambda *e: events.append(e),
                             interval=settings.audit_flush_seconds,
                             batch=settings.audit_batch_rows,
                             max_queue=settings.audit_queue_rows,
                             retry_max=settings.audit_retry_max_seconds)
        writer.start()
        started = time.perf_counter()
        peak = 0
        for _ in range(total):
            writer.submit(call())
            peak = max(peak, writer.pending())
            await asyncio.sleep(0)  # as a request handler would, once per call
        stats["submit_seconds"] = time.perf_counter() - started
        await wait_until(lambda: writer.written + writer.dropped >= total, 60)
        stats["written_seconds"] = time.perf_counter() - started
        stats["peak_queue"] = peak
        dropped = writer.dropped
        await writer.stop()
        await store.dispose()
        return dropped

    dropped = asyncio.run(run())
    print(f"\n{db_url.split(':')[0]}: {total} audits submitted in "
          f"{stats['submit_seconds']:.2f}s, all written after {stats['written_seconds']:.2f}s, "
          f"peak queue {stats['peak_queue']:.0f}")
    assert dropped == 0
    assert not [e for e in events if e[0] in ("dropped", "retrying")]
    assert sum(e[1] for e in events if e[0] == "written") == total
    assert len(base.rows(db_url, HookCall)) == total
    assert len(base.rows(db_url, CardShown)) == total


def test_a_full_queue_is_logged_once_per_batch_with_a_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cds.db'}"
    app = base.app_for(url, tmp_path, audit_queue_rows=10, audit_batch_rows=5)
    caplog.set_level(logging.INFO, logger="cds_service")
    with ValidatingClient(app) as c:
        audits = app.state.audits

        def burst() -> None:  # 100 calls in one go, in the event loop: no write can run
            for _ in range(100):
                audits.submit(call())

        c.portal.call(burst)
        assert c.get("/admin/report", headers=ADMIN).status_code == 200  # flushes
        c.portal.call(burst)
        assert c.get("/admin/report", headers=ADMIN).json()["totals"]["shown"] == 20
        metrics = c.get("/metrics").text
    dropped = [r for r in caplog.records if r.getMessage() == "audit rows dropped"]
    assert [(r.rows, r.reason) for r in dropped] == [(90, "queue-full"), (90, "queue-full")]
    assert base.metric(metrics, 'cds_audit_rows_dropped_total{reason="queue-full"}') == 180
    assert base.metric(metrics, "cds_audit_rows_written_total") == 20
    assert len(base.rows(url, HookCall)) == 20


# ------------------------------------------------------------------ 6. outages


def test_audit_rows_survive_an_outage(db_url: str, tmp_path: Path) -> None:
    """Calls audited while the database is unreachable are all written once it is back."""
    down, up = unreachable(db_url, tmp_path)
    events: Events = []
    before, during = [call() for _ in range(10)], [call() for _ in range(500)]

    async def run() -> AuditWriter:
        store = Store(db_url, "k")
        await store.upgrade()
        writer = AuditWriter(store, lambda *e: events.append(e), interval=0.01,
                             batch=100, retry_min=0.05, retry_max=0.2)
        writer.start()
        for audit in before:
            writer.submit(audit)
        await wait_until(lambda: writer.written == 10, 10)
        await asyncio.to_thread(down)
        try:
            for audit in during:
                writer.submit(audit)
                await asyncio.sleep(0)
            await wait_until(lambda: writer.failures >= 3, 30)  # it keeps trying
            assert writer.pending() == 500 and writer.dropped == 0
        finally:
            await asyncio.to_thread(up)
        await wait_until(lambda: writer.pending() == 0, 30)  # no flush: the writer alone
        await writer.stop()
        await store.dispose()
        return writer

    writer = asyncio.run(run())
    assert (writer.written, writer.dropped) == (510, 0)
    assert {e[0] for e in events} >= {"retrying", "resumed", "written"}
    assert "dropped" not in {e[0] for e in events}
    assert sorted(c.hook_instance for c in base.rows(db_url, HookCall)) == sorted(
        a.hook_instance for a in before + during)


def test_calls_still_queued_at_shutdown_with_the_database_down_are_counted(
        tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'cds.db'}"
    down, up = unreachable(url, tmp_path)
    events: Events = []

    async def run() -> None:
        store = Store(url, "k")
        await store.upgrade()
        writer = AuditWriter(store, lambda *e: events.append(e), interval=10,
                             shutdown_seconds=0.3)
        writer.start()
        await asyncio.to_thread(down)
        try:
            for _ in range(3):
                writer.submit(call())
            await writer.stop()
        finally:
            await asyncio.to_thread(up)
        await store.dispose()

    asyncio.run(run())
    assert ("dropped", 3, "shutdown") in events


@pytest.mark.parametrize("fault", ["read-only", "unreachable"])
def test_readyz_and_audit_through_a_read_only_or_unreachable_database(
        db_url: str, tmp_path: Path, fault: str) -> None:
    with ValidatingClient(base.app_for(db_url, tmp_path)) as c:
        assert c.get("/readyz").status_code == 200
        c.post(SELECT, json=base.fixture_body("v3-seed-mri-w"))
        assert c.get("/admin/report", headers=ADMIN).json()["totals"]["shown"] == 1
        down, up = read_only(db_url) if fault == "read-only" else unreachable(db_url, tmp_path)
        down()
        try:
            ready = c.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["status"] == "not ready" and ready.json()["database"] is False
            assert fault in ready.json()["reason"]
            for _ in range(3):
                hook = c.post(SELECT, json=base.fixture_body("v3-seed-mri-w"))
                assert hook.status_code == 200 and hook.json()["cards"]
            feedback = c.post(SELECT + "/feedback", json={"feedback": [base.feedback_item(
                hook.json()["cards"][0]["uuid"], "overridden", reason="clinical-judgement")]})
            assert feedback.status_code == 503 and feedback.headers["retry-after"] == "5"
            assert base.metric(c.get("/metrics").text, "cds_audit_queue_rows") == 3
        finally:
            up()
        assert c.get("/readyz").status_code == 200
        report = c.get("/admin/report", headers=ADMIN).json()
        assert report["totals"]["shown"] == 4  # the three calls held meanwhile are stored
        assert base.metric(c.get("/metrics").text,
                           'cds_audit_rows_dropped_total{reason="queue-full"}') == 0
    assert len(base.rows(db_url, HookCall)) == 4
