"""The feedback report: what clinicians did with the cards, per card kind, rating and week."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from html import escape
from typing import Any

from cds_service import nonadherence
from cds_service.store.models import CardShown, FeedbackItem

OUTCOMES = ("accepted", "overridden", "ignored", "superseded")
UNCATEGORISED = "No category (no reason given, or a reason of another system)"
# (system, code) of an override reason -> its HL7 Non-Adherence Reason category, or None
Categorise = Callable[[str | None, str | None], str | None]
COLORS = {"accepted": "#2e7d32", "overridden": "#c62828", "ignored": "#9e9e9e",
          "superseded": "#cfd8dc"}


def _week(moment: datetime) -> str:
    day = moment.date() if isinstance(moment, datetime) else moment
    return (day - timedelta(days=day.weekday())).isoformat()


def build_report(cards: list[CardShown], feedback: list[FeedbackItem],
                 start: datetime | None = None, end: datetime | None = None,
                 service: str | None = None,
                 latest_calls: dict[str, datetime] | None = None,
                 categorise: Categorise | None = None) -> dict[str, Any]:
    """Counts per card kind, per rating and per week; override reasons, and their HL7
    Non-Adherence Reason categories (``categorise``: what the service knows of a reason);
    unknown-card feedback.

    A card's outcome is the last feedback about it (accepted then overridden is overridden, and
    counts as a changed mind); with no feedback, it is *superseded* when a later call about the
    same patient's same draft order replaced it (the EHR re-asked: the clinician changed the
    order), else *ignored*.
    """
    latest_calls = latest_calls or {}
    latest: dict[str, FeedbackItem] = {}
    outcomes_of: dict[str, set[str]] = defaultdict(set)
    for f in feedback:
        if not f.known_card:
            continue
        outcomes_of[f.card_uuid].add(f.outcome)
        if (f.card_uuid not in latest
                or f.outcome_timestamp >= latest[f.card_uuid].outcome_timestamp):
            latest[f.card_uuid] = f

    def outcome(card: CardShown) -> str:
        f = latest.get(card.uuid)
        if f:
            return f.outcome
        later = latest_calls.get(card.order_hash or "")
        return "superseded" if later is not None and later > card.created_at else "ignored"

    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    by_rating: dict[str, Counter[str]] = defaultdict(Counter)
    by_week: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for card in cards:
        o = outcome(card)
        rating = f"{card.pama or 'not rated'}" + (f" ({card.category})" if card.category else "")
        changed = len(outcomes_of.get(card.uuid, ())) > 1
        for bucket in (by_kind[card.kind], by_rating[rating], by_week[_week(card.created_at)],
                       totals):
            bucket["shown"] += 1
            bucket[o] += 1
            bucket["changed_mind"] += changed
    overrides = [f for f in feedback if f.outcome == "overridden" and f.known_card
                 and latest.get(f.card_uuid) is f]
    reasons: Counter[tuple[str, str]] = Counter()
    for f in overrides:
        code = f.override_code or "(no reason given)"
        reasons[(code, f.override_display or code)] += 1

    def rows(groups: dict[str, Counter[str]], key: str) -> list[dict[str, Any]]:
        return [{key: name, "shown": c["shown"], **{o: c[o] for o in OUTCOMES},
                 "changed_mind": c["changed_mind"]}
                for name, c in sorted(groups.items())]

    return {
        "filters": {"from": start.isoformat() if start else None,
                    "to": end.isoformat() if end else None, "service": service},
        "totals": {"shown": totals["shown"], **{o: totals[o] for o in OUTCOMES},
                   "changed_mind": totals["changed_mind"]},
        "by_kind": rows(by_kind, "kind"),
        "by_rating": rows(by_rating, "rating"),
        "override_reasons": [{"code": code, "display": display, "count": n}
                             for (code, display), n in reasons.most_common()],
        "override_categories": override_categories(overrides, categorise),
        "weekly": rows(by_week, "week"),
        "unknown_card_feedback": sum(1 for f in feedback if not f.known_card),
    }


def override_categories(overrides: list[FeedbackItem],
                        categorise: Categorise | None) -> list[dict[str, Any]]:
    """The overrides counted by HL7 Non-Adherence Reason category (CDS Hooks 3.0), so that sites
    compare; those with no category (no reason, another system's) in one row with no code."""
    counts: Counter[str | None] = Counter(
        categorise(f.override_system, f.override_code) if categorise else None
        for f in overrides)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0] is None, kv[0] or ""))
    return [{"code": code, "display": nonadherence.display_of(code) or UNCATEGORISED,
             "count": n} for code, n in ranked]


