"""The app's pages: server-rendered HTML that works without JavaScript (a form, two buttons),
accessible (a fieldset and legend per question, a label per control, visible focus), with no
third-party asset of any kind. The optional script only refreshes the rating as answers change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING, Any

import orjson

from cds_service.questionnaire import Question
from cds_service.smart.problems import Problem
from cds_service.smart.rating import RatingView

if TYPE_CHECKING:
    from cds_service.engine import Rated
    from cds_service.smart.orders import OrderChoice

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 46rem; color: #1b1b1b;
       padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.35rem; margin: .2rem 0 .6rem; } h2 { font-size: 1.1rem; margin: 0 0 .4rem; }
.who { color: #444; font-size: .95rem; margin: 0; }
#rating { border: 2px solid #8a8a8a; border-radius: 6px; padding: .7rem 1rem; margin: 1rem 0; }
#rating.r-appropriate { border-color: #2e7d32; }
#rating.r-not-appropriate { border-color: #c62828; }
.verdict { font-size: 1.15rem; margin: 0 0 .3rem; }
fieldset, .field { border: 1px solid #ccc; border-radius: 6px; margin: 0 0 .8rem;
                   padding: .5rem .9rem .6rem; }
legend, .field > label { font-weight: 600; padding: 0 .2rem; }
.dependent { margin-left: 2rem; }
.choices { display: flex; flex-wrap: wrap; gap: .2rem 1.4rem; margin-top: .3rem; }
.choices label { padding: .25rem .1rem; cursor: pointer; }
input[type=radio] { width: 1.1rem; height: 1.1rem; vertical-align: -.15rem; }
input[type=number] { font: inherit; width: 6rem; padding: .2rem .3rem; margin-top: .3rem; }
.hint { color: #555; font-size: .9rem; margin: .3rem 0 0; }
.actions { display: flex; gap: 1rem; flex-wrap: wrap; margin: 1.2rem 0; }
button { font: inherit; padding: .5rem 1.1rem; border-radius: 6px; border: 2px solid #1a5fb4;
         background: #fff; color: #1a5fb4; cursor: pointer; }
button.primary { background: #1a5fb4; color: #fff; }
a.button { display: inline-block; padding: .5rem 1.1rem; border-radius: 6px;
           background: #1a5fb4; color: #fff; text-decoration: none; }
:focus-visible { outline: 3px solid #e66100; outline-offset: 2px; }
.notice { border-left: 6px solid #1a5fb4; background: #eef4fb; padding: .6rem 1rem;
          margin: 1rem 0; }
.notice.error { border-color: #c62828; background: #fdecea; }
.notice.saved { border-color: #2e7d32; background: #edf7ed; }
[aria-invalid=true] { border: 2px solid #c62828; }
dl { display: grid; grid-template-columns: 1fr auto; gap: .3rem 1rem; }
dt { font-weight: 600; } dd { margin: 0; }
"""
BOOLEAN = (("yes", "Yes"), ("no", "No"))
SAID = {"yes": "yes", "no": "no"}


@dataclass
class Notice:
    kind: str  # "saved", "error" or "info"
    title: str
    text: str


@dataclass
class QuestionsView:
    """Everything the questions page shows."""

    patient: str
    order: str
    rating: RatingView
    questions: list[Question]
    values: dict[str, str]  # linkId -> the answer on the form ("" or absent: not known)
    record: dict[str, str]  # linkId -> what the record shows
    csrf: str
    problems: list[str] = field(default_factory=list)  # linkIds whose answer is unreadable
    notice: Notice | None = None
    chosen: str | None = None  # the order picked on the app's list (sent back with the form)
    unread: dict[str, str] = field(default_factory=dict)  # sources not read -> why
    rated: Rated | None = None  # the rating with the answers on the form
    messages: Messages | None = None  # for the EHR, after saving (SMART Web Messaging)
    why: str | None = None  # one line: why these questions decide the rating


