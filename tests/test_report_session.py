"""The report counts what clinicians did in a scripted sandbox-like session (issue 12).

The picker re-fires order-select for the same draft order at every change: the earlier cards are
superseded, not ignored. The last outcome of a card wins (accepted then overridden is overridden,
and a changed mind). An override reason sent by code alone is shown with the display the
service offered. Run on SQLite and PostgreSQL, with a clock that moves on between calls.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from tests.builders import hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient, dev_settings
from tests.test_store import ADMIN, db_url  # noqa: F401 - the database fixture (both backends)


def session_app(url: str, tmp_path: Path) -> Any:
    from cds_service.app import create_app

    ticks = iter(FIXTURE_NOW + timedelta(minutes=i) for i in range(1000))
    settings = dev_settings(database_url=url, data_dir=tmp_path, admin_token=ADMIN)
    return create_app(settings, clock=lambda: next(ticks))


def pick(c: ValidatingClient, cpt: str, oid: str = "example-request-id") -> list[dict[str, Any]]:
    r = c.post(SELECT, json=hook_request(order(oid, cpt=cpt),
                                         prefetch=seed_prefetch(FIXTURE_NOW)))
    assert r.status_code == 200
    cards: list[dict[str, Any]] = r.json()["cards"]
    return cards


def feedback(card: dict[str, Any], outcome: str, minute: int,
             reason: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"card": card["uuid"], "outcome": outcome,
                            "outcomeTimestamp": (FIXTURE_NOW + timedelta(minutes=minute))
                            .isoformat().replace("+00:00", "Z")}
    if outcome == "accepted":
        item["acceptedSuggestions"] = [{"id": card["suggestions"][0]["uuid"]}]
    else:  # as the sandbox sends it: code and system, no display
        system = card["overrideReasons"][0]["system"]  # the card's own system
        item["overrideReason"] = {"reason": {"code": reason, "system": system}}
    return item


def test_scripted_session_report_is_exactly_what_happened(
        db_url: str, tmp_path: Path) -> None:  # noqa: F811
    with ValidatingClient(session_app(db_url, tmp_path)) as c:
        (c1,) = pick(c, "72149")  # MRI with contrast: warning
        (c2,) = pick(c, "72132")  # the picker changed to CT with contrast: warning
        (c3,) = pick(c, "72158")  # then MRI without and with: info, MRI without suggested
        c.post(SELECT + "/feedback", json={"feedback": [feedback(c3, "accepted", 10)]})
        assert pick(c, "72148") == []  # the accepted study: usually appropriate, no card
        (c5,) = pick(c, "72149", oid="order-b")  # another order: overridden
        (c6,) = pick(c, "72149", oid="order-c")  # accepted, then overridden
        (c7,) = pick(c, "72149", oid="order-d")  # left alone
        items = [feedback(c5, "overridden", 20, "clinical-judgement"),
                 feedback(c6, "accepted", 21),
                 feedback(c6, "overridden", 22, "patient-preference")]
        assert c.post(SELECT + "/feedback", json={"feedback": items}).status_code == 200
        report = c.get("/admin/report", headers={"Authorization": f"Bearer {ADMIN}",
                                                 "Accept": "application/json"}).json()
        page = c.get("/admin/report", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert report["totals"] == {"shown": 6, "accepted": 1, "overridden": 2, "ignored": 1,
                                "superseded": 2, "changed_mind": 1}
    kinds = {r["kind"]: r for r in report["by_kind"]}
    assert kinds["not-appropriate"] == {"kind": "not-appropriate", "shown": 5, "accepted": 0,
                                        "overridden": 2, "ignored": 1, "superseded": 2,
                                        "changed_mind": 1}
    assert kinds["better-alternative"]["accepted"] == 1
    assert sorted(report["override_reasons"], key=lambda r: r["code"]) == [
        {"code": "clinical-judgement", "display": "Clinical findings not captured in the record",
         "count": 1},
        {"code": "patient-preference", "display": "Shared decision with the patient",
         "count": 1}]
    assert '<div id="superseded"><b>2</b>superseded</div>' in page
    assert '<div id="changed-mind"><b>1</b>changed mind</div>' in page
    assert "Shared decision with the patient" in page
    assert len({c1["uuid"], c2["uuid"], c7["uuid"]}) == 3  # no feedback: 2 superseded, 1 not
