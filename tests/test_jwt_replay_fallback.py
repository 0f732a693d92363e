"""JWT replay checks when the shared database is down: this process decides alone, and says so."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cds_service.app import create_app
from cds_service.security import FallbackReplayStore, ReplayCache
from cds_service.store import DatabaseReplayCache, Store, StoreUnavailable
from tests.builders import hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient
from tests.dropping_proxy import DroppingProxy
from tests.test_auth_api import BASE, ISS, KID, METRICS, production_settings
from tests.test_store import BACKENDS, PG_URL, database

KEY = ec.generate_private_key(ec.SECP384R1())
PUBLIC = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key())),
          "kid": KID, "alg": "ES384", "use": "sig"}
ISSUERS = [{"iss": ISS, "jwks": {"keys": [PUBLIC]}}]
CLOSED_PORT_DB = "postgresql+asyncpg://root@127.0.0.1:1/none"  # nothing listens on port 1


def token(path: str = SELECT) -> tuple[str, str]:
    now = int(time.time())
    jti = str(uuid.uuid4())
    return jwt.encode({"iss": ISS, "aud": BASE + path, "iat": now, "exp": now + 300,
                       "jti": jti}, KEY, algorithm="ES384", headers={"kid": KID}), jti


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


def wait_for(condition: Callable[[], bool], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def pg_database(tmp_path: Path) -> Iterator[str]:
    yield from database("postgresql", tmp_path)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    logging.getLogger("cds_service").propagate = True  # configure_logging may have cut it
    caplog.set_level(logging.INFO, logger="cds_service")
    return caplog


def counter(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def fallback_count(metrics: str) -> float:
    return counter(metrics, "cds_jwt_replay_fallback_total")


def test_hooks_answer_with_the_database_down(tmp_path: Path,
                                             logs: pytest.LogCaptureFixture) -> None:
    settings = production_settings(tmp_path, ISSUERS, database_url=CLOSED_PORT_DB)
    body = hook_request(order(), prefetch=seed_prefetch(FIXTURE_NOW))
    first, first_jti = token()
    second, second_jti = token()
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as client:
        assert client.get("/readyz").status_code == 503  # the database really is down
        ok = client.post(SELECT, json=body, headers={"Authorization": f"Bearer {first}"})
        assert ok.status_code == 200 and ok.json()["cards"]
        replay = client.post(SELECT, json=body, headers={"Authorization": f"Bearer {first}"})
        assert replay.status_code == 401  # this process remembers the jti
        assert client.post(SELECT, json=body, headers={
            "Authorization": f"Bearer {second}"}).status_code == 200
        discovery, _ = token("/cds-services")
        assert client.get("/cds-services", headers={
            "Authorization": f"Bearer {discovery}"}).status_code == 200
        metrics = client.get("/metrics", headers=METRICS).text
    assert fallback_count(metrics) == 3  # the replay was refused without asking the database
    assert 1 <= counter(metrics, 'cds_db_errors_total{operation="jwt-replay"}') <= 3
    fallback_logs = [r for r in logs.records if "replay" in r.getMessage()]
    assert len(fallback_logs) == 1 and fallback_logs[0].levelname == "WARNING"
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in logs.records)
    for secret in (first, second, first_jti, second_jti):
        assert secret not in text
    assert first.split(".")[1] not in text


class FlakyStore:
    """A shared replay store that can be switched off, or made to hang (packets dropped)."""

    def __init__(self) -> None:
        self.up = True
        self.inner = ReplayCache()
        self.calls = 0  # checks and writes asked of it
        self.remembered: list[str] = []
        self.answer = asyncio.Event()
        self.answer.set()

    async def check_and_store(self, key: str, expires_at: float) -> bool:
        self.calls += 1
        await self.answer.wait()
        if not self.up:
            raise StoreUnavailable("OSError")
        return await self.inner.check_and_store(key, expires_at)

    async def remember(self, entries: list[tuple[str, float]]) -> int:
        self.calls += 1
        await self.answer.wait()
        if not self.up:
            raise StoreUnavailable("OSError")
        clashes = 0
        for key, exp in entries:
            self.remembered.append(key)
            clashes += not await self.inner.check_and_store(key, exp)
        return clashes


async def settle() -> None:
    """Let background tasks (the probe) run to their next wait."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_fallback_store_transitions(logs: pytest.LogCaptureFixture) -> None:
    shared = FlakyStore()
    fallbacks: list[bool] = []
    store = FallbackReplayStore(shared, on_fallback=fallbacks.append, retry_seconds=0)
    other_worker = FallbackReplayStore(shared)
    exp = time.time() + 300

    async def scenario() -> list[bool]:
        seen = [await store.check_and_store("iss|a", exp)]  # database up
        shared.up = False
        seen.append(await store.check_and_store("iss|a", exp))  # replay during the outage
        seen.append(await store.check_and_store("iss|b", exp))  # asked, failed: degraded
        seen.append(await store.check_and_store("iss|b", exp))
        seen.append(await store.check_and_store("iss|c", exp))  # a probe starts and fails
        await settle()
        assert store.degraded
        shared.up = True
        seen.append(await store.check_and_store("iss|d", exp))  # a probe starts, succeeds
        await settle()
        assert not store.degraded and not store.pending
        seen.append(await store.check_and_store("iss|b", exp))  # seen here during the outage
        # another worker refuses what this one accepted alone during the outage
        seen += [await other_worker.check_and_store(f"iss|{k}", exp) for k in "bcd"]
        shared.up = False
        seen.append(await store.check_and_store("iss|e", exp))
        return seen

    assert asyncio.run(scenario()) == [True, False, True, False, True, True, False,
                                       False, False, False, True]
    assert fallbacks == [True, False, False, True]  # b (asked), c and d (not asked), e
    assert sorted(set(shared.remembered)) == ["iss|b", "iss|c", "iss|d"]
    messages = [r.getMessage() for r in logs.records if r.name.startswith("cds_service")]
    assert sum("unavailable" in m for m in messages) == 2  # once per outage
    assert sum("available again" in m for m in messages) == 1


