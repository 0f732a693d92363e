"""The served OpenAPI document: the real request and response bodies of every endpoint.

The routes read their bodies themselves (to answer every fault with an OperationOutcome), so
FastAPI cannot infer them; this module describes them from the same pydantic models the routes
validate with: HookRequest and Feedback in, ServiceResponse, Discovery and OperationOutcome out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from cds_service.codesystems import ACR_CATEGORY, OVERRIDE_REASON, PATH
from cds_service.protocol import Discovery, Feedback, HookRequest, ServiceResponse
from cds_service.questionnaire import QUESTIONNAIRE_PATH
from cds_service.store.values import column_length

JSON = "application/json"
FHIR_JSON = "application/fhir+json"


class OperationOutcomeIssue(BaseModel):
    severity: Literal["fatal", "error", "warning", "information"]
    code: str
    diagnostics: str | None = None
    expression: list[str] | None = None


class OperationOutcome(BaseModel):
    """The FHIR OperationOutcome every error answer carries."""

    resourceType: Literal["OperationOutcome"]
    issue: list[OperationOutcomeIssue]


class FeedbackReceived(BaseModel):
    """What a feedback post stored."""

    model_config = {"extra": "allow"}

    received: int


class Status(BaseModel):
    model_config = {"extra": "allow"}

    status: str


MODELS: tuple[tuple[type[BaseModel], Literal["validation", "serialization"]], ...] = (
    (HookRequest, "validation"), (Feedback, "validation"), (ServiceResponse, "serialization"),
    (Discovery, "serialization"), (OperationOutcome, "serialization"),
    (FeedbackReceived, "serialization"), (Status, "serialization"))
ERRORS = {
    "400": "The body or a parameter is malformed; the OperationOutcome names the field",
    "401": "A JWT is required and was missing or invalid",
    "404": "Unknown service or endpoint",
    "408": "The request body did not arrive in time",
    "412": "Data needed to rate the order is missing and could not be fetched",
    "413": "The body, or what it asks of the service, is over a limit",
    "503": "A dependency (the database) is unavailable; retry after Retry-After",
}


# A real request, for readers of the document and for generated tests to start from.
HOOK_EXAMPLE: dict[str, Any] = {
    "hook": "order-select", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
    "context": {
        "userId": "Practitioner/example", "patientId": "example",
        "selections": ["ServiceRequest/order-1"],
        "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {
            "resourceType": "ServiceRequest", "id": "order-1", "status": "draft",
            "intent": "order", "subject": {"reference": "Patient/example"},
            "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "72149"}]},
            "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                        "code": "M54.16"}]}]}}]}},
    "prefetch": {
        "patient": {"resourceType": "Patient", "id": "example", "birthDate": "1968-03-02"},
        "conditions": {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {
            "resourceType": "Condition", "id": "lbp", "subject": {"reference": "Patient/example"},
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active"}]},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                 "code": "M54.16"}]},
            "onsetDateTime": "2026-07-12"}}]},
        "procedures": {"resourceType": "Bundle", "type": "searchset", "entry": []},
        "servicerequests": {"resourceType": "Bundle", "type": "searchset", "entry": []},
        "medications": {"resourceType": "Bundle", "type": "searchset", "entry": []}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: {"description": ERRORS[code],
                   "content": {FHIR_JSON: {"schema": _ref("OperationOutcome")}}}
            for code in codes}


def _ok(model: str, description: str, media: str = JSON) -> dict[str, Any]:
    return {"200": {"description": description, "content": {media: {"schema": _ref(model)}}}}


NO_NUL = r"^[^\x00]*$"  # a stored text: refused with 400 when it holds NUL
# an instant any database stores in UTC: not within a day of year 1 or year 9999's end
STORABLE_INSTANT = r"^(?!0001-01-01|9999-12-31)"


def _say_what_is_checked(schemas: dict[str, Any], settings: Any) -> None:
    """What the routes check beyond the models' fields, in the schemas (so that a body the
    document allows is one the service takes): the hook a service serves is set per path."""
    hook = schemas["HookRequest"]
    hook["properties"]["hook"]["enum"] = ["order-select", "order-sign"]
    hook["anyOf"] = [  # fhirAuthorization only with a fhirServer to use it on
        {"not": {"required": ["fhirAuthorization"]}},
        {"properties": {"fhirAuthorization": {"type": "null"}}},
        {"required": ["fhirServer"],
         "properties": {"fhirServer": {"type": "string", "minLength": 1}}}]
    entry = schemas["DraftOrders"]["properties"]["entry"]
    entry["maxItems"] = settings.max_draft_orders
    entry["uniqueItems"] = True  # and more: no two entries' resources share type and id
    entry["description"] = ("The draft orders; no two of the same resourceType and id (two "
                            "contradictory ratings of one order would follow): 400")
    schemas["Feedback"]["properties"]["feedback"]["maxItems"] = settings.feedback_max_items
    item = schemas["FeedbackItem"]
    item["anyOf"] = [  # accepted: with the suggestions accepted
        {"properties": {"outcome": {"const": "overridden"}}},
        {"required": ["acceptedSuggestions"],
         "properties": {"acceptedSuggestions": {"type": "array", "minItems": 1}}}]
    item["properties"]["outcomeTimestamp"]["pattern"] = STORABLE_INSTANT
    for name, field in (("FeedbackItem", "card"), ("AcceptedSuggestion", "id"),
                        ("FeedbackCoding", "system"), ("FeedbackCoding", "code"),
                        ("FeedbackCoding", "display"), ("OverrideReason", "userComment")):
        _text(schemas[name]["properties"][field])["pattern"] = NO_NUL


def _text(schema: dict[str, Any]) -> dict[str, Any]:
    """The string schema of a field (itself, or its string branch when it may be null)."""
    return next((s for s in schema.get("anyOf", []) if s.get("type") == "string"), schema)


def _hook_paths(paths: dict[str, Any], schemas: dict[str, Any],
                services: dict[str, str], responses: dict[str, Any]) -> None:
    """One path per service: the body names the hook that service serves (another is 400)."""
    template = paths.pop("/cds-services/{service_id}", {}).get("post", {})
    for service_id, hook in sorted(services.items()):
        name = "".join(part.capitalize() for part in hook.split("-")) + "Request"
        schemas[name] = {"allOf": [_ref("HookRequest"),
                                   {"properties": {"hook": {"const": hook}}}],
                         "title": f"HookRequest ({hook})"}
        example = {**HOOK_EXAMPLE, "hook": hook}
        paths[f"/cds-services/{service_id}"] = {"post": {
            **template, "summary": f"Rate the imaging orders of an {hook} hook call",
            "operationId": f"hook-{service_id}",
            "requestBody": {"required": True, "content": {JSON: {
                "schema": _ref(name), "examples": {hook: {"value": example}}}}},
            "responses": responses}}


def build_openapi(app: FastAPI, service_ids: Iterable[str],
                  hooks: dict[str, str] | None = None) -> dict[str, Any]:
    """The document: FastAPI's paths, with bodies and answers described from the models.
    ``hooks`` (service id -> the hook it serves) gives each service its own path."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description=__doc__.splitlines()[0] if __doc__ else None)
    schemas: dict[str, Any] = {}
    for model, mode in MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    _say_what_is_checked(schemas, app.state.services.settings)
    doc["components"] = {"schemas": schemas}
    paths = doc["paths"]
    ids = sorted(service_ids)
    service_param = {"name": "service_id", "in": "path", "required": True,
                     "schema": {"type": "string", "enum": ids}}
    body = {"required": True}
    auth = ("401",)
    # (plain routes, not in FastAPI's document: described here in full)
    hook = paths.setdefault("/cds-services/{service_id}", {}).setdefault("post", {})
    hook.update(summary="Rate the imaging orders of a hook call", operationId="hook",
                parameters=[service_param],
                requestBody={**body, "content": {JSON: {
                    "schema": _ref("HookRequest"),
                    "examples": {"order-select": {"value": HOOK_EXAMPLE}}}}},
                responses={**_ok("ServiceResponse", "Cards and PAMA system actions"),
                           **_errors("400", *auth, "404", "408", "412", "413", "503")})
    if hooks:
        _hook_paths(paths, schemas, hooks, hook["responses"])
    feedback = paths.setdefault("/cds-services/{service_id}/feedback", {}).setdefault("post", {})
    feedback.update(summary="Feedback on the cards (accepted, overridden)",
                    operationId="feedback", parameters=[service_param],
                    requestBody={**body, "content": {JSON: {"schema": _ref("Feedback")}}},
                    responses={**_ok("FeedbackReceived", "Feedback stored (idempotent)"),
                               **_errors("400", *auth, "404", "408", "413", "503")})
    paths["/cds-services"]["get"]["responses"] = {
        **_ok("Discovery", "The CDS services"), **_errors(*auth, "503")}
    paths["/healthz"]["get"]["responses"] = _ok("Status", "The process answers")
    paths["/readyz"]["get"]["responses"] = {
        **_ok("Status", "Ready to serve"),
        "503": {"description": "Not ready (database unreachable or read-only)",
                "content": {JSON: {"schema": _ref("Status")}}}}
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"] = {
            "200": {"description": "Prometheus metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors("401", "404")}
    systems = [f"{PATH}/{cs_id}" for cs_id in (ACR_CATEGORY, OVERRIDE_REASON)]
    one = paths[f"{PATH}/{{cs_id}}"]["get"]
    one["parameters"] = [{"name": "cs_id", "in": "path", "required": True,
                          "schema": {"type": "string"},
                          "examples": {"category": {"value": ACR_CATEGORY},
                                       "override": {"value": OVERRIDE_REASON}}}]
    one["responses"] = {
        "200": {"description": f"A FHIR R4 CodeSystem ({', '.join(systems)})",
                "content": {FHIR_JSON: {"schema": {"type": "object"}}}},
        **_errors("404")}
    paths[PATH]["get"]["responses"] = {
        "200": {"description": "A searchset Bundle of the service's CodeSystems (url= filters)",
                "content": {FHIR_JSON: {"schema": {"type": "object"}}}}}
    paths[f"{QUESTIONNAIRE_PATH}/{{q_id}}"]["get"]["responses"] = {
        "200": {"description": "The FHIR R4 Questionnaire lbp-imaging-auc",
                "content": {FHIR_JSON: {"schema": {"type": "object"}}}},
        **_errors("404")}
    paths[QUESTIONNAIRE_PATH]["get"]["responses"] = {
        "200": {"description": "A searchset Bundle holding the Questionnaire whose canonical "
                               "url (with or without |version) is url=",
                "content": {FHIR_JSON: {"schema": {"type": "object"}}}}}
    report = paths["/admin/report"]["get"]
    limit = column_length("service_id", "card")
    for param in report.get("parameters", []):  # ISO dates; a service id as stored
        param["schema"] = ({"type": "string", "format": "date"} if param["name"] != "service"
                           else {"type": "string", "maxLength": limit, "pattern": NO_NUL})
    report["responses"] = {
        "200": {"description": "The feedback report (JSON with Accept: application/json)",
                "content": {JSON: {"schema": {"type": "object"}},
                            "text/html": {"schema": {"type": "string"}}}},
        **_errors("400", "401", "404", "503")}
    return doc
