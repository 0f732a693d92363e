"""JWT replay checks when the shared database is down: this process decides alone, and says so."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cds_service.app import create_app
from cds_service.security import FallbackReplayStore, ReplayCache
from cds_service.store import StoreUnavailable
from tests.builders import hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient
from tests.test_auth_api import BASE, ISS, KID, METRICS, production_settings

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
    """A shared replay store that can be switched off."""

    def __init__(self) -> None:
        self.up = True
        self.inner = ReplayCache()
        self.calls = 0

    async def check_and_store(self, key: str, expires_at: float) -> bool:
        self.calls += 1
        if not self.up:
            raise StoreUnavailable("OSError")
        return await self.inner.check_and_store(key, expires_at)


def test_fallback_store_transitions(logs: pytest.LogCaptureFixture) -> None:
    shared = FlakyStore()
    fallbacks: list[bool] = []
    store = FallbackReplayStore(shared, on_fallback=fallbacks.append,
                                retry_seconds=0)
    exp = time.time() + 300

    async def scenario() -> list[bool]:
        seen = [await store.check_and_store("iss|a", exp)]  # database up
        shared.up = False
        seen.append(await store.check_and_store("iss|a", exp))  # replay during the outage
        seen.append(await store.check_and_store("iss|b", exp))
        seen.append(await store.check_and_store("iss|b", exp))
        seen.append(await store.check_and_store("iss|c", exp))
        shared.up = True
        seen.append(await store.check_and_store("iss|d", exp))
        seen.append(await store.check_and_store("iss|b", exp))  # seen here during the outage
        shared.up = False
        seen.append(await store.check_and_store("iss|e", exp))
        return seen

    assert asyncio.run(scenario()) == [True, False, True, False, True, True, False, True]
    assert fallbacks == [True] * 3  # b, c, e were accepted by this process alone
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
        assert shared.calls == 1  # within 2 s of the failure: the database is not asked
        shared.up = True
        clock[0] = 102.5
        assert await store.check_and_store("iss|c", exp)
        assert shared.calls == 2

    asyncio.run(scenario())


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
