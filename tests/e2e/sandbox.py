"""Driving the real CDS Hooks sandbox (its production build) in headless Chromium.

``StaticSite`` serves the build on loopback; ``Sandbox`` wraps one Playwright page of the
"PAMA Imaging" tab: pick an order and reasons, read the cards and the rating, take a
suggestion, override a card from the Dismiss menu. It records every hook call the page makes
(``calls``) and every exception thrown in the page (``errors``).

DOM facts (sandbox commit 3b7e255): the two pickers are react-select inputs
(``input[id^=react-select]``) inside ``[class*=pama__pama]``, their options
``[id*=-option-]`` labelled with the code's display; the chosen study and reasons are
``span[class*=pama__current-selection]`` in two lists split by the view's first ``<br>`` (the
study list is not rendered at all when ``code.coding[0].display`` is empty); the rating is
``[class*=pama__rating-box]`` ("PAMA Rating: <code>" and a mark); a card is
``[class*=card-list__decision-card]`` with its suggestions as buttons, a "Dismiss" button and a
"select dismiss reason" button that opens a menu of "Override: <display>" items.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from tests.loopback import LoopbackServer

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page, Response

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HOOK_PATH = "/cds-services/lbp-imaging-order-select"
NOT_LOOPBACK = re.compile(r"^(?!https?://127\.0\.0\.1[:/])[a-z]+://")
VIEW = "[class*=pama__pama]"
FIRST_BR = "xpath=(//div[contains(@class,'pama__pama')]/br)[1]"
SELECTION = "span[class*=pama__current-selection]"
# The picker's studies (their displays are the sandbox's, from the CPT descriptors).
STUDIES = {
    "72132": "Computed tomography, lumbar spine; with contrast material",
    "72148": "Magnetic resonance (eg, proton) imaging, spinal canal and contents, lumbar; "
             "without contrast material",
    "72149": "Magnetic resonance (eg, proton) imaging, spinal canal and contents, lumbar; "
             "with contrast material(s)",
    "72158": "Magnetic resonance (eg, proton) imaging, spinal canal and contents, without "
             "contrast material, followed by contrast material(s) and further sequences; lumbar",
}


class StaticSite(LoopbackServer):
    """A static file server on loopback (the sandbox build), in a thread."""

    def __init__(self, directory: Path):
        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0),
                                         functools.partial(Quiet, directory=str(directory)))
        self.httpd.daemon_threads = True
        self._serve(self.httpd)
        self.base = f"http://127.0.0.1:{self.port}"


def sandbox_url(site: str, fhir: str, patient: str, service: str) -> str:
    query = urlencode({"fhirServiceUrl": fhir, "patientId": patient,
                       "serviceDiscoveryURL": f"{service}/cds-services", "screen": "pama",
                       "hook": "order-select"}, safe=":/")
    return f"{site}/?{query}"


@dataclass
class HookCall:
    """One order-select call the page made, and what the service answered."""

    request: dict[str, Any]
    status: int
    body: Any  # the JSON answer (cards, systemActions) or an OperationOutcome

    @property
    def cards(self) -> list[dict[str, Any]]:
        return list(self.body.get("cards", [])) if self.status == 200 else []

    @property
    def draft(self) -> dict[str, Any]:
        entry: dict[str, Any] = self.request["context"]["draftOrders"]["entry"][0]["resource"]
        return entry


class Sandbox:
    """One page of the sandbox's PAMA Imaging tab."""

    def __init__(self, page: Page, timeout: float = 10.0):
        self.page = page
        self.timeout = timeout
        self.errors: list[str] = []  # exceptions thrown in the page
        self.calls: list[HookCall] = []
        self.feedback: list[tuple[dict[str, Any], int]] = []  # (posted item, status)
        self.pending: list[Response] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("response", self._response)
        # nothing leaves loopback (the sandbox also asks its public demo services)
        page.context.route(NOT_LOOPBACK, lambda route: route.abort())

    def _response(self, response: Response) -> None:
        if response.request.method == "POST" and "/cds-services/" in response.url:
            self.pending.append(response)

    def _collect(self) -> None:
        """Read the bodies of the hook and feedback calls seen so far (outside the handler)."""
        while self.pending:
            r = self.pending.pop(0)
            sent = json.loads(r.request.post_data or "{}")
            try:
                body = r.json()
            except ValueError:  # an empty or non-JSON answer is kept as text
                body = r.text()
            if r.url.endswith("/feedback"):
                self.feedback.extend((item, r.status) for item in sent.get("feedback", []))
            elif r.url.endswith(HOOK_PATH):
                self.calls.append(HookCall(sent, r.status, body))

    def wait_until(self, done: Callable[[], bool], what: str) -> None:
        """Let the page run until ``done()`` (or it throws, or the timeout passes)."""
        deadline = time.monotonic() + self.timeout
        while True:
            self._collect()
            if done():
                return
            if self.errors:
                raise AssertionError(f"the page threw while waiting for {what}: {self.errors}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {self.timeout:g} s waiting for {what}")
            self.page.wait_for_timeout(50)

    def next_call(self, action: Callable[[], None], what: str) -> HookCall:
        """Do ``action`` and return the hook call it fires."""
        self._collect()
        seen = len(self.calls)
        action()
        self.wait_until(lambda: len(self.calls) > seen, f"the order-select call after {what}")
        self.page.wait_for_timeout(150)  # the page renders what came back
        self._collect()
        return self.calls[-1]

    def open(self, url: str) -> HookCall:
        """Load the sandbox; it fires a first call with an empty order."""
        return self.next_call(lambda: self.page.goto(url), "loading the page")

    # --- the two pickers ---------------------------------------------------------------
    def _choose(self, index: int, query: str, option: str) -> HookCall:
        box = self.page.locator(VIEW).locator("input[id^=react-select]").nth(index)

        def choose() -> None:
            box.fill(query)
            exact = re.compile(f"^{re.escape(option)}$")
            self.page.locator("[id*=-option-]").filter(has_text=exact).first.click()

        return self.next_call(choose, f"choosing {option!r}")

    def pick_order(self, cpt: str) -> HookCall:
        """Choose a study by its CPT code (the option is the code's display)."""
        call = self._choose(0, cpt, STUDIES[cpt])
        assert call.draft["code"]["coding"][0].get("code") == cpt, call.draft
        return call

    def add_reason(self, query: str, option: str) -> HookCall:
        return self._choose(1, query, option)

    # --- what the page shows --------------------------------------------------------------
    def study(self) -> Locator:
        """The chosen study as listed (absent when its display is empty)."""
        return self.page.locator(FIRST_BR).locator(
            "xpath=preceding-sibling::div").locator(SELECTION)

    def reasons(self) -> Locator:
        return self.page.locator(FIRST_BR).locator(
            "xpath=following-sibling::div[following-sibling::div"
            "[contains(@class,'pama__rating-box')]]").locator(SELECTION)

    def rating(self) -> Locator:
        return self.page.locator("[class*=pama__rating-box]")

    def cards(self) -> Locator:
        return self.page.locator("[class*=card-list__decision-card]")

    # --- acting on a card ---------------------------------------------------------------
    def _feedback_after(self, action: Callable[[], None], what: str) -> dict[str, Any]:
        self._collect()
        seen = len(self.feedback)
        action()
        self.wait_until(lambda: len(self.feedback) > seen, f"the feedback post after {what}")
        item, status = self.feedback[-1]
        assert status == 200, f"feedback after {what} answered {status}"
        return item

    def take_suggestion(self, label: str) -> tuple[dict[str, Any], HookCall]:
        """Click a suggestion: the sandbox posts ``accepted`` feedback, applies the update and
        re-fires order-select for the changed order. Returns the feedback item and that call."""
        self._collect()
        seen = len(self.calls)
        button = self.cards().get_by_role("button", name=label)
        item = self._feedback_after(button.click, f"clicking {label!r}")
        self.wait_until(lambda: len(self.calls) > seen,
                        f"the order-select call after accepting {label!r}")
        self.page.wait_for_timeout(150)
        self._collect()
        return item, self.calls[-1]

    def override(self, reason: str) -> dict[str, Any]:
        """Dismiss the (only) card with a reason from its menu; returns the feedback item."""
        self.cards().get_by_role("button", name="select dismiss reason").click()
        item = self.page.get_by_role("menuitem", name=f"Override: {reason}")
        return self._feedback_after(item.click, f"overriding with {reason!r}")