def test_fallback_store_skips_the_database_briefly_after_a_failure() -> None:
    shared = FlakyStore()
    clock = [100.0]
    store = FallbackReplayStore(shared, retry_seconds=2, clock=lambda: clock[0])
    exp = time.time() + 300

    async def scenario() -> None:
        shared.up = False
        assert await store.check_and_store("iss|a", exp)
        assert shared.calls == 1
        clock[0] = 101.0
        assert not await store.check_and_store("iss|a", exp)
        assert await store.check_and_store("iss|b", exp)
        await settle()
        assert shared.calls == 1  # within 2 s of the failure: the database is not asked
        shared.up = True
        clock[0] = 102.5
        assert await store.check_and_store("iss|c", exp)  # decided here; the probe writes
        await settle()
        assert shared.calls == 2 and shared.remembered == ["iss|a", "iss|b", "iss|c"]
        assert not store.degraded
        assert await store.check_and_store("iss|d", exp)  # asked again
        assert shared.calls == 3

    asyncio.run(scenario())


def test_one_probe_at_a_time_while_degraded() -> None:
    """Concurrent calls during an outage do not each ask the database after the back-off."""
    shared = FlakyStore()
    store = FallbackReplayStore(shared, retry_seconds=0, deadline_seconds=0.05)
    exp = time.time() + 300

    async def scenario() -> None:
        shared.answer.clear()  # packets dropped: nothing answers, nothing fails
        assert await store.check_and_store("iss|first", exp)  # past the deadline: decided here
        assert store.degraded and shared.calls == 1
        shared.answer.set()  # the first check ends (in the background), the database fails
        shared.up = False
        await settle()
        shared.up, _ = True, shared.answer.clear()  # back, but slow to answer
        answers = await asyncio.gather(*(store.check_and_store(f"iss|{i}", exp)
                                          for i in range(50)))
        assert answers == [True] * 50
        await settle()
        assert store.probes == 1 and shared.calls == 2  # one write of the 51, in flight
        shared.answer.set()
        await settle()
        assert not store.degraded and len(set(shared.remembered)) == 51

    asyncio.run(scenario())


def test_accepted_jtis_kept_for_the_shared_store_are_bounded() -> None:
    shared = FlakyStore()
    shared.up = False
    store = FallbackReplayStore(shared, retry_seconds=3600, pending_max=100)

    async def scenario() -> None:
        for i in range(1000):
            assert await store.check_and_store(f"iss|{i}", time.time() + 300 + i)
        assert len(store.pending) == 100 and store.dropped == 900
        assert min(store.pending) >= "iss|900" and "iss|999" in store.pending  # latest kept

    asyncio.run(scenario())


