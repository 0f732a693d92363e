"""End to end through the HTTP API: every fixture gets the answer fixtures/expected.json gives."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest

from tests.conftest import FIXTURE_NOW, FIXTURES, SELECT, SIGN, ValidatingClient

PAMA = "http://fhir.org/argonaut/Extension/pama-rating"
CATEGORY_SYSTEM_SUFFIX = "acr-appropriateness-category"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
CASES = EXPECTED["cases"]


def test_fixture_clock_matches_the_test_clock() -> None:
    assert datetime.fromisoformat(EXPECTED["now"].replace("Z", "+00:00")) == FIXTURE_NOW


def ratings(body: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    out = {}
    for action in body.get("systemActions", []):
        res = action["resource"]
        for ext in res.get("extension", []):
            if ext["url"] == PAMA:
                codings = ext["valueCodeableConcept"]["coding"]
                category = next((c["code"] for c in codings
                                 if c["system"].endswith(CATEGORY_SYSTEM_SUFFIX)), None)
                out[res["id"]] = (codings[0]["code"], category)
    return out


def suggestion_of(card: dict[str, Any]) -> dict[str, str] | None:
    if not card.get("suggestions"):
        return None
    action = card["suggestions"][0]["actions"][0]
    if action["type"] == "delete":
        return {"type": "delete"}
    codings = action["resource"]["code"]["coding"]
    cpt = next((c["code"] for c in codings if c["system"] == "http://www.ama-assn.org/go/cpt"),
               None)
    if cpt:
        return {"type": "update", "cpt": cpt}
    loinc = next(c["code"] for c in codings if c["system"] == "http://loinc.org")
    return {"type": "update", "loinc": loinc}


def card_order(card: dict[str, Any], order_ids: list[str]) -> str | None:
    for s in card.get("suggestions", []):
        for a in s.get("actions", []):
            rid = a.get("resource", {}).get("id") or a.get("resourceId", "").split("/")[-1]
            if rid:
                return rid
    text = card.get("detail", "")
    return next((o for o in order_ids if o in text), order_ids[0] if order_ids else None)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fixture(client: ValidatingClient, case: dict[str, Any]) -> None:
    body = json.loads((FIXTURES / case["file"]).read_text())
    url = SELECT if body["hook"] == "order-select" else SIGN
    r = client.post(url, json=body)
    assert r.status_code == case.get("status", 200), r.text
    if r.status_code != 200:
        return
    data = r.json()
    got = ratings(data)
    for oid, want in case["orders"].items():
        if want["pama"] is None:
            assert oid not in got, f"{oid} should not be rated"
        else:
            assert got[oid][0] == want["pama"], oid
            assert got[oid][1] == want["category"], oid
    cards = data["cards"]
    assert sorted(c["indicator"] for c in cards) == sorted(
        c["indicator"] for c in case["cards"]), [c["summary"] for c in cards]
    wanted = sorted((c["indicator"], json.dumps(c["suggestion"], sort_keys=True))
                    for c in case["cards"])
    seen = sorted((c["indicator"], json.dumps(suggestion_of(c), sort_keys=True)) for c in cards)
    assert seen == wanted
