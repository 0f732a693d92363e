"""A large feedback post must not stall hook calls: bounded posts, short write transactions.

Real SQLite (whose single write lock is what a long transaction holds against everyone) and a
real server over a socket, in production mode: every call carries a JWT whose id the service
records in the database (replay protection), so hook calls write to the database too.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cds_service.settings import Settings
from cds_service.store import FeedbackRecord, Store
from tests.builders import hook_request, order, seed_prefetch
from tests.conftest import ROOT, SELECT, check_response
from tests.test_socket import free_port

ISS = "https://ehr.example.org"
KID = "ehr-key-1"
PUBLIC = "https://cds.example.org"  # the base URL the EHR calls: every JWT's audience
ADMIN = "admin-token-for-tests"
MAX_ITEMS = Settings().feedback_max_items


class LockProbe:
    """Measures, from another connection, the longest wait for SQLite's write lock."""

    def __init__(self, path: Path):
        self.path = path
        self.longest = 0.0
        self.probes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            conn = sqlite3.connect(self.path, timeout=60)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            finally:
                conn.close()
            self.longest = max(self.longest, time.perf_counter() - started)
            self.probes += 1
            time.sleep(0.005)

    def __enter__(self) -> LockProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def records(n: int) -> list[FeedbackRecord]:
    when = datetime(2026, 11, 2, tzinfo=UTC)
    return [FeedbackRecord(card=str(uuid.uuid4()), outcome="overridden",
                           outcome_timestamp=when + timedelta(seconds=i),
                           override_system="urn:test", override_code="clinical-judgement",
                           override_display="Clinical judgement", user_comment="a comment")
            for i in range(n)]


def test_a_large_feedback_write_holds_the_sqlite_lock_only_briefly(tmp_path: Path) -> None:
    """5,000 items: written in short transactions, so another writer never waits long."""
    path = tmp_path / "cds.db"
    url = f"sqlite+aiosqlite:///{path}"

    async def migrate() -> None:
        store = Store(url, "k")
        try:
            await store.upgrade()
        finally:
            await store.dispose()

    async def run() -> dict[str, int]:
        store = Store(url, "k")
        try:
            return await store.store_feedback("svc", records(5000))
        finally:
            await store.dispose()

    asyncio.run(migrate())  # the schema first: the probe measures the feedback write alone
    with LockProbe(path) as probe:
        started = time.perf_counter()
        counts = asyncio.run(run())
        elapsed = time.perf_counter() - started
    print(f"\n5,000 feedback items in {elapsed:.2f}s; longest wait for the write lock "
          f"{probe.longest * 1000:.0f} ms over {probe.probes} probes")
    assert counts["stored"] == 5000
    assert probe.probes > 3
    assert probe.longest < 0.5  # one transaction for all of them held it for seconds


# ------------------------------------------------------------------ a served instance


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Path]]:
    folder = tmp_path_factory.mktemp("feedback-load")
    key = ec.generate_private_key(ec.SECP384R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    public.update(kid=KID, use="sig", alg="ES384")
    issuers = folder / "issuers.json"
    issuers.write_text(json.dumps([{"iss": ISS, "jwks": {"keys": [public]}}]))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    env.update({"CDS_ENV": "production", "CDS_TRUSTED_ISSUERS_FILE": str(issuers),
                "CDS_PUBLIC_BASE_URL": PUBLIC, "CDS_AUDIT_HASH_KEY": "k" * 32,
                "CDS_ADMIN_TOKEN": ADMIN, "CDS_DATA_DIR": str(folder / "data"),
                "CDS_LOG_LEVEL": "WARNING"})
    log = folder / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cds_service", "serve", "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("server did not start: " + log.read_text())
                time.sleep(0.1)
            yield base, key, folder / "data" / "cds.db"
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def auth(key: Any, path: str) -> dict[str, str]:
    now = int(time.time())
    token = jwt.encode({"iss": ISS, "aud": PUBLIC + path, "iat": now, "exp": now + 300,
                        "jti": str(uuid.uuid4())}, key, algorithm="ES384",
                       headers={"kid": KID})
    return {"Authorization": f"Bearer {token}"}


def client(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=60,
                        event_hooks={"response": [lambda r: (r.read(), check_response(r))]})


def feedback_body(n: int) -> dict[str, Any]:
    when = datetime.now(UTC).replace(microsecond=0)
    return {"feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden",
                          "outcomeTimestamp": (when + timedelta(seconds=i)).isoformat(),
                          "overrideReason": {"reason": {"system": "urn:test",
                                                        "code": "clinical-judgement",
                                                        "display": "Clinical judgement"},
                                             "userComment": "a comment"}}
                         for i in range(n)]}


def test_more_feedback_items_than_allowed_is_413(served: tuple[str, Any, Path]) -> None:
    base, key, _ = served
    path = SELECT + "/feedback"
    with client(base) as c:
        r = c.post(path, json=feedback_body(MAX_ITEMS + 1), headers=auth(key, path))
    assert r.status_code == 413
    assert r.json()["resourceType"] == "OperationOutcome"
    assert r.json()["issue"][0]["expression"] == ["feedback"]
    assert str(MAX_ITEMS) in r.json()["issue"][0]["diagnostics"]


def test_hook_calls_answer_while_maximal_feedback_posts_are_written(
        served: tuple[str, Any, Path]) -> None:
    base, key, db = served
    path = SELECT + "/feedback"
    posts = 4
    feedback: list[tuple[int, Any]] = []
    hooks: list[tuple[int, float]] = []
    stop = threading.Event()
    body = hook_request(order(cpt="72148"), prefetch=seed_prefetch(datetime.now(UTC)))

    def post_feedback() -> None:
        with client(base) as c:
            for _ in range(posts):
                r = c.post(path, json=feedback_body(MAX_ITEMS), headers=auth(key, path))
                feedback.append((r.status_code, r.json()))

    def call_hooks() -> None:
        with client(base) as c:
            while not stop.is_set():
                started = time.perf_counter()
                r = c.post(SELECT, json=body, headers=auth(key, SELECT))
                hooks.append((r.status_code, time.perf_counter() - started))

    callers = [threading.Thread(target=call_hooks) for _ in range(2)]
    for t in callers:
        t.start()
    with LockProbe(db) as probe:
        started = time.perf_counter()
        post_feedback()
        elapsed = time.perf_counter() - started
    stop.set()
    for t in callers:
        t.join()
    slowest = max(s for _, s in hooks)
    print(f"\n{posts} posts of {MAX_ITEMS} items in {elapsed:.2f}s; {len(hooks)} hook calls "
          f"meanwhile, slowest {slowest * 1000:.0f} ms; longest wait for the write lock "
          f"{probe.longest * 1000:.0f} ms")
    assert [(s, b["stored"]) for s, b in feedback] == [(200, MAX_ITEMS)] * posts
    assert len(hooks) >= 10
    assert {s for s, _ in hooks} == {200}
    assert slowest < 2.0  # before: ~10 s waiting for the lock (busy timeout), then 503
    with client(base) as c:
        report = c.get("/admin/report", headers={"Authorization": f"Bearer {ADMIN}",
                                                 "Accept": "application/json"}).json()
    assert report["unknown_card_feedback"] == posts * MAX_ITEMS
    with sqlite3.connect(db) as conn:  # the report flushed the audit queue
        assert conn.execute("SELECT count(*) FROM hook_call").fetchone()[0] == len(hooks)
