"""CDS Hooks 3.0 additions (issue 24), each answered so that a 2.0 client sees nothing break:
discovery versions, re-signed orders, override reasons on the HL7 Non-Adherence Reason codes and
the report by category, SMART v1 and v2 scopes, JWTs with extra claims and the tenant in the
audit (SQLite and PostgreSQL), OperationOutcomes on every non-2xx answer."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text

from cds_service import nonadherence
from cds_service.app import create_app
from cds_service.render import load_templates
from cds_service.scopes import can_create, can_read, can_search
from cds_service.store import Store
from cds_service.store.models import FeedbackItem, HookCall
from tests.builders import PATIENT, bundle, hook_request, order, seed_prefetch, service_request
from tests.conftest import FIXTURE_NOW, ROOT, SELECT, SIGN, ValidatingClient, dev_settings
from tests.fhir_server import FhirTestServer
from tests.test_auth_api import production_settings, token
from tests.test_store import ADMIN, BACKENDS, app_for, database, rows

HL7 = nonadherence.SYSTEM
FOUND_IN_CODE_SYSTEM = {  # as the code system gives them (its JSON, commit 16b2bfc7)
    "cds-not-applicable": "PC CDS does not apply to patient",
    "recipient-concerns-outcomes": "Recipient has concerns regarding potential health outcomes",
    "recipient-disagrees-evidence":
        "Recipient disagrees with recommendation because of issues with the evidence",
    "patient-contraindication": "Patient has contraindication to recommended action",
    "indication-order-exists": "Patient has indication/order for intended action",
    "action-completed": "Recommended action was already completed",
    "need-more-info": "Could not address recommended action due to need for more "
                      "information/pending results/pending consult",
    "risk-benefit-ratio": "Recipient assessment of risk/benefit ratio",
    "expert-contradicts": "Advice from expert contradicts the recommended action",
    "service-not-available": "Treatment or service is not practically available",
}


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from database(request.param, tmp_path)


def card_for(c: ValidatingClient, cpt: str, path: str = SELECT) -> dict[str, Any]:
    r = c.post(path, json=hook_request(order(cpt=cpt), prefetch=seed_prefetch(FIXTURE_NOW)))
    assert r.status_code == 200, r.text
    (card,) = r.json()["cards"]
    return card


def report(c: ValidatingClient) -> dict[str, Any]:
    r = c.get("/admin/report", headers={"Authorization": f"Bearer {ADMIN}",
                                        "Accept": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------ discovery and hooks


def test_discovery_declares_the_cds_hooks_and_hook_versions(client: ValidatingClient) -> None:
    services = {s["id"]: s for s in client.get("/cds-services").json()["services"]}
    assert {i: (s["hook"], s["version"], s["hookVersion"]) for i, s in services.items()} == {
        "lbp-imaging-order-select": ("order-select", "3.0.0", "1.0"),
        "lbp-imaging-order-sign": ("order-sign", "3.0.0", "1.1.0")}
    for s in services.values():  # what a 2.0 client reads is still there
        assert s["description"] and set(s["prefetch"]) >= {"patient", "conditions"}


def test_order_sign_rates_an_order_re_signed_after_revision(client: ValidatingClient) -> None:
    """order-sign 1.1.0: an order being re-signed is no longer a draft (here active, and on
    record as the active order it is); it is rated like a draft, and not taken for its own
    duplicate."""
    revised = order("signed-1", cpt="72149")
    revised["status"] = "active"
    prefetch = seed_prefetch(FIXTURE_NOW)
    on_record = service_request("signed-1", "72149", FIXTURE_NOW.date().isoformat())
    on_record["status"] = "active"
    prefetch["servicerequests"] = bundle(on_record)
    r = client.post(SIGN, json=hook_request(revised, hook="order-sign", prefetch=prefetch))
    assert r.status_code == 200, r.text
    body = r.json()
    (action,) = body["systemActions"]
    assert action["resource"]["id"] == "signed-1" and action["resource"]["status"] == "active"
    rating = next(e for e in action["resource"]["extension"] if e["url"].endswith("pama-rating"))
    assert rating["valueCodeableConcept"]["coding"][0]["code"] == "not-appropriate"
    assert [c["indicator"] for c in body["cards"]] == ["warning"]
    assert "duplicate" not in body["cards"][0]["summary"].lower()


# ------------------------------------------------------------------ override reasons


def test_the_code_system_is_the_published_one() -> None:
    assert len(nonadherence.CODES) == 35 and len(nonadherence.BY_CODE) == 35
    assert nonadherence.CATEGORIES == (
        "cds-not-applicable", "cds-suboptimal-context", "recipient-disagrees-evidence",
        "recipient-concerns-outcomes", "does-not-align-preferences", "not-convenient-feasible")
    for code, display in FOUND_IN_CODE_SYSTEM.items():
        assert nonadherence.display_of(code) == display, code
    assert nonadherence.category_of("patient-contraindication") == "recipient-concerns-outcomes"
    assert nonadherence.category_of("cds-not-applicable") == "cds-not-applicable"
    assert nonadherence.display_of("not-a-code") is None


def test_a_warning_card_offers_non_adherence_reasons_after_its_own(
        client: ValidatingClient) -> None:
    card = card_for(client, "72149")  # the seed's MRI with contrast: not appropriate
    assert card["indicator"] == "warning"
    reasons = card["overrideReasons"]
    ours = reasons[0]["system"]
    assert ours != HL7 and ours.endswith("/fhir/CodeSystem/override-reason")
    own = [r for r in reasons if r["system"] == ours]
    standard = [r for r in reasons if r["system"] == HL7]
    assert reasons == own + standard  # the service's own first (the sandbox reads the first)
    assert {r["code"]: r["display"] for r in standard} == {
        code: FOUND_IN_CODE_SYSTEM[code] for code in ("expert-contradicts", "risk-benefit-ratio")}
    # kept where no HL7 code says it as plainly: a red flag the record lacks, a shared decision,
    # MRI not tolerated (not "a contraindication to the recommended action")
    assert {"red-flag-present", "patient-preference", "mri-contraindicated"} <= {
        r["code"] for r in own}
    assert "patient-contraindication" not in {r["code"] for r in reasons}


def test_every_card_kind_offers_only_real_codes_with_their_display() -> None:
    templates = load_templates(ROOT / "cards")
    offered = {}
    for name, kind in templates.kinds.items():
        for r in kind.non_adherence:
            assert r["display"] == nonadherence.display_of(r["code"]), (name, r)
            offered.setdefault(name, []).append(r["code"])
        for r in kind.override_reasons:  # each own reason is filed under a category
            assert r["category"] in nonadherence.CATEGORIES, (name, r)
    # no general HL7 wording beside a safety finding (it could read as setting it aside)
    assert not {"cauda-equina", "mri-safety", "contrast-risk"} & set(offered)
    assert offered["better-alternative"] == ["service-not-available", "expert-contradicts"]
    # the critical card's reasons each say what was done instead (never "MRI not tolerated"
    # alone, which leaves a study that cannot show the cauda equina)
    assert [r["code"] for r in templates.kinds["cauda-equina"].override_reasons] == [
        "already-evaluated", "mri-not-possible-now", "record-incomplete"]


def test_an_unknown_non_adherence_code_stops_the_start(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    shutil.copytree(ROOT / "cards", cards)
    path = cards / "suspicion.yaml"
    path.write_text(path.read_text().replace("expert-contradicts", "expert-contradicted"))
    with pytest.raises(ValueError, match="did you mean 'expert-contradicts'"):
        load_templates(cards)


def override(card: dict[str, Any], code: str, system: str | None, minute: int,
             display: str | None = None) -> dict[str, Any]:
    reason = {k: v for k, v in (("code", code), ("system", system), ("display", display)) if v}
    return {"card": card["uuid"], "outcome": "overridden",
            "outcomeTimestamp": f"2026-11-01T12:{minute:02d}:00Z",
            "overrideReason": {"reason": reason}}


def test_overrides_are_reported_by_reason_and_by_category(db_url: str, tmp_path: Path) -> None:
    """An HL7 code sent by code and system alone (as the sandbox sends reasons) is stored with
    the code system's display; a former code of ours still counts, under the category of the
    HL7 code that replaced it; a reason of another system has no category."""
    with ValidatingClient(app_for(db_url, tmp_path)) as c:
        cards = [card_for(c, "72149") for _ in range(4)]
        ours = cards[0]["overrideReasons"][0]["system"]
        items = [override(cards[0], "risk-benefit-ratio", HL7, 1),
                 override(cards[1], "mri-contraindicated", ours, 2),
                 override(cards[2], "specialist-request", ours, 3),
                 override(cards[3], "x-1", "urn:other", 4, "Something else")]
        r = c.post(SELECT + "/feedback", json={"feedback": items})
        assert r.status_code == 200 and r.json()["stored"] == 4, r.text
        body = report(c)
        page = c.get("/admin/report", headers={"Authorization": f"Bearer {ADMIN}"}).text
    stored = {f.override_code: f for f in rows(db_url, FeedbackItem)}
    assert stored["risk-benefit-ratio"].override_system == HL7
    assert stored["risk-benefit-ratio"].override_display == \
        FOUND_IN_CODE_SYSTEM["risk-benefit-ratio"]
    assert stored["mri-contraindicated"].override_display == "MRI contraindicated or not tolerated"
    assert stored["specialist-request"].override_display == \
        "Requested by a specialist (spine surgery, neurology, oncology)"
    assert {r["code"]: r["count"] for r in body["override_reasons"]} == {
        "risk-benefit-ratio": 1, "mri-contraindicated": 1, "specialist-request": 1, "x-1": 1}
    assert body["override_categories"] == [
        {"code": "recipient-concerns-outcomes", "count": 2,
         "display": FOUND_IN_CODE_SYSTEM["recipient-concerns-outcomes"]},
        {"code": "recipient-disagrees-evidence", "count": 1,
         "display": FOUND_IN_CODE_SYSTEM["recipient-disagrees-evidence"]},
        {"code": None, "count": 1,
         "display": "No category (no reason given, or a reason of another system)"}]
    assert "Overrides by category" in page
    assert FOUND_IN_CODE_SYSTEM["recipient-concerns-outcomes"] in page


def test_the_report_command_counts_categories(tmp_path: Path, monkeypatch: Any,
                                              capsys: Any) -> None:
    from cds_service import cli

    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'cds.db'}"
    with ValidatingClient(app_for(url, tmp_path)) as c:
        card = card_for(c, "72149")
        c.post(SELECT + "/feedback", json={"feedback": [
            override(card, "expert-contradicts", HL7, 1)]})
    monkeypatch.setenv("CDS_ENV", "development")
    monkeypatch.setenv("CDS_DATABASE_URL", url)
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path))
    assert cli.main(["report"]) == 0
    out = capsys.readouterr().out
    assert "overrides by category" in out
    assert ("1  Recipient disagrees with recommendation because of issues with the evidence "
            "(recipient-disagrees-evidence)") in out


# ------------------------------------------------------------------ SMART scopes


@pytest.mark.parametrize(("scope", "search", "read"), [
    ("patient/Condition.read", True, True),  # v1
    ("patient/Condition.rs", True, True),  # v2
    ("user/Condition.cruds", True, True),
    ("patient/*.read", True, True),
    ("patient/*.rs", True, True),
    ("patient/Condition.rs?category=problem-list-item", True, True),  # narrowed, still granted
    ("patient/Condition.r", False, True),
    ("patient/Condition.s", True, False),
    ("patient/Condition.write", False, False),
    ("patient/Condition.sr", False, False),  # v2 letters out of order: not a scope
    ("patient/Observation.rs launch openid", False, False),
    ("", False, False),
])
def test_v1_and_v2_scopes_read_alike(scope: str, search: bool, read: bool) -> None:
    assert can_search(scope, "Condition") is search
    assert can_read(scope, "Condition") is read


def test_create_scopes_in_both_versions() -> None:
    for scope in ("patient/QuestionnaireResponse.c", "patient/QuestionnaireResponse.cruds",
                  "patient/QuestionnaireResponse.write", "patient/*.*"):
        assert can_create(scope, "QuestionnaireResponse"), scope
    assert not can_create("patient/QuestionnaireResponse.rs", "QuestionnaireResponse")


V1 = " ".join(f"patient/{t}.read" for t in ("Patient", "Condition", "Procedure",
                                            "ServiceRequest", "MedicationRequest",
                                            "QuestionnaireResponse", "AllergyIntolerance"))
V2 = V1.replace(".read", ".rs")


@pytest.fixture(scope="module")
def fhir() -> Iterator[FhirTestServer]:
    with FhirTestServer(page_size=50) as server:
        yield server


def fetched_call(fhir: FhirTestServer, scope: str) -> dict[str, Any]:
    """The seed's MRI without contrast with no prefetch: everything is read from the server
    with a token of these scopes."""
    fhir.data[PATIENT] = copy.deepcopy(seed_prefetch(FIXTURE_NOW))
    body = hook_request(order(cpt="72148"))
    body["fhirServer"] = fhir.base
    body["fhirAuthorization"] = {"access_token": "t" * 24, "token_type": "Bearer",
                                 "expires_in": 300, "scope": scope, "subject": "cds"}
    return body


@pytest.mark.parametrize("scope", [V1, V2, "patient/*.read", "patient/*.rs"])
def test_the_hook_fetch_reads_v1_and_v2_scopes(fhir: FhirTestServer, scope: str) -> None:
    settings = dev_settings(fhir_allowed_servers=fhir.base, fhir_budget_seconds=2.0)
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
        fhir.requests.clear()
        r = c.post(SELECT, json=fetched_call(fhir, scope))
    assert r.status_code == 200, r.text
    assert r.json()["cards"] == []  # MRI without contrast is right for V3: rated, no card
    asked = {p.split("?")[0].split("/")[2] for p, _ in fhir.requests}
    assert asked >= {"Patient", "Condition", "Procedure", "ServiceRequest", "MedicationRequest"}


@pytest.mark.parametrize("scope", [V1, V2])
def test_what_the_scopes_do_not_grant_is_not_asked_for(fhir: FhirTestServer,
                                                       scope: str) -> None:
    without = " ".join(s for s in scope.split() if "Procedure" not in s)
    settings = dev_settings(fhir_allowed_servers=fhir.base, fhir_budget_seconds=2.0)
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
        fhir.requests.clear()
        r = c.post(SELECT, json=fetched_call(fhir, without))
    assert r.status_code == 412, r.text
    assert not any("/Procedure" in p for p, _ in fhir.requests)
    (problem,) = r.json()["issue"]
    assert problem["expression"] == ["prefetch.procedures"]
    assert "'procedures' (Procedure?patient={{context.patientId}}; fetch: not-granted)" \
        in problem["diagnostics"]


# ------------------------------------------------------------------ JWT claims and the audit


def test_a_jwt_with_extra_claims_is_accepted_and_its_tenant_audited(
        db_url: str, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    public.update(kid="ehr-key-1", use="sig", alg="ES384")
    settings = production_settings(tmp_path, [{"iss": "https://ehr.example.org",
                                               "jwks": {"keys": [public]}}],
                                   database_url=db_url)
    body = hook_request(order(cpt="72149"), prefetch=seed_prefetch(FIXTURE_NOW))
    now = int(time.time())
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
        def call(**claims: Any) -> int:
            auth = {"Authorization": f"Bearer {token(key, SELECT, **claims)}"}
            return c.post(SELECT, json=body, headers=auth).status_code

        assert call(sub="user-123", nbf=now - 5, tenant="tenant-a") == 200  # as Epic sends
        assert call() == 200  # no tenant
        assert call(tenant="t" * 400) == 200  # kept, cut to its column
        assert call(nbf=now + 3600) == 401  # not yet valid: still refused
    tenants = sorted((h.tenant or "") for h in rows(db_url, HookCall))
    assert tenants == sorted(["", "t" * 200, "tenant-a"])


def test_migration_0005_adds_the_tenant_to_earlier_calls(db_url: str) -> None:
    async def run() -> list[Any]:
        store = Store(db_url, "k")
        try:
            await store.upgrade("0004")
            async with store.engine.begin() as conn:
                await conn.execute(text(
                    "INSERT INTO hook_call (id, created_at, service_id, hook, hook_instance, "
                    "patient_hash, orders, latency_ms) VALUES ('old-1', '2026-11-01 12:00:00', "
                    "'s', 'order-select', 'h', 'p', '[]', 1.0)"))
            await store.upgrade()
            async with store.engine.connect() as conn:
                return list((await conn.execute(text(
                    "SELECT id, tenant FROM hook_call"))).all())
        finally:
            await store.dispose()

    assert [tuple(r) for r in asyncio.run(run())] == [("old-1", None)]


# ------------------------------------------------------------------ errors


def test_every_non_2xx_answer_is_an_operation_outcome(tmp_path: Path) -> None:
    settings = dev_settings(data_dir=tmp_path, feedback_max_items=1, max_body_bytes=20_000)
    seed = hook_request(order(cpt="72148"), prefetch=seed_prefetch(FIXTURE_NOW))
    del seed["prefetch"]["procedures"]
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
        answers = {
            400: c.post(SELECT, content=b"{not json", headers={"Content-Type": "application/json"}),
            404: c.post("/cds-services/no-such-service", json={}),
            412: c.post(SELECT, json=seed),
            413: c.post(SELECT + "/feedback", json={"feedback": [{}, {}]}),
        }
        answers[413.1] = c.post(SELECT, content=b"{" + b" " * 30_000 + b"}",  # type: ignore[index]
                                headers={"Content-Type": "application/json"})
    prod = production_settings(tmp_path, [{"iss": "https://ehr.example.org",
                                           "jwks": {"keys": []}}])
    with ValidatingClient(create_app(prod, clock=lambda: FIXTURE_NOW)) as c:
        answers[401] = c.get("/cds-services")
    for status, r in answers.items():
        assert r.status_code == int(status), (status, r.text)
        assert r.headers["content-type"].startswith("application/fhir+json"), status
        body = r.json()
        assert body["resourceType"] == "OperationOutcome" and body["issue"], (status, body)
        assert all(i["severity"] and i["code"] for i in body["issue"]), body
    diagnostics = answers[412].json()["issue"][0]["diagnostics"]
    assert diagnostics.startswith("prefetch key 'procedures' (Procedure?patient=")
    assert "fetch: no-server" in diagnostics
