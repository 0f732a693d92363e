"""Schemathesis against the served OpenAPI document, request bodies included: no 5xx.

Bounded: a fixed number of generated cases per operation (CDS_SCHEMATHESIS_EXAMPLES, default
40), positive and negative, against the real application (ASGI, with its database).
"""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from cds_service.app import create_app
from tests.conftest import FIXTURE_NOW, dev_settings

ADMIN = "admin-token-for-schemathesis"
APP = create_app(dev_settings(admin_token=ADMIN), clock=lambda: FIXTURE_NOW)
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
# No 5xx; every answer is one the document declares, in its declared type and shape; and a
# request the document allows is taken (the document says what the service checks).
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, positive_data_acceptance]
EXAMPLES = int(os.environ.get("CDS_SCHEMATHESIS_EXAMPLES", "40"))


@SCHEMA.parametrize()
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_error_for_any_documented_request(case: schemathesis.Case) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}"} if case.path == "/admin/report" else None
    case.call_and_validate(headers=headers, checks=CHECKS)