def test_a_database_that_drops_packets_costs_the_deadline_not_the_driver_timeouts() -> None:
    """A real PostgreSQL driver against a listener that accepts and never answers: the check
    answers while the database connection still hangs, and concurrent calls do not connect."""
    async def scenario(proxy: DroppingProxy) -> None:
        database = Store(proxy.url(), "k")
        store = FallbackReplayStore(DatabaseReplayCache(database), retry_seconds=0,
                                    deadline_seconds=0.2)
        exp = time.time() + 300
        try:
            assert await store.check_and_store("iss|a", exp)
            assert proxy.held == 1  # answered while the database call is still unanswered
            answers = await asyncio.gather(*(store.check_and_store(f"iss|{i}", exp)
                                              for i in range(30)))
            assert answers == [True] * 30 and store.degraded
            assert proxy.accepted == 1  # nobody else asked while one check is in flight
        finally:
            await store.aclose(within=0.1)
            await database.dispose()

    with DroppingProxy() as proxy:
        asyncio.run(scenario(proxy))


@pytest.mark.parametrize("kind", BACKENDS)
def test_the_shared_store_takes_jtis_accepted_elsewhere(kind: str, tmp_path: Path) -> None:
    for url in database(kind, tmp_path):
        async def scenario(url: str) -> None:
            store = Store(url, "k")
            await store.upgrade()
            shared = DatabaseReplayCache(store)
            now = time.time()
            try:
                assert await shared.check_and_store("iss|seen", now + 300)
                assert await shared.check_and_store("iss|stale", now - 10)
                clashes = await shared.remember([("iss|seen", now + 300), ("iss|new", now + 300),
                                                 ("iss|stale", now + 300)])
                assert clashes == 1  # only the unexpired one was seen elsewhere
                for key in ("iss|new", "iss|stale", "iss|seen"):
                    assert not await shared.check_and_store(key, now + 300)
            finally:
                await store.dispose()

        asyncio.run(scenario(url))


@pytest.mark.skipif(not PG_URL, reason="set CDS_TEST_POSTGRES_URL to run against PostgreSQL")
def test_a_jwt_used_during_an_outage_is_refused_by_another_worker_afterwards(
        tmp_path: Path, pg_database: str) -> None:
    """Two workers share one PostgreSQL; packets to the first are dropped while it accepts two
    tokens; once the network heals, the second worker refuses both."""
    url = pg_database
    host, port = url.split("@", 1)[1].split("/", 1)[0].split(":")
    body = hook_request(order(), prefetch=seed_prefetch(FIXTURE_NOW))
    first, second, third = token()[0], token()[0], token()[0]
    for worker in ("a", "b"):
        (tmp_path / worker).mkdir()
    other = production_settings(tmp_path / "b", ISSUERS, database_url=url)
    with ValidatingClient(create_app(other, clock=lambda: FIXTURE_NOW)) as b, \
            DroppingProxy((host, int(port))) as proxy:
        dropped = production_settings(tmp_path / "a", ISSUERS, migrate_on_start=False,
                                      database_url=proxy.url(database=url.rsplit("/", 1)[1]))
        app = create_app(dropped, clock=lambda: FIXTURE_NOW)
        with ValidatingClient(app) as a:
            replay = app.state.services.verifier.replay
            replay.retry_seconds = 0
            for t in (first, second):
                assert a.post(SELECT, json=body, headers=bearer(t)).status_code == 200
            assert replay.degraded and proxy.held >= 1
            proxy.heal()
            wait_for(lambda: not replay.in_flight)  # the check in flight gets its answer
            assert a.post(SELECT, json=body, headers=bearer(third)).status_code == 200
            wait_for(lambda: not replay.degraded)  # the probe wrote what was accepted alone
        for t in (first, second, third):
            assert b.post(SELECT, json=body, headers=bearer(t)).status_code == 401


def test_replay_cache_forgets_expired_entries() -> None:
    cache = ReplayCache()

    async def scenario() -> None:
        past = time.time() - 1
        for i in range(5000):
            assert await cache.check_and_store(f"k{i}", past + (i % 2) * 600)
        assert await cache.check_and_store("k0", time.time() + 60)  # k0 had expired
        assert not await cache.check_and_store("k1", time.time() + 60)
        assert len(cache) <= 2600

    asyncio.run(scenario())


def test_replay_check_uses_the_database_when_it_is_up(tmp_path: Path) -> None:
    """With a working database nothing falls back (and replicas share the replay check)."""
    settings = production_settings(tmp_path, ISSUERS)
    body = hook_request(order(), prefetch=seed_prefetch(FIXTURE_NOW))
    t, _ = token()
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as client:
        assert client.post(SELECT, json=body,
                           headers={"Authorization": f"Bearer {t}"}).status_code == 200
        assert client.post(SELECT, json=body,
                           headers={"Authorization": f"Bearer {t}"}).status_code == 401
        assert fallback_count(client.get("/metrics", headers=METRICS).text) == 0
