"""The service's own code systems: every system URL it sends resolves, over a real socket, to a
FHIR R4 CodeSystem (valid under fhir.resources R4B) that holds the code with its display."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.codesystem import CodeSystem

from cds_service.app import create_app
from cds_service.codesystems import LEGACY_OVERRIDE_SYSTEM
from cds_service.engine import Engine
from cds_service.knowledge import load_knowledge
from cds_service.nonadherence import SYSTEM as NON_ADHERENCE
from cds_service.render import load_templates
from cds_service.settings import Settings
from tests.builders import hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, ROOT, SELECT, ValidatingClient, dev_settings
from tests.served import served

FHIR_JSON = "application/fhir+json"


def codings(value: Any) -> list[dict[str, Any]]:
    """Every Coding (a dict with system and code) anywhere in a JSON value."""
    found: list[dict[str, Any]] = []
    if isinstance(value, dict):
        if isinstance(value.get("system"), str) and "code" in value:
            found.append(value)
        for v in value.values():
            found += codings(v)
    elif isinstance(value, list):
        for v in value:
            found += codings(v)
    return found


def test_every_system_of_ours_on_the_wire_resolves_to_its_code(tmp_path: Path) -> None:
    with served(tmp_path, CDS_CANONICAL_BASE="{base}") as base:
        now = datetime.now(UTC)
        # MRI with contrast for the seed chart: a card with override reasons, and a rating
        body = hook_request(order("mri-w", cpt="72149"), prefetch=seed_prefetch(now))
        answer = httpx.post(base + SELECT, json=body, timeout=10)
        assert answer.status_code == 200
        ours = [c for c in codings(answer.json()) if c["system"].startswith(base)]
        systems = {c["system"] for c in ours}
        assert systems == {f"{base}/fhir/CodeSystem/acr-appropriateness-category",
                           f"{base}/fhir/CodeSystem/override-reason"}
        for system in systems:
            got = httpx.get(system, timeout=5)
            assert got.status_code == 200
            assert got.headers["content-type"].startswith(FHIR_JSON)
            cs = CodeSystem.model_validate(got.json())  # valid FHIR (R4B)
            assert cs.url == system and cs.status == "active" and cs.content == "complete"
            concepts = {c.code: c.display for c in cs.concept or []}
            assert cs.count == len(concepts)
            for c in ours:
                if c["system"] == system:
                    assert concepts.get(c["code"]) == c["display"], c
        search = httpx.get(f"{base}/fhir/CodeSystem",
                           params={"url": f"{base}/fhir/CodeSystem/override-reason"}, timeout=5)
        assert search.status_code == 200
        bundle = search.json()
        assert bundle["resourceType"] == "Bundle" and bundle["total"] == 1
        assert bundle["entry"][0]["resource"]["id"] == "override-reason"


def test_an_unknown_code_system_is_a_404_outcome(client: ValidatingClient) -> None:
    r = client.get("/fhir/CodeSystem/nope")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith(FHIR_JSON)
    assert r.json()["resourceType"] == "OperationOutcome"
    assert "nope" in r.json()["issue"][0]["diagnostics"]


def test_the_canonical_base_defaults_to_the_public_base_url() -> None:
    settings = Settings(env="production", public_base_url="https://cds.hospital.example/",
                        database_url="sqlite+aiosqlite:///:memory:")
    engine = Engine(load_knowledge(), load_templates(ROOT / "cards"), settings)
    assert engine.systems.acr_category == \
        "https://cds.hospital.example/fhir/CodeSystem/acr-appropriateness-category"
    assert engine.systems.override_reason == \
        "https://cds.hospital.example/fhir/CodeSystem/override-reason"
    rating = engine.pama_extensions("appropriate", "UA")[0]["valueCodeableConcept"]["coding"]
    assert rating[1]["system"] == engine.systems.acr_category
    explicit = Settings(env="production", public_base_url="https://cds.hospital.example",
                        canonical_base="https://terminology.hospital.example/cds")
    assert Engine(load_knowledge(), load_templates(ROOT / "cards"),
                  explicit).systems.acr_category.startswith(
        "https://terminology.hospital.example/cds/fhir/CodeSystem/")


def test_a_site_system_of_override_reasons_is_used_and_not_served(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    shutil.copytree(ROOT / "cards", cards)
    common = cards / "common.yaml"
    common.write_text(common.read_text() + "override_reason_system: urn:oid:1.2.3.4\n")
    app = create_app(dev_settings(cards_dir=cards), clock=lambda: FIXTURE_NOW)
    with ValidatingClient(app) as c:
        r = c.post(SELECT, json=hook_request(order("x", cpt="72149"),
                                             prefetch=seed_prefetch(FIXTURE_NOW)))
        reasons = r.json()["cards"][0]["overrideReasons"]
        # the site's system names our own reasons; the HL7 codes keep HL7's system
        assert {x["system"] for x in reasons} == {"urn:oid:1.2.3.4", NON_ADHERENCE}
        assert reasons[0]["system"] == "urn:oid:1.2.3.4"
        assert c.get("/fhir/CodeSystem/override-reason").status_code == 404
        assert c.get("/fhir/CodeSystem/acr-appropriateness-category").status_code == 200


@pytest.mark.parametrize("system", [
    "https://old-cds.hospital.example/fhir/CodeSystem/override-reason",  # a former base
    LEGACY_OVERRIDE_SYSTEM,  # cards issued before the systems resolved
])
def test_feedback_naming_a_former_system_by_code_gets_our_display(tmp_path: Path,
                                                                   system: str) -> None:
    admin = "admin-token-for-this-test"
    settings = dev_settings(data_dir=tmp_path, admin_token=admin,
                            canonical_base_previous="https://old-cds.hospital.example/")
    app = create_app(settings, clock=lambda: FIXTURE_NOW)
    with ValidatingClient(app) as c:
        card = c.post(SELECT, json=hook_request(order("x", cpt="72149"),
                                                prefetch=seed_prefetch(FIXTURE_NOW))
                      ).json()["cards"][0]
        item = {"card": card["uuid"], "outcome": "overridden",
                "outcomeTimestamp": "2026-11-01T12:05:00Z",
                "overrideReason": {"reason": {"system": system, "code": "patient-preference"}}}
        assert c.post(SELECT + "/feedback", json={"feedback": [item]}).status_code == 200
        report = c.get("/admin/report", headers={"Authorization": f"Bearer {admin}",
                                                 "Accept": "application/json"}).json()
    assert {"code": "patient-preference", "display": "Shared decision with the patient"} \
        .items() <= report["override_reasons"][0].items()
