"""Audit and feedback storage on a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cds_service.app import create_app
from cds_service.store import FeedbackRecord, Store
from cds_service.store.models import CardShown, FeedbackItem, HookCall
from tests.conftest import FIXTURE_NOW, FIXTURES, SELECT, SIGN, ValidatingClient, dev_settings
from tests.dropping_proxy import pipe

PG_URL = os.environ.get("CDS_TEST_POSTGRES_URL")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    not PG_URL, reason="set CDS_TEST_POSTGRES_URL to run against PostgreSQL"))]
ADMIN = "admin-token-for-tests"


def _pg_admin(sql: str) -> None:
    import asyncpg

    async def run() -> None:
        dsn = (PG_URL or "").replace("postgresql+asyncpg://", "postgresql://")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A fresh database: a SQLite file under ``tmp_path``, or a new PostgreSQL database."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'data' / 'cds.db'}"
        return
    name = f"cds_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = (PG_URL or "").rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from database(request.param, tmp_path)


def app_for(url: str, tmp_path: Path, **extra: Any) -> Any:
    settings = dev_settings(database_url=url, data_dir=tmp_path, admin_token=ADMIN, **extra)
    return create_app(settings, clock=lambda: FIXTURE_NOW)


def fixture_body(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / "requests" / f"{name}.json").read_text())


async def _rows(url: str, model: type[Any]) -> list[Any]:
    store = Store(url, "k")
    try:
        async with store.sessions() as s:
            return list((await s.execute(select(model))).scalars())
    finally:
        await store.dispose()


def rows(url: str, model: type[Any]) -> list[Any]:
    return asyncio.run(_rows(url, model))


def feedback_item(card: str, outcome: str = "accepted", when: str = "2026-11-02T10:00:00Z",
                  suggestion: str | None = "s-1", reason: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"card": card, "outcome": outcome, "outcomeTimestamp": when}
    if outcome == "accepted":
        item["acceptedSuggestions"] = [{"id": suggestion}]
    if reason:
        item["overrideReason"] = {"reason": {"system": "urn:test", "code": reason,
                                             "display": reason.replace("-", " ")},
                                  "userComment": "a comment"}
    return item


def test_hook_call_is_audited_without_the_patient_id(db_url: str, tmp_path: Path) -> None:
    with ValidatingClient(app_for(db_url, tmp_path)) as c:
        r = c.post(SELECT, json=fixture_body("v3-seed-mri-w"))
        card = r.json()["cards"][0]
    calls = rows(db_url, HookCall)
    assert len(calls) == 1
    call = calls[0]
    assert call.hook == "order-select" and call.scenario == "V3"
    assert call.patient_hash != "seed" and len(call.patient_hash) == 64
    assert "seed" not in json.dumps(call.orders)
    order_hash = call.orders[0].pop("order_hash")
    assert len(order_hash) == 64 and "order-1" not in json.dumps(call.orders)
    assert call.orders == [{"procedure": "mri-w", "pama": "not-appropriate", "category": "UNA",
                            "variants": ["V3"]}]
    cards = rows(db_url, CardShown)
    assert [(c.uuid, c.kind, c.indicator) for c in cards] == [
        (card["uuid"], "not-appropriate", "warning")]
    assert cards[0].order_hash == order_hash  # the same (patient, order), never readable
    assert cards[0].suggestions == [s["uuid"] for s in card["suggestions"]]


def test_feedback_is_idempotent_and_unknown_cards_are_flagged(db_url: str,
                                                              tmp_path: Path) -> None:
    with ValidatingClient(app_for(db_url, tmp_path)) as c:
        card = c.post(SELECT, json=fixture_body("v3-seed-mri-w")).json()["cards"][0]
        sid = card["suggestions"][0]["uuid"]
        items = [feedback_item(card["uuid"], suggestion=sid), feedback_item("no-such-card")]
        first = c.post(SELECT + "/feedback", json={"feedback": items})
        assert first.status_code == 200
        assert first.json() == {"received": 2, "stored": 2, "duplicates": 0,
                                "unknown_cards": 1}
        again = c.post(SELECT + "/feedback", json={"feedback": items})
        assert again.json() == {"received": 2, "stored": 0, "duplicates": 2,
                                "unknown_cards": 1}
    stored = {f.card_uuid: f for f in rows(db_url, FeedbackItem)}
    assert set(stored) == {card["uuid"], "no-such-card"}
    assert stored[card["uuid"]].known_card is True
    assert stored[card["uuid"]].accepted_suggestions == [sid]
    assert stored["no-such-card"].known_card is False


def test_concurrent_feedback_is_one_row_per_item(db_url: str, tmp_path: Path) -> None:
    async def run() -> list[dict[str, int]]:
        store = Store(db_url, "k")
        await store.upgrade()
        when = datetime(2026, 11, 2, tzinfo=UTC)
        same = FeedbackRecord(card="c-1", outcome="overridden", outcome_timestamp=when)
        try:
            return await asyncio.gather(*(
                store.store_feedback("svc", [same, FeedbackRecord(
                    card=f"c-{i + 2}", outcome="overridden", outcome_timestamp=when)])
                for i in range(12)))
        finally:
            await store.dispose()

    results = asyncio.run(run())
    assert sum(r["stored"] for r in results) == 13
    assert sorted(f.card_uuid for f in rows(db_url, FeedbackItem)) == sorted(
        ["c-1"] + [f"c-{i + 2}" for i in range(12)])


def test_sandbox_and_spec_feedback_are_stored(db_url: str, tmp_path: Path) -> None:
    with ValidatingClient(app_for(db_url, tmp_path)) as c:
        examples = FIXTURES / "examples"
        for path in [examples / "sandbox" / "sandbox-ui-captured-feedback-accepted.json",
                     *sorted((examples / "spec").glob("v2-feedback-*.json"))]:
            r = c.post(SIGN + "/feedback", json=json.loads(path.read_text()))
            assert r.status_code == 200, path.name
        report = c.get("/admin/report", headers={"Authorization": f"Bearer {ADMIN}",
                                                 "Accept": "application/json"}).json()
    assert len(rows(db_url, FeedbackItem)) == 4
    assert report["unknown_card_feedback"] == 4


def test_report_numbers(db_url: str, tmp_path: Path) -> None:
    with ValidatingClient(app_for(db_url, tmp_path)) as c:
        warning = [c.post(SELECT, json=fixture_body("v3-seed-mri-w")).json()["cards"][0]
                   for _ in range(4)]
        info = [c.post(SELECT, json=fixture_body("v3-seed-xr")).json()["cards"][0]
                for _ in range(3)]
        signed = c.post(SIGN, json=fixture_body("order-sign-three")).json()["cards"]
        assert len(signed) == 2
        items = [
            feedback_item(warning[0]["uuid"], suggestion=warning[0]["suggestions"][0]["uuid"]),
            feedback_item(warning[1]["uuid"], suggestion=warning[1]["suggestions"][0]["uuid"]),
            feedback_item(warning[2]["uuid"], "overridden", reason="specialist-request"),
            feedback_item(info[0]["uuid"], "overridden", reason="clinical-judgement"),
            feedback_item(info[1]["uuid"], "overridden", reason="clinical-judgement"),
            # the same card overridden, then accepted later: the latest outcome counts
            feedback_item(info[2]["uuid"], "overridden", when="2026-11-02T09:00:00Z",
                          reason="patient-preference"),
            feedback_item(info[2]["uuid"], when="2026-11-02T09:05:00Z",
                          suggestion=info[2]["suggestions"][0]["uuid"]),
        ]
        assert c.post(SELECT + "/feedback", json={"feedback": items}).status_code == 200
        auth = {"Authorization": f"Bearer {ADMIN}", "Accept": "application/json"}
        report = c.get("/admin/report", headers=auth).json()
        only_select = c.get("/admin/report", params={"service": "lbp-imaging-order-select"},
                            headers=auth).json()
        later = c.get("/admin/report", params={"start": "2030-01-01"}, headers=auth).json()
    # (the test clock stands still: no call is later than another, so nothing is superseded)
    assert report["totals"] == {"shown": 9, "accepted": 3, "overridden": 3, "ignored": 3,
                                "superseded": 0, "changed_mind": 1}
    kinds = {r["kind"]: r for r in report["by_kind"]}
    assert kinds["not-appropriate"] == {"kind": "not-appropriate", "shown": 5, "accepted": 2,
                                        "overridden": 1, "ignored": 2, "superseded": 0,
                                        "changed_mind": 0}
    assert kinds["better-alternative"] == {"kind": "better-alternative", "shown": 4,
                                           "accepted": 1, "overridden": 2, "ignored": 1,
                                           "superseded": 0, "changed_mind": 1}
    ratings = {r["rating"]: r["shown"] for r in report["by_rating"]}
    assert ratings == {"not-appropriate (UNA)": 5, "appropriate (MBA)": 4}
    assert report["override_reasons"] == [
        {"code": "clinical-judgement", "display": "clinical judgement", "count": 2},
        {"code": "specialist-request", "display": "specialist request", "count": 1}]
    week = (FIXTURE_NOW.date() - timedelta(days=FIXTURE_NOW.weekday())).isoformat()
    assert [(w["week"], w["shown"]) for w in report["weekly"]] == [(week, 9)]
    assert only_select["totals"]["shown"] == 7
    assert later["totals"]["shown"] == 0


def test_admin_routes_need_the_admin_token(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cds.db'}"
    with ValidatingClient(app_for(url, tmp_path)) as c:
        assert c.get("/admin/report").status_code == 401
        assert c.get("/admin/report", headers={"Authorization": "Bearer nope"}).status_code == 401
        page = c.get("/admin/report", headers={"Authorization": f"Bearer {ADMIN}"})
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "<svg" in page.text or "No cards" in page.text
        bad = c.get("/admin/report", params={"start": "yesterday"},
                    headers={"Authorization": f"Bearer {ADMIN}"})
        assert bad.status_code == 400
    settings = dev_settings(database_url=url, data_dir=tmp_path)
    with ValidatingClient(create_app(settings)) as c:  # no admin token: routes are off
        assert c.get("/admin/report").status_code == 404


def test_metrics(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cds.db'}"
    with ValidatingClient(app_for(url, tmp_path)) as c:
        c.post(SELECT, json=fixture_body("v3-seed-mri-w"))
        c.post(SELECT, json=fixture_body("v3-seed-mri-wo"))
        text = c.get("/metrics").text
    assert 'cds_cards_total{indicator="warning",kind="not-appropriate"} 1.0' in text
    assert 'cds_ratings_total{rating="appropriate"} 1.0' in text
    assert 'cds_hook_latency_seconds_count{hook="order-select"} 2.0' in text
    assert ('cds_http_requests_total{route="/cds-services/{service_id}",status="200"} 2.0'
            in text)


# ------------------------------------------------------------------ the database goes away


class TcpProxy:
    """A TCP forwarder we can stop and restart, to make a database unreachable and back."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers += [writer, up_writer]
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def start(self) -> None:
        async def go() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                     reuse_address=True)
        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)

    def stop(self) -> None:
        async def go() -> None:
            if self.server:
                self.server.close()
            for w in self.writers:
                w.close()
            self.writers.clear()
        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)


