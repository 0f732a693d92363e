"""The SMART app's page in Debian's Chromium, driven by Playwright: launched as the EHR launches
it (through the tests' SMART EHR on loopback), answered with the keyboard only, re-rated with
"Update rating" (JavaScript off: the page must work without it), saved; and with JavaScript on,
the rating follows the answers by itself, with no error and no request off this machine.

Screenshots go to the test's tmp dir; with ``CDS_SMART_APP_DOCS=1`` also to docs/smart-app.png
and docs/smart-app-saved.png (the README shows them).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.conftest import ROOT
from tests.e2e.sandbox import NOT_LOOPBACK
from tests.served import served
from tests.smart_server import LAUNCH, SmartTestServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get "
                                "install chromium; .ci/run installs it)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(pip install -e '.[test]'; make test installs it)")
expect = sync_api.expect
DOCS = ROOT / "docs"
SAVED = ("Saved. Close this window; the order is rated with these answers when you next "
         "select or sign it.")


@pytest.fixture(scope="module")
def ehr() -> Iterator[SmartTestServer]:
    with SmartTestServer(datetime.now(UTC)) as server:
        yield server


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, ehr: SmartTestServer) -> Iterator[str]:
    data = tmp_path_factory.mktemp("smart-app-page")
    with served(data, CDS_FHIR_ALLOWED_SERVERS=ehr.base, CDS_PUBLIC_BASE_URL="{base}",
                CDS_LOG_LEVEL="WARNING") as base:
        yield base


class Opened:
    """One browser context on the app, launched as the EHR does; what went wrong in it."""

    def __init__(self, browser: Any, service: str, ehr: SmartTestServer, script: bool):
        ehr.reset()
        self.context = browser.new_context(viewport={"width": 900, "height": 1000},
                                           java_script_enabled=script)
        self.page = self.context.new_page()
        self.page.set_default_timeout(10_000)
        self.errors: list[str] = []
        self.external: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     else None)
        self.context.route(NOT_LOOPBACK, self._refuse)
        query = urlencode({"iss": ehr.base, "launch": LAUNCH})
        self.page.goto(f"{service}/app/launch?{query}")  # -> the EHR -> callback -> questions
        expect(self.page).to_have_url(f"{service}/app/questions")

    def _refuse(self, route: Any) -> None:
        self.external.append(route.request.url)
        route.abort()

    def focused(self) -> dict[str, str]:
        return dict(self.page.evaluate("""() => { const e = document.activeElement;
            return {tag: e.tagName, name: e.name || '', value: e.value || '',
                    text: e.textContent.trim(), outline: getComputedStyle(e).outlineStyle}; }"""))

    def tab_to(self, name: str, value: str = "", most: int = 12) -> dict[str, str]:
        """Press Tab until the control ``name`` (with ``value``) has the focus."""
        for _ in range(most):
            self.page.keyboard.press("Tab")
            now = self.focused()
            if now["name"] == name and (not value or now["value"] == value):
                return now
        raise AssertionError(f"Tab never reached {name}={value}")


def snap(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("CDS_SMART_APP_DOCS") == "1":
        shutil.copyfile(path, DOCS / path.name)


def test_keyboard_only_without_javascript(browser: Any, service: str, ehr: SmartTestServer,
                                          tmp_path: Path) -> None:
    app = Opened(browser, service, ehr, script=False)
    page = app.page
    verdict = page.locator("#verdict")
    expect(verdict).to_have_text(re.compile("^not rated yet"))
    expect(page.get_by_role("group", name=re.compile("Has conservative care"))).to_be_visible()
    weeks = page.get_by_label(re.compile("For how many weeks"))
    expect(weeks).to_have_value("")
    expect(weeks).to_be_disabled()  # asked once conservative care is "Yes"
    # the record is silent: "Not known" is chosen; Tab reaches it, with the visible focus ring
    first = app.tab_to("conservative-care", most=1)
    assert first["value"] == "" and first["outline"] == "solid", first
    page.keyboard.press("ArrowRight")  # (wraps to the first answer) "Yes"
    expect(page.locator('input[name="conservative-care"][value="yes"]')).to_be_checked()
    button = app.tab_to("action", "update", most=1)  # the disabled number is skipped
    assert button["text"] == "Update rating" and button["outline"] == "solid", button
    with page.expect_navigation():
        page.keyboard.press("Space")
    expect(weeks).to_be_enabled()  # "Yes" is on the form now
    app.tab_to("conservative-care-weeks", most=3)
    page.keyboard.type("8")
    app.tab_to("action", "update", most=1)
    with page.expect_navigation():
        page.keyboard.press("Space")
    expect(verdict).to_have_text("Appropriate")
    expect(page.locator("#rating")).to_contain_text("Usually appropriate (UA)")
    expect(page.get_by_label(re.compile("For how many weeks"))).to_have_value("8")
    assert not ehr.responses  # updating the rating saves nothing
    snap(page, tmp_path, "smart-app")
    # Save, from the keyboard too
    assert app.tab_to("action", "save")["text"] == "Save answers"
    with page.expect_navigation():
        page.keyboard.press("Enter")
    expect(page.locator(".notice.saved")).to_contain_text(SAVED)
    expect(page.locator("#verdict")).to_have_text("Appropriate")
    snap(page, tmp_path, "smart-app-saved")
    (saved,) = ehr.responses
    assert [(i["linkId"], i["answer"]) for i in saved["item"]] == [
        ("conservative-care", [{"valueBoolean": True}]),
        ("conservative-care-weeks", [{"valueInteger": 8}])]
    assert not app.errors and not app.external, (app.errors, app.external)
    app.context.close()


def test_with_javascript_the_rating_follows_the_answers(browser: Any, service: str,
                                                        ehr: SmartTestServer) -> None:
    app = Opened(browser, service, ehr, script=True)
    page = app.page
    verdict = page.locator("#verdict")
    expect(verdict).to_have_text(re.compile("^not rated yet"))
    app.tab_to("conservative-care", "", most=1)  # "Not known": the record is silent
    page.keyboard.press("ArrowLeft")  # moves to "No" and chooses it
    expect(page.locator('input[name="conservative-care"][value="no"]')).to_be_checked()
    expect(verdict).to_have_text("Not appropriate")  # no button pressed, no page loaded
    assert page.url.endswith("/app/questions") and not ehr.responses
    assert not app.errors and not app.external, (app.errors, app.external)
    app.context.close()
