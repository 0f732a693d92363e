"""The app's pages: server-rendered HTML that works without JavaScript (a form, two buttons),
accessible (a fieldset and legend per question, a label per control, visible focus), with no
third-party asset of any kind. The optional script only refreshes the rating as answers change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

from cds_service.questionnaire import Question
from cds_service.smart.problems import Problem
from cds_service.smart.rating import RatingView

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


def _rating(view: RatingView) -> str:
    css = {"Appropriate": "r-appropriate", "Not appropriate": "r-not-appropriate"}.get(
        view.rating, "r-open")
    lines = [f'<p class="verdict"><strong>{escape(view.procedure)}</strong>: '
             f'<span id="verdict">{escape(view.rating)}</span></p>']
    if view.category:
        lines.append(f"<p>ACR category: {escape(view.category_label or view.category)} "
                     f"({escape(view.category)})</p>")
    if view.scenario:
        lines.append(f"<p>Scenario: {escape(view.scenario)}</p>")
    if view.still_open:
        lines.append(f"<p>Still open: {escape(', '.join(view.still_open).lower())}.</p>")
    return (f'<section id="rating" class="{css}" aria-live="polite" aria-atomic="true" '
            f'aria-labelledby="rating-title"><h2 id="rating-title">Rating of this order</h2>'
            f'{"".join(lines)}</section>')


def _notice(notice: Notice | None) -> str:
    if notice is None:
        return ""
    role = ' role="alert"' if notice.kind == "error" else ' role="status"'
    return (f'<div class="notice {notice.kind}"{role}><p><strong>{escape(notice.title)}</strong>'
            f"</p><p>{escape(notice.text)}</p></div>")


def _record_hint(q: Question, shown: str | None) -> str:
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
    items = [*options, ("", "Not known")]
    return "".join(
        f'<label><input type="radio" name="{q.link_id}" value="{escape(code)}"'
        f'{" checked" if value and value == code else ""}> {escape(text)}</label>'
        for code, text in items)


def _question(q: Question, view: QuestionsView) -> str:
    value = view.values.get(q.link_id, "")
    hint = _record_hint(q, view.record.get(q.link_id))
    dependent = ' class="dependent"' if q.enable_when else ""
    text = f"If yes: {q.text}" if q.enable_when else q.text
    if q.type == "integer":
        bad = q.link_id in view.problems
        error = (f'<p class="hint" id="err-{q.link_id}">Enter a whole number of '
                 f'{escape(q.unit or "weeks")}, from 0 to 520.</p>') if bad else ""
        described = f"hint-{q.link_id}" + (f" err-{q.link_id}" if bad else "")
        invalid = ' aria-invalid="true"' if bad else ""
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


def questions_page(view: QuestionsView) -> str:
    problems = ""
    if view.problems:
        problems = ('<div class="notice error" role="alert"><p>Some answers could not be read; '
                    "they are marked below.</p></div>")
    body = f"""<p class="who">Patient: {escape(view.patient)}</p>
<p class="who">Order: {escape(view.order)}</p>
<h1>Questions that decide the rating</h1>
<p>Answer what you know. The answers filled in are what the record shows; change any that are
wrong. <em>Update rating</em> shows the rating for the answers on the form; <em>Save answers</em>
writes them to the patient's record, where the next rating of the order reads them.</p>
{_notice(view.notice)}{problems}{_rating(view.rating)}
<form id="answers" method="post" action="questions" novalidate>
<input type="hidden" name="csrf" value="{escape(view.csrf)}">
{"".join(_question(q, view) for q in view.questions)}
<div class="actions">
<button type="submit" name="action" value="update">Update rating</button>
<button type="submit" name="action" value="save" class="primary">Save answers</button>
</div></form>"""
    return layout("Questions", body, script=True)


def saved_page(view: QuestionsView) -> str:
    rows = "".join(
        f"<dt>{escape(q.text)}</dt><dd>{escape(_said(q, view.values[q.link_id]))}</dd>"
        for q in view.questions if view.values.get(q.link_id))
    body = f"""<p class="who">Patient: {escape(view.patient)}</p>
<p class="who">Order: {escape(view.order)}</p>
<h1>Answers saved</h1>
{_notice(view.notice)}{_rating(view.rating)}
<h2>Your answers</h2><dl>{rows or "<dt>none</dt><dd></dd>"}</dl>"""
    return layout("Saved", body)


def _said(q: Question, value: str) -> str:
    if q.type == "choice":
        return dict(q.answers).get(value, value)
    if q.type == "integer":
        return f"{value} {q.unit or ''}".strip()
    return SAID.get(value, value).capitalize()


SCRIPT = """// Optional: refresh the rating when an answer changes (the form works without this).
(function () {
  var form = document.getElementById("answers");
  var rating = document.getElementById("rating");
  if (!form || !rating || !window.fetch || !window.DOMParser) { return; }
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
    clearTimeout(timer);
    timer = setTimeout(refresh, 250);
  });
})();
"""