@dataclass(frozen=True)
class Messages:
    """SMART Web Messaging to the EHR window: the order re-rated, then ``ui.done``."""

    origin: str
    handle: str | None
    order: dict[str, Any]

    def json(self) -> str:
        def message(kind: str, n: int, payload: dict[str, Any]) -> dict[str, Any]:
            body: dict[str, Any] = {"messageId": f"lbp-{n}", "messageType": kind,
                                    "payload": payload}
            if self.handle:
                body["messagingHandle"] = self.handle
            return body
        sent = [message("scratchpad.update", 1, {"resource": self.order}),
                message("ui.done", 2, {})]
        # (inside <script type="application/json">: "<" escaped so no tag can end it)
        return orjson.dumps({"origin": self.origin, "messages": sent}).decode().replace(
            "<", "\\u003c")


def layout(title: str, body: str, script: bool = False) -> str:
    tail = '<script src="app.js" defer></script>' if script else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{escape(title)}: lumbar imaging questions</title>
<style>{STYLE}</style></head><body><main>
{body}
</main>{tail}</body></html>"""


def problem_page(problem: Problem) -> str:
    return layout(problem.title, f"""<h1>{escape(problem.title)}</h1>
<p>{escape(problem.text)}</p>
<p>{escape(problem.advice)}</p>""")


def framed_page(launch: str) -> str:
    """In an EHR's frame where the browser keeps no cookie for the app: say so, and offer the
    same launch in a new window (the launch has not been used yet)."""
    return layout("Open in a new window", f"""<h1>The app cannot work inside this panel</h1>
