"""The SMART app under attack (issue 25): session fixation and the ``__Host-`` cookie, anonymous
launches that cost the EHR and the database nothing, a configuration the app cannot use, the
headers of every page (and of the report). In-process app, the tests' SMART EHR on a socket,
real SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from cds_service.app import create_app
from tests.conftest import dev_settings
from tests.smart_server import SmartTestServer
from tests.test_smart_app import Clock, assert_page, authorise, launch, sign_in
from tests.test_store import BACKENDS, database

HTTPS = "https://cds.example.test"


def app_client(tmp_path: Path, ehr: SmartTestServer, base_url: str = HTTPS,
               **settings: Any) -> TestClient:
    public = {"public_base_url": base_url} if base_url.startswith("https") else {}
    values = {"data_dir": tmp_path, "fhir_allowed_servers": ehr.base, "admin_token": "admin",
              **public, **settings}
    return TestClient(create_app(dev_settings(**values), clock=Clock()), base_url=base_url,
                      follow_redirects=False)


# ------------------------------------------------------------------ item 7: session fixation


def set_cookies(response: httpx.Response) -> list[str]:
    return response.headers.get_list("set-cookie")


def test_over_https_the_cookies_are_host_prefixed(tmp_path: Path,
                                                  ehr: SmartTestServer) -> None:
    with app_client(tmp_path, ehr) as client:
        started = launch(client, ehr)
        assert started.status_code == 302
        at_ehr = httpx.get(started.headers["location"])
        back = httpx.URL(at_ehr.headers["location"])
        signed = client.get(f"{back.path}?{back.query.decode()}")
        assert signed.status_code == 303
        for header in set_cookies(started) + set_cookies(signed):
            name = header.split("=", 1)[0]
            attributes = [a.strip().lower() for a in header.split(";")[1:]]
            assert name.startswith("__Host-cds_app_"), header
            assert "secure" in attributes and "path=/" in attributes and "httponly" in attributes
            assert not any(a.startswith("domain") for a in attributes)
        assert client.get("/app/questions").status_code == 200


def test_over_plain_http_in_development_the_cookie_has_no_prefix(
        tmp_path: Path, ehr: SmartTestServer) -> None:
    """Browsers refuse a ``__Host-`` cookie that is not Secure, and a Secure cookie over http:
    development over plain http keeps the plain name under /app."""
    with app_client(tmp_path, ehr, base_url="http://testserver") as client:
        signed = sign_in(client, ehr)
        assert signed.status_code == 303
        cookie = next(c for c in set_cookies(signed) if c.startswith("cds_app_session="))
        assert "path=/app" in cookie.lower() and "secure" not in cookie.lower()
        assert client.get("/app/questions").status_code == 200


def test_a_session_id_planted_before_the_sign_in_does_not_survive_it(
        tmp_path: Path, ehr: SmartTestServer) -> None:
    """An attacker launches, plants that launch's cookies in the victim's browser and sends the
    victim the EHR's sign-in: the victim's session gets a new id the attacker never saw."""
    with app_client(tmp_path, ehr) as client:
        started = launch(client, ehr)  # the attacker's launch
        planted = httpx.Cookies(client.cookies)
        back = httpx.URL(httpx.get(started.headers["location"]).headers["location"])
        client.cookies = httpx.Cookies(planted)  # the victim's browser, cookie planted
        assert client.get(f"{back.path}?{back.query.decode()}").status_code == 303
        victim = httpx.Cookies(client.cookies)
        client.cookies = planted  # the attacker, with what they planted
        assert_page(client.get("/app/questions"), 401, "Your session has ended")
        client.cookies = victim
        assert client.get("/app/questions").status_code == 200
        before = victim.get("__Host-cds_app_session")
        assert sign_in(client, ehr).status_code == 303  # signing in again: a new id
        assert client.cookies.get("__Host-cds_app_session") != before
        client.cookies = httpx.Cookies(victim)
        assert_page(client.get("/app/questions"), 401, "Your session has ended")


# ------------------------------------------------------------------ item 6: anonymous launches


def test_launches_read_the_configuration_once_and_are_limited(
        tmp_path: Path, ehr: SmartTestServer) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cds.db'}"
    with app_client(tmp_path, ehr, database_url=url, smart_launches_per_minute=40) as client:
        # all in one window of the limiter, whatever the wall clock (a run crossing a minute
        # boundary would start a new window half-way)
        client.app.state.smart.launches.clock = lambda: 30.0  # type: ignore[attr-defined]
        answers = [launch(client, ehr).status_code for _ in range(50)]
        over = launch(client, ehr)
    assert answers == [302] * 40 + [429] * 10
    assert_page(over, 429, "Too many launches")
    assert int(over.headers["retry-after"]) >= 1
    assert ehr.config_requests == 1  # cached per iss
    with sqlite3.connect(tmp_path / "cds.db") as db:  # a launch writes no session row
        assert db.execute("SELECT count(*) FROM app_session").fetchone() == (0,)


def test_the_callback_reads_the_cached_configuration(tmp_path: Path,
                                                     ehr: SmartTestServer) -> None:
    with app_client(tmp_path, ehr) as client:
        for _ in range(3):
            assert sign_in(client, ehr).status_code == 303
    assert ehr.config_requests == 1


def test_a_launch_cookie_from_another_browser_or_replayed_is_refused(
        tmp_path: Path, ehr: SmartTestServer) -> None:
    with app_client(tmp_path, ehr) as client:
        back = authorise(client, ehr)
        assert client.get(back).status_code == 303
        assert_page(client.get(back), 400, "This sign-in is not known")
        client.cookies.clear()
        assert_page(client.get(back), 400, "This sign-in is not known")
    assert len(ehr.token_requests) == 1


# ------------------------------------------------------------------ item 5: bytes per page view


def test_one_byte_budget_per_page_view_across_sources_and_pages(
        tmp_path: Path, ehr: SmartTestServer) -> None:
    """An EHR answering every search with pages of 1 MB and a next page: the page view reads
    about its budget (3 MB), not ten pages of every source, and says what it did not read."""
    ehr.padded_pages = 1024 * 1024
    with app_client(tmp_path, ehr, smart_page_bytes=3 * 1024 * 1024,
                    fhir_max_pages=10) as client:
        assert sign_in(client, ehr).status_code == 303
        shown = client.get("/app/questions")
    assert_page(shown, 200, "more than the app reads for one page")
    searches = 4  # conditions, procedures, service requests, medications: paged
    assert ehr.pages_served <= 3 + searches  # in flight together when the budget ran out
    # (without the budget: 10 pages of each, 40 MB)


# ------------------------------------------------------------------ item 10: unusable config


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from database(request.param, tmp_path)


def test_a_token_endpoint_longer_than_its_column_is_an_unusable_configuration(
        tmp_path: Path, ehr: SmartTestServer, db_url: str) -> None:
    ehr.smart_config_extra = {"token_endpoint": f"{ehr.origin}/auth/token?pad={'x' * 2100}"}
    with app_client(tmp_path, ehr, database_url=db_url, smart_config_cache_seconds=0) as client:
        refused = launch(client, ehr)
        assert_page(refused, 502, "The EHR's configuration cannot be used by the app",
                    "token_endpoint is longer than 2000 characters")
        assert not ehr.authorize_requests and "set-cookie" not in refused.headers
        ehr.smart_config_extra = {}
        assert sign_in(client, ehr).status_code == 303  # the database still works


# ------------------------------------------------------------------ item 11: page headers


def assert_page_headers(response: httpx.Response, ancestors: str) -> None:
    assert response.headers["cache-control"] == "no-store", response.url
    assert response.headers["x-content-type-options"] == "nosniff", response.url
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and csp.endswith(f"frame-ancestors {ancestors}"), csp


def test_every_smart_answer_has_the_page_headers(tmp_path: Path, ehr: SmartTestServer) -> None:
    ancestors = f"'self' {ehr.origin} https://panel.example.org"
    with app_client(tmp_path, ehr, smart_frame_ancestors="https://panel.example.org",
                    max_body_bytes=2000) as client:
        answers = [client.get("/app/launch"), launch(client, ehr),
                   client.get("/app/callback?state=x&code=y"), client.get("/app/questions"),
                   client.get("/app/launch", params={"iss": ehr.base, "launch": "l"},
                              headers={"Sec-Fetch-Dest": "iframe"}),
                   client.get("/app/nowhere"), client.put("/app/questions"),
                   client.post("/app/questions", content=b"x" * 5000)]
        assert [r.status_code for r in answers] == [400, 302, 400, 401, 303, 404, 405, 413]
        sign_in(client, ehr)
        answers += [client.get("/app/questions")]
        for response in answers:
            assert_page_headers(response, ancestors)


def test_the_report_page_has_the_page_headers_and_is_never_framed(
        tmp_path: Path, ehr: SmartTestServer) -> None:
    with app_client(tmp_path, ehr) as client:
        shown = client.get("/admin/report", headers={"Authorization": "Bearer admin"})
        refused = client.get("/admin/report")
    assert shown.status_code == 200 and shown.headers["content-type"].startswith("text/html")
    assert refused.status_code == 401
    for response in (shown, refused):
        assert_page_headers(response, "'none'")
