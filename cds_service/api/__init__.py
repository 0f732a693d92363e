"""The HTTP layer: one module per job, and here the table of its routes.

    hooks      discovery and the hook call (parse -> record -> rate -> answer)
    feedback   feedback on the cards
    ops        healthz, readyz, metrics
    admin      the feedback report
    fhir       the service's CodeSystems and Questionnaire
    deps       what the routes share (services, authentication, the JSON body)

``middleware`` (the outer layer: body limit, page headers, request counts, and the hot routes
served without the framework's inner stack) and ``error_handlers`` (every error an
OperationOutcome) are installed by :func:`cds_service.app.create_app`.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.routing import Route

from cds_service.api import admin, feedback, fhir, hooks, ops
from cds_service.codesystems import PATH
from cds_service.questionnaire import QUESTIONNAIRE_PATH

# The hook call and its feedback: nearly all traffic is theirs. The outer layer
# (middleware.Edge) matches a POST against them and serves it itself, without the framework's
# inner layers; they are also first on the application's router (the 405 for other methods,
# url_for) and read their own bodies (no parameters for FastAPI to solve on each call).
# openapi.py describes them.
HOT_ROUTES = [
    Route("/cds-services/{service_id}", hooks.hook, methods=["POST"], name="hook"),
    Route("/cds-services/{service_id}/feedback", feedback.feedback, methods=["POST"],
          name="feedback"),
]
router = APIRouter()
# The other endpoints, in the order they are matched and listed in /openapi.json.
for path, endpoint in (("/healthz", ops.healthz),
                       ("/cds-services", hooks.discovery),
                       ("/readyz", ops.readyz),
                       ("/metrics", ops.metrics_endpoint),
                       ("/admin/report", admin.report),
                       (f"{PATH}/{{cs_id}}", fhir.code_system),
                       (f"{QUESTIONNAIRE_PATH}/{{q_id}}", fhir.questionnaire),
                       (QUESTIONNAIRE_PATH, fhir.questionnaire_search),
                       (PATH, fhir.code_system_search)):
    router.add_api_route(path, endpoint, methods=["GET"])