def outage_url(db_url: str, tmp_path: Path) -> tuple[str, Any, Any]:
    """A URL to the same database plus functions to cut it off and bring it back."""
    if db_url.startswith("sqlite"):
        live = tmp_path / "data"
        gone = tmp_path / "data-away"

        def down() -> None:
            shutil.move(live, gone)

        def up() -> None:
            shutil.move(gone, live)

        return db_url, down, up
    rest = db_url.split("@", 1)[1]
    hostport, dbname = rest.split("/", 1)
    host, port = hostport.split(":")
    proxy = TcpProxy((host, int(port)))
    proxy.start()
    user = db_url.split("://", 1)[1].split("@", 1)[0]
    return f"postgresql+asyncpg://{user}@127.0.0.1:{proxy.port}/{dbname}", proxy.stop, \
        proxy.start


def metric(text: str, name: str) -> float:
    """The value of one sample in a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_database_going_away_and_coming_back(db_url: str, tmp_path: Path) -> None:
    url, down, up = outage_url(db_url, tmp_path)
    with ValidatingClient(app_for(url, tmp_path)) as c:
        card = c.post(SELECT, json=fixture_body("v3-seed-mri-w")).json()["cards"][0]
        item = feedback_item(card["uuid"], suggestion=card["suggestions"][0]["uuid"])
        # the report flushes the audit queue: the first call is stored before the outage
        assert c.get("/admin/report", headers={"Authorization": f"Bearer {ADMIN}"}).is_success
        down()
        try:
            hook = c.post(SELECT, json=fixture_body("v3-seed-mri-w"))
            assert hook.status_code == 200 and hook.json()["cards"]  # still answers
            refused = c.post(SELECT + "/feedback", json={"feedback": [item]})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "5"
            ready = c.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["database"] is False and ready.json()["reason"]
            metrics = c.get("/metrics").text
            assert metric(metrics, 'cds_db_errors_total{operation="audit"}') >= 1
            assert 'cds_db_errors_total{operation="feedback"} 1.0' in metrics
            assert metric(metrics, "cds_audit_queue_rows") == 1  # held, not lost
        finally:
            up()
        retried = c.post(SELECT + "/feedback", json={"feedback": [item]})
        assert retried.status_code == 200 and retried.json()["stored"] == 1
        assert c.get("/readyz").status_code == 200
        metrics = c.get("/metrics").text
        assert metric(metrics, "cds_audit_queue_rows") == 0
        assert metric(metrics, 'cds_audit_rows_dropped_total{reason="queue-full"}') == 0
    assert [f.card_uuid for f in rows(db_url, FeedbackItem)] == [card["uuid"]]
    assert len(rows(db_url, HookCall)) == 2  # the call made during the outage was kept