def _bars(rows: list[dict[str, Any]], key: str, title: str) -> str:
    """A horizontal stacked bar chart (accepted / overridden / ignored) as inline SVG."""
    if not rows:
        return f"<p>No cards in this period for {escape(title.lower())}.</p>"
    width, label_w, bar_h, gap = 760, 230, 22, 10
    top = max(r["shown"] for r in rows) or 1
    height = len(rows) * (bar_h + gap) + 30
    parts = [f'<svg role="img" aria-label="{escape(title)}" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}">']
    for i, r in enumerate(rows):
        y = i * (bar_h + gap) + 4
        parts.append(f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end" '
                     f'font-size="13">{escape(str(r[key]))}</text>')
        x = float(label_w)
        for o in OUTCOMES:
            w = (width - label_w - 60) * r[o] / top
            if w > 0:
                parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                             f'fill="{COLORS[o]}"><title>{o}: {r[o]}</title></rect>')
            x += w
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 16}" font-size="12">{r["shown"]}</text>')
    legend_y = height - 8
    for j, o in enumerate(OUTCOMES):
        parts.append(f'<rect x="{label_w + j * 120}" y="{legend_y - 10}" width="12" '
                     f'height="12" fill="{COLORS[o]}"/><text x="{label_w + j * 120 + 16}" '
                     f'y="{legend_y}" font-size="12">{o}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _trend(rows: list[dict[str, Any]]) -> str:
    """Weekly columns: cards shown, with the accepted share as a line."""
    if not rows:
        return "<p>No cards in this period.</p>"
    width, height, pad = 760, 220, 40
    top = max(r["shown"] for r in rows) or 1
    step = (width - 2 * pad) / len(rows)
    parts = [f'<svg role="img" aria-label="Weekly trend" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">']
    points = []
    for i, r in enumerate(rows):
        h = (height - 2 * pad) * r["shown"] / top
        x = pad + i * step
        parts.append(f'<rect x="{x + 4:.1f}" y="{height - pad - h:.1f}" '
                     f'width="{max(step - 8, 2):.1f}" height="{h:.1f}" fill="#90caf9">'
                     f'<title>{r["week"]}: {r["shown"]} shown</title></rect>')
        parts.append(f'<text x="{x + step / 2:.1f}" y="{height - pad + 16}" font-size="11" '
                     f'text-anchor="middle">{escape(r["week"][5:])}</text>')
        share = r["accepted"] / r["shown"] if r["shown"] else 0
        points.append(f"{x + step / 2:.1f},{height - pad - (height - 2 * pad) * share:.1f}")
    parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="#2e7d32" '
                 'stroke-width="2"/>')
    parts.append(f'<text x="{pad}" y="16" font-size="12">bars: cards shown per week '
                 f'(max {top}); line: share accepted</text></svg>')
    return "".join(parts)


