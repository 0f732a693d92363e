"""What can go wrong in the app, as the page the clinician sees (never a 500, never a trace)."""

from __future__ import annotations


class Problem(Exception):
    """A failure the app explains on a page: its HTTP status, a title and what to do."""

    def __init__(self, status: int, title: str, text: str, advice: str = "",
                 headers: dict[str, str] | None = None):
        super().__init__(title)
        self.headers = headers or {}
        self.status = status
        self.title = title
        self.text = text
        self.advice = advice or RELAUNCH


RELAUNCH = "Close this window and open the app again from the card in the EHR."


def bad_state() -> Problem:
    return Problem(400, "This sign-in is not known",
                   "The EHR sent the app back with a sign-in this browser did not start, or one "
                   "that was already used or has expired.")


def expired() -> Problem:
    return Problem(401, "Your session has ended",
                   "The app's session for this order has expired or was never completed in this "
                   "browser (sessions last a few minutes and hold no data once they end).")


def ehr_down(what: str, fault: str) -> Problem:
    return Problem(502, "The EHR did not answer as expected",
                   f"{what} failed ({fault}).",
                   "Try again in a moment; if it keeps failing, rate the order from the record "
                   "and tell the EHR's administrators.")


def unusable_configuration(why: str) -> Problem:
    return Problem(502, "The EHR's configuration cannot be used by the app",
                   f"The EHR's SMART configuration is unusable: {why}.",
                   "Tell the EHR's administrators; meanwhile rate the order from the record.")
