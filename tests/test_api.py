"""The HTTP protocol through the ASGI app: discovery, hooks, feedback, errors, CORS, limits."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cds_service.app import create_app
from tests.builders import bundle, hook_request, order, seed_prefetch
from tests.conftest import (
    FIXTURE_NOW,
    SELECT,
    SIGN,
    ValidatingClient,
    dev_settings,
)

PAMA = "http://fhir.org/argonaut/Extension/pama-rating"


def rating_of(action: dict[str, Any]) -> str:
    for ext in action["resource"]["extension"]:
        if ext["url"] == PAMA:
            return ext["valueCodeableConcept"]["coding"][0]["code"]
    raise AssertionError("no pama-rating extension")


def issue_text(response: Any) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return " ".join(i.get("diagnostics", "") + " " + " ".join(i.get("expression", []))
                    for i in body["issue"])


# ------------------------------------------------------------------ discovery, health, CORS


def test_discovery_lists_one_service_per_hook_with_prefetch(client: ValidatingClient) -> None:
    r = client.get("/cds-services")
    assert r.status_code == 200
    services = {s["id"]: s for s in r.json()["services"]}
    assert {s["hook"] for s in services.values()} == {"order-select", "order-sign"}
    prefetch = services["lbp-imaging-order-select"]["prefetch"]
    assert prefetch == {
        "patient": "Patient/{{context.patientId}}",
        "conditions": "Condition?patient={{context.patientId}}",
        "procedures": "Procedure?patient={{context.patientId}}",
        "servicerequests": "ServiceRequest?patient={{context.patientId}}",
        "medications": "MedicationRequest?patient={{context.patientId}}",
        "questionnaireresponses": "QuestionnaireResponse?patient={{context.patientId}}",
        "allergies": "AllergyIntolerance?patient={{context.patientId}}",
    }


def test_healthz(client: ValidatingClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_cors_preflight_allows_sandbox_headers(client: ValidatingClient) -> None:
    r = client.options(SELECT, headers={
        "Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("*", "https://sandbox.cds-hooks.org")
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "POST" in r.headers["access-control-allow-methods"]


def test_cors_header_on_simple_response(client: ValidatingClient) -> None:
    r = client.get("/cds-services", headers={"Origin": "https://sandbox.cds-hooks.org"})
    assert r.headers["access-control-allow-origin"] in ("*", "https://sandbox.cds-hooks.org")


# ------------------------------------------------------------------ the seed scenario


def test_seed_mri_with_contrast_warns_and_suggests_mri_without(client: ValidatingClient) -> None:
    body = hook_request(order(cpt="72149"), prefetch=seed_prefetch(FIXTURE_NOW))
    r = client.post(SELECT, json=body)
    assert r.status_code == 200
    data = r.json()
    assert [c["indicator"] for c in data["cards"]] == ["warning"]
    card = data["cards"][0]
    suggestion = card["suggestions"][0]
    assert suggestion["isRecommended"] is True
    action = suggestion["actions"][0]
    assert action["type"] == "update"
    assert action["resource"]["id"] == "draft-1"
    codes = {(c["system"], c["code"]) for c in action["resource"]["code"]["coding"]}
    assert ("http://www.ama-assn.org/go/cpt", "72148") in codes
    assert ("http://loinc.org", "30679-5") in codes
    assert rating_of(action) == "appropriate"
    assert action["resource"]["reasonCode"] == body["context"]["draftOrders"]["entry"][0][
        "resource"]["reasonCode"]
    assert [rating_of(a) for a in data["systemActions"]] == ["not-appropriate"]
    assert data["extension"]["systemActions"] == data["systemActions"]


def test_seed_mri_without_contrast_is_appropriate_without_card(client: ValidatingClient) -> None:
    r = client.post(SELECT, json=hook_request(order(cpt="72148"),
                                              prefetch=seed_prefetch(FIXTURE_NOW)))
    assert r.status_code == 200
    assert r.json()["cards"] == []
    assert [rating_of(a) for a in r.json()["systemActions"]] == ["appropriate"]


# ------------------------------------------------------------------ real-client tolerance


def test_bundle_type_missing_and_no_encounter(client: ValidatingClient) -> None:
    body = hook_request(order(cpt="72149"), prefetch=seed_prefetch(FIXTURE_NOW))
    body["context"]["draftOrders"].pop("type", None)
    body["context"].pop("encounterId", None)
    r = client.post(SELECT, json=body)
    assert r.status_code == 200 and len(r.json()["cards"]) == 1


def test_other_draft_types_are_ignored(client: ValidatingClient) -> None:
    med = {"resourceType": "MedicationRequest", "id": "rx-1", "status": "draft",
           "intent": "order", "medicationCodeableConcept": {"text": "Naproxen"},
           "subject": {"reference": "Patient/pt-seed"}}
    nutrition = {"resourceType": "NutritionOrder", "id": "no-1", "status": "draft"}
    body = hook_request(med, nutrition, order(cpt="72149"), selections=["MedicationRequest/rx-1"],
                        prefetch=seed_prefetch(FIXTURE_NOW))
    r = client.post(SELECT, json=body)
    assert r.status_code == 200
    assert r.json() == {"cards": []}


def test_selection_pointing_nowhere_gives_no_cards(client: ValidatingClient) -> None:
    body = hook_request(order(cpt="72149"), selections=["ServiceRequest/does-not-exist"],
                        prefetch=seed_prefetch(FIXTURE_NOW))
    r = client.post(SELECT, json=body)
    assert r.status_code == 200 and r.json() == {"cards": []}


def test_selection_only_judges_the_selected_order(client: ValidatingClient) -> None:
    body = hook_request(order("a", cpt="72149"), order("b", cpt="72148"),
                        selections=["ServiceRequest/b"], prefetch=seed_prefetch(FIXTURE_NOW))
    r = client.post(SELECT, json=body)
    data = r.json()
    assert data["cards"] == []
    assert [a["resource"]["id"] for a in data["systemActions"]] == ["b"]


def test_order_sign_without_selections_judges_every_draft(client: ValidatingClient) -> None:
    body = hook_request(order("a", cpt="72149"), order("b", cpt="72148"), order("c", cpt="72100"),
                        hook="order-sign", prefetch=seed_prefetch(FIXTURE_NOW))
    r = client.post(SIGN, json=body)
    assert r.status_code == 200
    data = r.json()
    ratings = {a["resource"]["id"]: rating_of(a) for a in data["systemActions"]}
    assert ratings == {"a": "not-appropriate", "b": "appropriate", "c": "appropriate"}
    # MRI without contrast is already drafted: no suggestion duplicates it, so the X-ray (MBA)
    # gets no card and the MRI with contrast a warning without a change suggestion.
    (card,) = data["cards"]
    assert card["indicator"] == "warning" and "suggestions" not in card
    assert "already among the draft orders" in card["detail"]


def test_sandbox_empty_initial_order_gets_200_and_nothing(client: ValidatingClient) -> None:
    empty = order(cpt="x")
    empty["code"] = {"coding": [{}]}
    empty["reasonCode"] = []
    r = client.post(SELECT, json=hook_request(empty))
    assert r.status_code == 200 and r.json() == {"cards": []}


@pytest.mark.parametrize("state", ["absent", "null", "outcome", "bundle", "paged"])
def test_prefetch_key_in_every_state(client: ValidatingClient, state: str) -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    if state == "absent":
        del prefetch["procedures"]
    elif state == "null":
        prefetch["procedures"] = None
    elif state == "outcome":
        prefetch["procedures"] = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "timeout"}]}
    elif state == "paged":
        prefetch["procedures"]["link"] = [{"relation": "next",
                                           "url": "https://ehr.example/fhir/Procedure?page=2"}]
    r = client.post(SELECT, json=hook_request(order(cpt="72148"), prefetch=prefetch))
    if state in ("absent", "outcome"):
        # Conservative care unknown, nothing to fetch from: 412 naming the key.
        assert r.status_code == 412
        assert r.json()["issue"][0]["expression"] == ["prefetch.procedures"]
        return
    assert r.status_code == 200
    data = r.json()
    if state in ("bundle", "paged"):
        # The therapy is in the data received: V3, MRI without contrast is appropriate.
        assert data["cards"] == [] and rating_of(data["systemActions"][0]) == "appropriate"
    else:
        # null = no procedures: no conservative care, so not V3: MRI is not appropriate yet.
        assert rating_of(data["systemActions"][0]) == "not-appropriate"


def test_prefetch_from_another_patient_is_not_used(client: ValidatingClient) -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    for entry in prefetch["procedures"]["entry"]:
        entry["resource"]["subject"]["reference"] = "Patient/someone-else"
    r = client.post(SELECT, json=hook_request(order(cpt="72148"), prefetch=prefetch))
    assert rating_of(r.json()["systemActions"][0]) == "not-appropriate"


def test_non_lumbar_imaging_gets_no_rating(client: ValidatingClient) -> None:
    lab = order(cpt="36415", reason=None)
    r = client.post(SELECT, json=hook_request(lab, prefetch=seed_prefetch(FIXTURE_NOW)))
    assert r.json() == {"cards": []}


def test_lumbar_imaging_for_other_reason_is_no_criteria_apply(client: ValidatingClient) -> None:
    r = client.post(SELECT, json=hook_request(order(cpt="72148", reason="N20.0"),
                                              prefetch=seed_prefetch(FIXTURE_NOW)))
    data = r.json()
    assert data["cards"] == []
    assert rating_of(data["systemActions"][0]) == "no-criteria-apply"


# ------------------------------------------------------------------ errors


def test_malformed_json_is_400_operation_outcome(client: ValidatingClient) -> None:
    r = client.post(SELECT, content=b'{"hook": "order-select",',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "malformed JSON" in issue_text(r)


def test_body_not_an_object(client: ValidatingClient) -> None:
    r = client.post(SELECT, json=[1, 2])
    assert r.status_code == 400 and "JSON object" in issue_text(r)


def test_empty_body(client: ValidatingClient) -> None:
    r = client.post(SELECT, content=b"")
    assert r.status_code == 400 and "empty" in issue_text(r)


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda b: b.pop("hookInstance"), "hookInstance"),
    (lambda b: b["context"].pop("patientId"), "context.patientId"),
    (lambda b: b["context"].pop("draftOrders"), "context.draftOrders"),
    (lambda b: b["context"].update(draftOrders="not a bundle"), "context.draftOrders"),
    (lambda b: b["context"].update(draftOrders={"resourceType": "Patient"}),
     "context.draftOrders.resourceType"),
    (lambda b: b["context"].update(selections="ServiceRequest/x"), "context.selections"),
    (lambda b: b.update(context=None), "context"),
    (lambda b: b.update(fhirAuthorization={"access_token": "t", "token_type": "Bearer"}),
     "fhirServer"),
])
def test_wrong_shape_names_the_field(client: ValidatingClient, mutate: Any, field: str) -> None:
    body = hook_request(order())
    mutate(body)
    r = client.post(SELECT, json=body)
    assert r.status_code == 400
    assert field in issue_text(r)


def test_hook_not_served_by_this_service(client: ValidatingClient) -> None:
    body = hook_request(order())
    body["hook"] = "patient-view"
    r = client.post(SELECT, json=body)
    assert r.status_code == 400
    assert "patient-view" in issue_text(r) and "hook" in issue_text(r)


def test_order_sign_sent_to_order_select_service(client: ValidatingClient) -> None:
    body = hook_request(order(), hook="order-sign")
    r = client.post(SELECT, json=body)
    assert r.status_code == 400 and "order-sign" in issue_text(r)


def test_unknown_service_is_404(client: ValidatingClient) -> None:
    r = client.post("/cds-services/nope", json=hook_request(order()))
    assert r.status_code == 404 and "nope" in issue_text(r)
    r = client.post("/cds-services/nope/feedback", json={"feedback": []})
    assert r.status_code == 404


def test_wrong_method_is_405_operation_outcome(client: ValidatingClient) -> None:
    r = client.get(SELECT)
    assert r.status_code == 405
    assert r.json()["resourceType"] == "OperationOutcome"


def test_body_over_limit_is_413() -> None:
    app = create_app(dev_settings(max_body_bytes=2000), clock=lambda: FIXTURE_NOW)
    with ValidatingClient(app) as c:
        body = hook_request(order(), prefetch=seed_prefetch(FIXTURE_NOW))
        body["padding"] = "x" * 5000
        r = c.post(SELECT, json=body)
        assert r.status_code == 413
        assert "larger than 2000 bytes" in issue_text(r)

        def chunks() -> Any:  # no content-length: counted while streaming
            for _ in range(10):
                yield b"x" * 500

        r = c.post(SELECT, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_no_stack_trace_on_bad_input(client: ValidatingClient) -> None:
    weird = hook_request(order())
    weird["context"]["draftOrders"]["entry"] = [
        {"resource": {"resourceType": "ServiceRequest", "id": "x", "code": "not-an-object"}},
        {"resource": {"resourceType": "ServiceRequest", "id": "y", "code": {"coding": "bad"}}},
        {"resource": {"resourceType": "ServiceRequest", "id": "z",
                      "code": {"coding": [{"system": 5, "code": ["72148"]}]}}},
        "not an entry", {"resource": "string"}, {"fullUrl": "no resource"},
    ]
    weird["context"]["selections"] = ["ServiceRequest/x", "ServiceRequest/y", "ServiceRequest/z",
                                      "garbage", ""]
    r = client.post(SELECT, json=weird)
    assert r.status_code == 200 and r.json() == {"cards": []}


def test_garbage_prefetch_values_do_not_fail(client: ValidatingClient) -> None:
    prefetch: dict[str, Any] = {
        "patient": "a string", "conditions": [1, 2],
        "procedures": {"resourceType": "Bundle", "entry": "oops"},
        "servicerequests": {"resourceType": "Bundle", "entry": [{"resource": 3}]},
    }
    r = client.post(SELECT, json=hook_request(order(cpt="72149"), prefetch=prefetch))
    assert r.status_code == 200
    assert rating_of(r.json()["systemActions"][0]) == "not-appropriate"


def test_invalid_evidence_resource_makes_fact_unknown(client: ValidatingClient) -> None:
    prefetch = seed_prefetch(FIXTURE_NOW)
    broken = copy.deepcopy(prefetch["procedures"]["entry"][0]["resource"])
    broken["status"] = "completed"
    broken["performedDateTime"] = "not a date"
    prefetch["procedures"] = bundle(broken)
    r = client.post(SELECT, json=hook_request(order(cpt="72148"), prefetch=prefetch))
    data = r.json()
    assert "systemActions" not in data  # undecidable, not silently "no therapy"
    assert [c["indicator"] for c in data["cards"]] == ["info"]
    assert "Cannot rate" in data["cards"][0]["summary"]


# ------------------------------------------------------------------ feedback


def test_feedback_accepted_and_overridden(client: ValidatingClient) -> None:
    items = [
        {"card": "c1", "outcome": "accepted", "acceptedSuggestions": [{"id": "s1"}],
         "outcomeTimestamp": "2026-11-23T22:56:36.469Z"},
        {"card": "c2", "outcome": "overridden",
         "overrideReason": {"reason": {"code": "x", "system": "urn:x"}, "userComment": "ok"},
         "outcomeTimestamp": "2026-11-23T22:56:36Z"},
    ]
    r = client.post(SELECT + "/feedback", json={"feedback": items})
    assert r.status_code == 200 and r.json()["received"] == 2


@pytest.mark.parametrize(("item", "field"), [
    ({"outcome": "accepted", "acceptedSuggestions": [{"id": "s"}],
      "outcomeTimestamp": "2026-01-01T00:00:00Z"}, "feedback.0.card"),
    ({"card": "c", "outcome": "maybe", "outcomeTimestamp": "2026-01-01T00:00:00Z"},
     "feedback.0.outcome"),
    ({"card": "c", "outcome": "accepted", "outcomeTimestamp": "2026-01-01T00:00:00Z"},
     "acceptedSuggestions"),
    ({"card": "c", "outcome": "overridden"}, "feedback.0.outcomeTimestamp"),
    ({"card": "c", "outcome": "overridden", "outcomeTimestamp": "yesterday"},
     "feedback.0.outcomeTimestamp"),
])
def test_feedback_validation(client: ValidatingClient, item: dict[str, Any], field: str) -> None:
    r = client.post(SIGN + "/feedback", json={"feedback": [item]})
    assert r.status_code == 400
    assert field in issue_text(r)


def test_feedback_empty_list_is_rejected(client: ValidatingClient) -> None:
    r = client.post(SIGN + "/feedback", json={"feedback": []})
    assert r.status_code == 400 and "feedback" in issue_text(r)


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_two_draft_orders_with_one_id_are_400(client: ValidatingClient, hook: str) -> None:
    # two contradictory rating updates of one ServiceRequest would follow
    body = hook_request(order("dup", cpt="72149"), order("dup", cpt="72148"), hook=hook,
                        prefetch=seed_prefetch(FIXTURE_NOW))
    r = client.post(SIGN if hook == "order-sign" else SELECT, json=body)
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/fhir+json")
    issues = r.json()["issue"]
    assert [i["expression"] for i in issues] == [["context.draftOrders"]]
    assert "ServiceRequest/dup" in issues[0]["diagnostics"]


def test_one_id_in_two_resource_types_is_two_orders(client: ValidatingClient) -> None:
    other = {"resourceType": "MedicationRequest", "id": "draft-1", "status": "draft",
             "intent": "order", "subject": {"reference": "Patient/x"}}
    body = hook_request(order(), other, prefetch=seed_prefetch(FIXTURE_NOW))
    assert client.post(SELECT, json=body).status_code == 200