def _table(rows: list[dict[str, Any]], key: str) -> str:
    columns = ("shown", *OUTCOMES, "changed_mind")
    head = "".join(f"<th>{h.replace('_', ' ')}</th>" for h in (key, *columns))
    body = "".join("<tr>" + f"<td>{escape(str(r[key]))}</td>" + "".join(
        f'<td class="n">{r[c]}</td>' for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page (no scripts, no CDN) with server-side SVG charts."""
    f = report["filters"]
    t = report["totals"]
    reasons = "".join(f'<tr><td>{escape(r["display"])}</td><td>{escape(r["code"])}</td>'
                      f'<td class="n">{r["count"]}</td></tr>' for r in report["override_reasons"])
    categories = "".join(f'<tr><td>{escape(r["display"])}</td><td>{escape(r["code"] or "")}'
                         f'</td><td class="n">{r["count"]}</td></tr>'
                         for r in report["override_categories"])
    period = f"{escape(str(f['from'] or 'the beginning'))} to {escape(str(f['to'] or 'now'))}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Lumbar imaging CDS: card feedback</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 64rem; color: #222;
       padding: 0 1rem; }}
h1 {{ font-size: 1.5rem; }} h2 {{ font-size: 1.15rem; margin-top: 2rem; }}
.totals {{ display: flex; gap: 1rem; flex-wrap: wrap; }}
.totals div {{ border: 1px solid #ddd; border-radius: 6px; padding: .6rem 1rem; }}
.totals b {{ display: block; font-size: 1.6rem; }}
table {{ border-collapse: collapse; margin-top: .5rem; }}
th, td {{ border-bottom: 1px solid #eee; padding: .3rem .8rem; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>Lumbar imaging CDS: what clinicians did with the cards</h1>
<p>Period: {period}. Service: {escape(str(f['service'] or 'all'))}.
A card's outcome is the last feedback about it (a clinician who accepted and then overrode it
changed their mind: it counts as overridden, and under "changed mind"). A card with no feedback is
superseded when a later call about the same order replaced it (the order was changed), else
ignored.</p>
<div class="totals">
<div id="shown"><b>{t['shown']}</b>cards shown</div>
<div id="accepted"><b>{t['accepted']}</b>accepted</div>
<div id="overridden"><b>{t['overridden']}</b>overridden</div>
<div id="ignored"><b>{t['ignored']}</b>ignored</div>
<div id="superseded"><b>{t['superseded']}</b>superseded</div>
<div id="changed-mind"><b>{t['changed_mind']}</b>changed mind</div>
<div id="unknown"><b>{report['unknown_card_feedback']}</b>feedback for unknown cards</div>
</div>
<h2>By card kind</h2>{_bars(report['by_kind'], 'kind', 'By card kind')}
{_table(report['by_kind'], 'kind')}
<h2>By rating of the order</h2>{_bars(report['by_rating'], 'rating', 'By rating')}
{_table(report['by_rating'], 'rating')}
<h2>Override reasons</h2>
<table><thead><tr><th>reason</th><th>code</th><th>count</th></tr></thead>
<tbody>{reasons or '<tr><td colspan="3">none</td></tr>'}</tbody></table>
<h2 id="categories">Overrides by category</h2>
<p>The HL7 Non-Adherence Reason categories of CDS Hooks 3.0, the same at every site: an HL7 reason
counts under its own category, one of this service's under the category it is filed under.</p>
<table><thead><tr><th>category</th><th>code</th><th>count</th></tr></thead>
<tbody>{categories or '<tr><td colspan="3">none</td></tr>'}</tbody></table>
<h2>Weekly trend</h2>{_trend(report['weekly'])}
{_table(report['weekly'], 'week')}
<p><small>Ratings from the ACR Appropriateness Criteria for Low Back Pain (2021).</small></p>
</body></html>"""


def parse_day(value: str | None) -> datetime | None:
    """A YYYY-MM-DD (or ISO datetime) filter value as an aware UTC datetime.

    ValueError when it is not a date, or is an instant outside what can be stored.
    """
    if not value:
        return None
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    try:
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except OverflowError:
        raise ValueError(f"{value!r} is outside the range of dates") from None