<p>This browser does not let the app keep your sign-in inside the EHR's page (it blocks
cookies of other sites in frames), so the answers could not be kept or saved here.</p>
<p><a class="button primary" href="{escape(launch)}" target="_blank">Open in a new window</a></p>
<p>In a new window the answers are saved the same way; the order is rated with them when you
next select or sign it.</p>""")


def _rating(view: RatingView) -> str:
    css = {"Appropriate": "r-appropriate", "Not appropriate": "r-not-appropriate"}.get(
        view.rating, "r-open")
    lines = [f'<p class="verdict"><strong>{escape(view.procedure)}</strong>: '
             f'<span id="verdict">{escape(view.rating)}</span></p>']
    if view.unavailable:
        lines.append(f"<p>{escape(view.unavailable)}</p>")
    if view.category:
        lines.append(f"<p>ACR category: {escape(view.category_label or view.category)} "
                     f"({escape(view.category)})</p>")
    if view.scenario:
        lines.append(f"<p>Scenario: {escape(view.scenario)}</p>")
    if view.still_open:
        lines.append(f"<p>Still open: {escape(', '.join(view.still_open).lower())}.</p>")
    if view.unread_note:
        lines.append(f'<p id="unread">{escape(view.unread_note)}</p>')
    return (f'<section id="rating" class="{css}" aria-live="polite" aria-atomic="true" '
            f'aria-labelledby="rating-title"><h2 id="rating-title">Rating of this order</h2>'
            f'{"".join(lines)}</section>')


def _notice(notice: Notice | None) -> str:
    if notice is None:
        return ""
    role = ' role="alert"' if notice.kind == "error" else ' role="status"'
    return (f'<div class="notice {notice.kind}"{role}><p><strong>{escape(notice.title)}</strong>'
            f"</p><p>{escape(notice.text)}</p></div>")


def _record_hint(q: Question, shown: str | None, unread: bool = False) -> str:
    if shown is None and unread:
        return (f'<p class="hint" id="hint-{q.link_id}">The part of the record that was read '
                "shows nothing either way; some of it could not be read (see the rating "
                "above).</p>")
    if shown is None:
        said = "nothing either way" if q.type == "boolean" else "nothing"
    elif q.type == "choice":
        said = dict(q.answers).get(shown, shown).lower()
    elif q.type == "integer":
        said = f"{shown} {q.unit or ''}".strip()
    else:
        said = SAID.get(shown, shown)
    return f'<p class="hint" id="hint-{q.link_id}">The record shows: {escape(said)}.</p>'


def _radios(q: Question, options: tuple[tuple[str, str], ...], value: str) -> str:
    """The answers, and "Not known" (chosen where neither the form nor the record says)."""
    items = [*options, ("", "Not known")]
    return "".join(
        f'<label><input type="radio" name="{q.link_id}" value="{escape(code)}"'
        f'{" checked" if value == code else ""}> {escape(text)}</label>'
        for code, text in items)


def _question(q: Question, view: QuestionsView) -> str:
    value = view.values.get(q.link_id, "")
    hint = _record_hint(q, view.record.get(q.link_id), bool(view.unread))
    dependent = ' class="dependent"' if q.enable_when else ""
    text = f"If yes: {q.text}" if q.enable_when else q.text
    if q.type == "integer":
        bad = q.link_id in view.problems
        error = (f'<p class="hint" id="err-{q.link_id}">Enter a whole number of '
                 f'{escape(q.unit or "weeks")}, from 0 to 520.</p>') if bad else ""
        described = f"hint-{q.link_id}" + (f" err-{q.link_id}" if bad else "")
        invalid = ' aria-invalid="true"' if bad else ""
        # a dependent number is asked only once its question is answered "Yes" (the script
        # enables it as soon as that is chosen; without it, "Update rating" does)
        off = (q.enable_when is not None
               and view.values.get(q.enable_when[0], "") != _said_code(q.enable_when[1]))
        invalid += (f' disabled data-enabled-by="{q.enable_when[0]}"' if off
                    else f' data-enabled-by="{q.enable_when[0]}"' if q.enable_when else "")
        unit = f" ({escape(q.unit)})" if q.unit and q.unit not in q.text else ""
        return (f'<div class="field{" dependent" if q.enable_when else ""}">'
                f'<label for="q-{q.link_id}">{escape(text)}'
                f"{unit}</label><br>"
                f'<input id="q-{q.link_id}" name="{q.link_id}" type="number" min="0" '
                f'max="520" step="1" inputmode="numeric" value="{escape(value)}" '
                f'aria-describedby="{described}"{invalid}>'
                f"{error}{hint}</div>")
    options = q.answers if q.type == "choice" else BOOLEAN
    return (f'<fieldset{dependent} aria-describedby="hint-{q.link_id}">'
            f"<legend>{escape(text)}</legend>"
            f'<div class="choices">{_radios(q, options, value)}</div>{hint}</fieldset>')


def _said_code(answer: Any) -> str:
    return {True: "yes", False: "no"}.get(answer, str(answer)) if isinstance(answer, bool) \
        else str(answer)


def questions_page(view: QuestionsView) -> str:
    problems = ""
    if view.problems:
        problems = ('<div class="notice error" role="alert"><p>Some answers could not be read; '
                    "they are marked below.</p></div>")
    body = f"""<p class="who">Patient: {escape(view.patient)}</p>
<p class="who">Order: {escape(view.order)}</p>
<h1>Questions that decide the rating</h1>
{f'<p id="why">{escape(view.why)}</p>' if view.why else ""}
<p>Answer what you know. The answers filled in are what the record shows; change any that are
wrong. <em>Update rating</em> shows the rating for the answers on the form; <em>Save answers</em>
writes them to the patient's record, where the next rating of the order reads them.</p>
{_notice(view.notice)}{problems}{_rating(view.rating)}
<form id="answers" method="post" action="questions" novalidate>
<input type="hidden" name="csrf" value="{escape(view.csrf)}">{_chosen(view)}
{"".join(_question(q, view) for q in view.questions)}
<div class="actions">
<button type="submit" name="action" value="update">Update rating</button>
<button type="submit" name="action" value="save" class="primary">Save answers</button>
</div></form>"""
    return layout("Questions", body, script=True)


def _chosen(view: QuestionsView) -> str:
    if not view.chosen:
        return ""
    return f'<input type="hidden" name="order" value="{escape(view.chosen)}">'


def orders_page(found: list[OrderChoice]) -> str:
    """A launch that named no order: the patient's lumbar imaging orders to choose from."""
    if not found:
        body = """<h1>No lumbar imaging order to rate</h1>
<p>The EHR opened the app without naming an order, and the patient has no draft or active
lumbar spine imaging order that the app can read.</p>
<p>Open the app from the card of an order, or save the order in the EHR first.</p>"""
        return layout("No order", body)
    items = "".join(
        f'<li><a href="questions?order={escape(c.id)}">{escape(c.study)}</a>'
        f' ({escape(c.status)}{", ordered " + escape(c.authored) if c.authored else ""})</li>'
        for c in found)
    body = f"""<h1>Which order?</h1>
<p>The EHR opened the app without naming an order. The patient's lumbar imaging orders that
are still open:</p><ul id="orders">{items}</ul>"""
    return layout("Choose the order", body)


