"""Values the database cannot hold: audit rows are fitted, feedback is refused with 400.

Every test runs on a real SQLite file and (with CDS_TEST_POSTGRES_URL) a real PostgreSQL
database; PostgreSQL is the one that refuses NUL and over-long strings, SQLite the one that
used to drop UTC offsets.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cds_service.store import (
    AuditWriter,
    CallAudit,
    CardAudit,
    FeedbackRecord,
    InvalidValue,
    Store,
)
from cds_service.store.models import CardShown, FeedbackItem, HookCall
from cds_service.store.values import HOOK_CALL_COLUMNS, fit_row
from tests import test_store as base
from tests.conftest import SELECT, ValidatingClient

ADMIN = {"Authorization": f"Bearer {base.ADMIN}", "Accept": "application/json"}


@pytest.fixture(params=base.BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from base.database(request.param, tmp_path)


def call(hook_instance: str | None = None, **changes: Any) -> CallAudit:
    values: dict[str, Any] = {
        "service_id": "lbp-imaging-order-select", "hook": "order-select",
        "hook_instance": hook_instance or str(uuid.uuid4()), "patient_id": "pt-1",
        "scenario": "V3", "orders": [{"procedure": "mri-w", "pama": "not-appropriate"}],
        "cards": [CardAudit(uuid=str(uuid.uuid4()), kind="not-appropriate",
                            indicator="warning", procedure="mri-w", pama="not-appropriate",
                            category="UNA", suggestions=[str(uuid.uuid4())])],
        "latency_ms": 1.5, "created_at": datetime(2026, 11, 2, 10, tzinfo=UTC)}
    values.update(changes)
    return CallAudit(**values)


# ------------------------------------------------------------------ 1. audit batch poisoning


def test_a_bad_hook_instance_does_not_poison_the_audit_batch(db_url: str) -> None:
    """A 150-character or NUL-holding hookInstance is cut/cleaned; no call of the batch is lost."""
    good = [call() for _ in range(5)]
    long = call("h" * 150)
    nul = call("abc\x00def")
    events: list[tuple[str, int, str]] = []

    async def run() -> None:
        store = Store(db_url, "k")
        await store.upgrade()
        writer = AuditWriter(store, lambda *e: events.append(e), interval=0.01)
        writer.start()
        for audit in [*good[:2], long, *good[2:4], nul, good[4]]:
            writer.submit(audit)
        await writer.stop()
        await store.dispose()

    asyncio.run(run())
    stored = sorted(c.hook_instance for c in base.rows(db_url, HookCall))
    # every call is there; the long one cut to the column's length (from the model), the NUL
    # replaced
    assert stored == sorted([a.hook_instance for a in good] + ["h" * 100, "abc\ufffddef"])
    assert len(base.rows(db_url, CardShown)) == 7
    assert ("fixed", 2, "") in events
    assert not [e for e in events if e[0] in ("dropped", "retrying")]


def test_a_call_the_database_refuses_is_dropped_alone_and_counted(db_url: str) -> None:
    """If a batch fails for its data, the calls are written one by one; only the bad one goes."""
    good = [call() for _ in range(4)]
    bad = call(orders=[{"procedure": object()}])  # no database can store this value

    async def run() -> None:
        store = Store(db_url, "k")
        await store.upgrade()
        result = await store.record_calls([good[0], good[1], bad, good[2], good[3]])
        assert (result.written, result.invalid) == (4, 1)
        await store.dispose()

    asyncio.run(run())
    assert sorted(c.hook_instance for c in base.rows(db_url, HookCall)) == sorted(
        a.hook_instance for a in good)


def test_hook_calls_with_bad_hook_instances_are_all_audited(db_url: str,
                                                            tmp_path: Path) -> None:
    instances = ["x" * 101, "with\x00nul", "plain"]
    with ValidatingClient(base.app_for(db_url, tmp_path)) as c:
        for instance in instances:
            body = base.fixture_body("v3-seed-mri-w")
            body["hookInstance"] = instance
            assert c.post(SELECT, json=body).status_code == 200
        assert c.get("/admin/report", headers=ADMIN).json()["totals"]["shown"] == 3
        metrics = c.get("/metrics").text
    assert base.metric(metrics, "cds_audit_rows_fixed_total") == 2
    assert base.metric(metrics, "cds_audit_rows_written_total") == 3
    assert sorted(c.hook_instance for c in base.rows(db_url, HookCall)) == sorted(
        ["x" * 100, "with\ufffdnul", "plain"])


# ------------------------------------------------------------------ 2. feedback never storable


def _feedback(c: ValidatingClient, **item: Any) -> Any:
    body = {"card": "card-1", "outcome": "overridden",
            "outcomeTimestamp": "2026-11-02T10:00:00Z", **item}
    return c.post(SELECT + "/feedback", json={"feedback": [body]})


@pytest.mark.parametrize(("item", "field"), [
    ({"card": "c" * 101}, "feedback.0.card"),
    ({"card": "card\x00one"}, "feedback.0.card"),
    ({"overrideReason": {"userComment": "a\x00comment"}},
     "feedback.0.overrideReason.userComment"),
    ({"overrideReason": {"reason": {"code": "x" * 101}}},
     "feedback.0.overrideReason.reason.code"),
    ({"overrideReason": {"reason": {"code": "c", "display": "d" * 301}}},
     "feedback.0.overrideReason.reason.display"),
    ({"outcomeTimestamp": "9999-12-31T23:59:59-14:00"}, "feedback.0.outcomeTimestamp"),
    ({"outcomeTimestamp": "0001-01-01T00:00:00+14:00"}, "feedback.0.outcomeTimestamp"),
    ({"outcome": "accepted", "acceptedSuggestions": [{"id": "s\x00"}]},
     "feedback.0.acceptedSuggestions.0.id"),
])
def test_feedback_that_can_never_be_stored_is_400_naming_the_field(
        db_url: str, tmp_path: Path, item: dict[str, Any], field: str) -> None:
    with ValidatingClient(base.app_for(db_url, tmp_path)) as c:
        r = _feedback(c, **item)
        assert r.status_code == 400, r.text
        assert r.json()["resourceType"] == "OperationOutcome"
        assert r.json()["issue"][0]["expression"] == [field]
        assert "retry-after" not in r.headers
        ok = _feedback(c)  # the service is fine: the next valid item is stored
        assert ok.status_code == 200 and ok.json()["stored"] == 1
    assert [f.card_uuid for f in base.rows(db_url, FeedbackItem)] == ["card-1"]


def test_the_store_refuses_feedback_values_it_cannot_hold(db_url: str) -> None:
    """The same rule below HTTP: InvalidValue (never StoreUnavailable), nothing written."""
    when = datetime(2026, 11, 2, tzinfo=UTC)
    fine = FeedbackRecord(card="ok", outcome="overridden", outcome_timestamp=when)
    bad = [(FeedbackRecord(card="c" * 101, outcome="overridden", outcome_timestamp=when),
            "card"),
           (FeedbackRecord(card="c", outcome="overridden", outcome_timestamp=when,
                           user_comment="\x00"), "user_comment"),
           (FeedbackRecord(card="c", outcome="overridden",
                           outcome_timestamp=datetime.fromisoformat(
                               "9999-12-31T23:59:59-14:00")), "outcome_timestamp")]

    async def run() -> None:
        store = Store(db_url, "k")
        await store.upgrade()
        try:
            for record, attr in bad:
                with pytest.raises(InvalidValue) as caught:
                    await store.store_feedback("svc", [fine, record])
                assert (caught.value.field, caught.value.index) == (attr, 1)
        finally:
            await store.dispose()

    asyncio.run(run())
    assert base.rows(db_url, FeedbackItem) == []


@pytest.mark.parametrize("params", [
    {"service": "\x00"}, {"service": "s" * 101},
    {"start": "9999-12-31T23:59:59-14:00"}, {"end": "0001-01-01T00:00:00+14:00"},
])
def test_report_with_a_bad_filter_is_400_not_503(db_url: str, tmp_path: Path,
                                                 params: dict[str, str]) -> None:
    with ValidatingClient(base.app_for(db_url, tmp_path)) as c:
        r = c.get("/admin/report", params=params, headers=ADMIN)
        assert r.status_code == 400, r.text
        assert r.json()["resourceType"] == "OperationOutcome"
        assert set(params) <= set(r.json()["issue"][0]["expression"])


# ------------------------------------------------------------------ 3. instants and offsets


def test_instants_with_offsets_are_kept_apart_and_deduplicated(db_url: str,
                                                               tmp_path: Path) -> None:
    with ValidatingClient(base.app_for(db_url, tmp_path)) as c:
        card = c.post(SELECT, json=base.fixture_body("v3-seed-mri-w")).json()["cards"][0]
        uuid_, sid = card["uuid"], card["suggestions"][0]["uuid"]
        # the same wall-clock time at two offsets: two instants, two rows
        two = [base.feedback_item(uuid_, "overridden", when="2026-11-02T10:00:00+02:00",
                                  reason="clinical-judgement"),
               base.feedback_item(uuid_, "overridden", when="2026-11-02T10:00:00-05:00",
                                  reason="clinical-judgement")]
        first = c.post(SELECT + "/feedback", json={"feedback": two}).json()
        assert (first["stored"], first["duplicates"]) == (2, 0)
        # one instant written with two offsets: the same item, stored once
        same = [base.feedback_item(uuid_, "overridden", when="2026-11-02T08:00:00Z",
                                   reason="clinical-judgement"),
                base.feedback_item(uuid_, "overridden", when="2026-11-02T03:00:00-05:00",
                                   reason="clinical-judgement")]
        again = c.post(SELECT + "/feedback", json={"feedback": same}).json()
        assert (again["stored"], again["duplicates"]) == (0, 2)
        # accepted at 09:00Z, after the override at 10:00+02:00 (08:00Z) but before the one at
        # 10:00-05:00 (15:00Z): the latest outcome, by instant, is the override
        later = base.feedback_item(uuid_, when="2026-11-02T09:00:00Z", suggestion=sid)
        assert c.post(SELECT + "/feedback", json={"feedback": [later]}).json()["stored"] == 1
        report = c.get("/admin/report", headers=ADMIN).json()
        assert report["totals"]["overridden"] == 1
        # the filters compare instants too: 16:00+02:00 is 14:00Z, before the 15:00Z override
        early = c.get("/admin/report", params={"start": "2026-11-02T16:00:00+02:00"},
                      headers=ADMIN).json()
        assert early["filters"]["from"] == "2026-11-02T14:00:00+00:00"
    stored = sorted(f.outcome_timestamp for f in base.rows(db_url, FeedbackItem))
    assert stored == [datetime(2026, 11, 2, 8, tzinfo=UTC), datetime(2026, 11, 2, 9, tzinfo=UTC),
                      datetime(2026, 11, 2, 15, tzinfo=UTC)]
    assert all(t.tzinfo is not None and t.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
               for t in stored)


@pytest.mark.parametrize(("orders", "fitted"), [
    ([{"procedure": "mri", "variants": ["V3"]}], None),  # plain: kept as it is
    ([{"procedure": "a\\u0000b"}], None),  # the text backslash-u0000 is not a NUL
    ([{"procedure": "mri", "nested": [{"note": "a\x00b"}]}], [{"procedure": "mri", "nested": [
        {"note": "a\ufffdb"}]}]),
    ([{"procedure": "\ud800"}], [{"procedure": "?"}]),  # a lone surrogate cannot be encoded
    ([{1: "x"}], [{"1": "x"}]),  # a key that is not text
])
def test_json_values_are_fitted_only_where_they_cannot_be_stored(
        orders: list[dict[Any, Any]], fitted: list[dict[str, Any]] | None) -> None:
    row = {"id": "x", "orders": orders}
    changed = fit_row(HOOK_CALL_COLUMNS, row)
    assert changed is (fitted is not None)
    assert row["orders"] == (fitted if fitted is not None else orders)


def test_keyed_hashes_are_hmac_sha256_of_the_ids(tmp_path: Path) -> None:
    """Rows written before and after stay comparable: the same keyed hash of the same id."""
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}", "k" * 32)
    for patient in ("p1", "p2", "é"):
        assert store.patient_hash(patient) == hmac.new(
            b"k" * 32, patient.encode(), hashlib.sha256).hexdigest()
        assert store.order_hash(patient, "o1") == hmac.new(
            b"k" * 32, f"{patient}\x1fo1".encode(), hashlib.sha256).hexdigest()
    assert store.order_hash("p1", None) is None
