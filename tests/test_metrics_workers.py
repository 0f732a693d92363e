"""/metrics with two uvicorn workers: every scrape, whichever worker takes it, counts the hook
calls of both (prometheus_client multiprocess mode), not only its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from tests.conftest import FIXTURES, ROOT, SELECT
from tests.served import served

T = TypeVar("T")
HOOK_ROUTE = "/cds-services/{service_id}"
BODY = (FIXTURES / "requests" / "v3-seed-mri-w.json").read_bytes()
BATCH = 20
ROUNDS = 6


def sample(route: str) -> str:
    return f'cds_http_requests_total{{route="{route}",status="200"}}'


def page_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def in_parallel(call: Callable[[], T], times: int) -> list[T]:
    """Concurrent calls, each on a new connection, so that both workers take some."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: call(), range(times)))


def hook_call(base: str) -> None:
    r = httpx.post(base + SELECT, content=BODY, timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 200


def scrape(base: str) -> str:
    r = httpx.get(base + "/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def by_worker(shared: Path, route: str) -> dict[int, float]:
    """Requests to ``route`` answered 200 by each worker, read from that worker's own file
    (prometheus_client writes counter_<pid>.db)."""
    counts = {}
    for path in shared.glob("counter_*.db"):
        families = MultiProcessCollector.merge([str(path)])
        counts[int(path.stem.rpartition("_")[2])] = sum(
            s.value for family in families for s in family.samples
            if s.name == "cds_http_requests_total"
            and s.labels == {"route": route, "status": "200"})
    return counts


def settled(shared: Path, route: str, expected: int) -> dict[int, float]:
    """The counts once ``expected`` requests are counted (a worker counts after it answers)."""
    deadline = time.monotonic() + 10
    while True:
        counts = by_worker(shared, route)
        if sum(counts.values()) >= expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def stale_count(shared: Path) -> Path:
    """A previous run's file counting 1000 hook calls: `serve` must remove it."""
    shared.mkdir()
    path = shared / "counter_1.db"
    stale = MmapedDict(str(path))
    stale.write_value(mmap_key("cds_http_requests", "cds_http_requests_total",
                               ["route", "status"], [HOOK_ROUTE, "200"],
                               "HTTP requests by route and status"), 1000.0, 0.0)
    stale.close()
    return path


def upgrade(data: Path) -> None:
    """Migrate first, as compose and the Job do (two workers migrating SQLite at once race)."""
    env = {**os.environ, "CDS_ENV": "development", "CDS_DATA_DIR": str(data)}
    run = subprocess.run([sys.executable, "-m", "cds_service", "db", "upgrade"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_every_scrape_counts_the_hook_calls_of_every_worker(tmp_path: Path) -> None:
    data, shared = tmp_path / "data", tmp_path / "metrics"
    stale = stale_count(shared)
    upgrade(data)
    calls = scrapes = 0
    # audit rows stay queued (no batch fills, no flush due) so the queue gauge counts them all
    with served(data, CDS_WORKERS="2", CDS_MIGRATE_ON_START="false",
                CDS_AUDIT_FLUSH_SECONDS="120", PROMETHEUS_MULTIPROC_DIR=str(shared)) as base:
        for _ in range(ROUNDS):  # until both workers have answered hook calls and scrapes
            in_parallel(lambda: hook_call(base), BATCH)
            calls += BATCH
            hooks = settled(shared, HOOK_ROUTE, calls)
            pages = in_parallel(lambda: scrape(base), BATCH)
            scrapes += BATCH
            assert [page_value(p, sample(HOOK_ROUTE)) for p in pages] == [calls] * BATCH
            assert [page_value(p, "cds_audit_queue_rows") for p in pages] == [calls] * BATCH
            answered = settled(shared, "/metrics", scrapes)
            if sum(1 for n in hooks.values() if n) == sum(1 for n in answered.values() if n) == 2:
                break
        else:
            raise AssertionError(f"one worker took every request: {hooks} {answered}")
        assert sum(hooks.values()) == calls
        assert page_value(scrape(base), 'cds_hook_latency_seconds_count{hook="order-select"}'
                          ) == calls  # a histogram sums over the workers too
    assert not stale.exists()
    assert len(list(shared.glob("counter_*.db"))) == 2
    assert not list(shared.glob("gauge_livesum_*.db"))  # each worker marked itself dead