def _back(view: QuestionsView) -> str:
    """The way back to the order: the EHR is sent the rating (SMART Web Messaging), or a
    Close button and when the rating is used."""
    if view.messages is not None:
        return (f'<script type="application/json" id="messages">{view.messages.json()}'
                "</script><p>The EHR is sent the order with this rating; this window closes "
                "by itself.</p>")
    return ('<p>The order is rated with these answers when you next select or sign it.</p>'
            '<p><button type="button" id="close" class="primary">Close</button></p>')


def saved_page(view: QuestionsView) -> str:
    rows = "".join(
        f"<dt>{escape(q.text)}</dt><dd>{escape(_said(q, view.values[q.link_id]))}</dd>"
        for q in view.questions if view.values.get(q.link_id))
    body = f"""<p class="who">Patient: {escape(view.patient)}</p>
<p class="who">Order: {escape(view.order)}</p>
<h1>Answers saved</h1>
{_notice(view.notice)}{_rating(view.rating)}
<h2>Your answers</h2><dl>{rows or "<dt>none</dt><dd></dd>"}</dl>
{_back(view)}"""
    return layout("Saved", body, script=True)


def _said(q: Question, value: str) -> str:
    if q.type == "choice":
        return dict(q.answers).get(value, value)
    if q.type == "integer":
        return f"{value} {q.unit or ''}".strip()
    return SAID.get(value, value).capitalize()


SCRIPT = """// Optional: the form and the pages work without this script.
(function () {
  // After saving: the order re-rated to the EHR window (SMART Web Messaging), then done.
  var sent = document.getElementById("messages");
  var ehr = window.opener || (window.parent !== window ? window.parent : null);
  if (sent && ehr) {
    var said = JSON.parse(sent.textContent);
    said.messages.forEach(function (m) { ehr.postMessage(m, said.origin); });
  }
  var close = document.getElementById("close");
  if (close) { close.addEventListener("click", function () { window.close(); }); }

  var form = document.getElementById("answers");
  var rating = document.getElementById("rating");
  if (!form || !rating) { return; }
  // A dependent number is asked only once its question is answered "Yes".
  function toggle() {
    form.querySelectorAll("[data-enabled-by]").forEach(function (input) {
      var yes = form.querySelector('input[name="' + input.dataset.enabledBy + '"][value="yes"]');
      input.disabled = !(yes && yes.checked);
    });
  }
  toggle();
  if (!window.fetch || !window.DOMParser) { return; }
  var timer = null;
  function refresh() {
    var data = new URLSearchParams(new FormData(form));
    data.set("action", "update");
    // (form.action would be the buttons named "action")
    fetch(form.getAttribute("action"), {method: "POST", body: data, credentials: "same-origin"})
      .then(function (r) { return r.text(); })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("rating");
        if (fresh) { rating.className = fresh.className; rating.innerHTML = fresh.innerHTML; }
      })
      .catch(function () { /* the Update rating button still works */ });
  }
  form.addEventListener("change", function () {
    toggle();
    clearTimeout(timer);
    timer = setTimeout(refresh, 250);
  });
})();
"""
