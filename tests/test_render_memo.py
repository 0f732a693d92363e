"""Card texts are memoised by the variables each template reads: a repeat is served from the
memo, and any change to a variable a template reads (its own or an included template's) renders
anew."""

from __future__ import annotations

import copy

from cds_service.render import CardTemplates, load_templates, sample_context
from tests.conftest import ROOT


def fresh() -> CardTemplates:
    templates = load_templates(ROOT / "cards")
    templates._memo.clear()  # the start-up test renders are memoised too
    return templates


def test_a_repeat_is_served_from_the_memo_with_the_same_text() -> None:
    t = fresh()
    ctx = sample_context()
    first = t.render("not-appropriate", "detail", ctx)
    assert len(t._memo) == 1
    again = t.render("not-appropriate", "detail", copy.deepcopy(ctx))
    assert again == first and len(t._memo) == 1


def test_a_change_to_what_the_template_reads_renders_anew() -> None:
    t = fresh()
    ctx = sample_context()
    before = t.render("not-appropriate", "summary", ctx)
    changed = {**ctx, "order": {**ctx["order"], "short": "CT without contrast"}}
    after = t.render("not-appropriate", "summary", changed)
    assert after != before and "CT without contrast" in (after or "")


def test_the_evidence_of_an_included_template_is_part_of_the_key() -> None:
    """detail includes evidence.j2: a different resource in the evidence table is a new text."""
    t = fresh()
    assert "evidence" in t.kinds["not-appropriate"].reads["detail"]
    ctx = sample_context()
    before = t.render("not-appropriate", "detail", ctx)
    other = copy.deepcopy(ctx)
    other["evidence"][0]["recorded"] = "Condition/another-one"
    other["evidence"][0]["finding"] = "Low back pain (M54.50)"
    after = t.render("not-appropriate", "detail", other)
    assert before != after and "M54.50" in (after or "")


def test_variables_a_template_does_not_read_share_one_text() -> None:
    t = fresh()
    reads = t.kinds["not-appropriate"].reads["summary"]
    assert "evidence" not in reads
    ctx = sample_context()
    first = t.render("not-appropriate", "summary", ctx)
    other = {**ctx, "evidence": []}
    assert t.render("not-appropriate", "summary", other) == first
    assert len(t._memo) == 1


def test_a_context_that_cannot_be_keyed_is_rendered_every_time() -> None:
    t = fresh()
    assert "why" in t.kinds["not-appropriate"].reads["detail"]
    ctx = {**sample_context(), "why": object()}  # not JSON: no key, rendered as given
    text = t.render("not-appropriate", "detail", ctx)
    assert text and "object at 0x" in text and not t._memo
