"""The service's own FHIR resources, public like a terminology server: its CodeSystems at their
canonical URLs (and a search by url) and the Questionnaire of the questions that decide a
rating."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from cds_service.api.deps import get_services
from cds_service.codesystems import search_bundle
from cds_service.errors import ProtocolError
from cds_service.questionnaire import QUESTIONNAIRE_PATH


def fhir_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/fhir+json")


async def code_system(cs_id: str, request: Request) -> Response:
    """One of the service's code systems, at its canonical URL (public, like a terminology)."""
    found = get_services(request).engine.code_systems.get(cs_id)
    if found is None:
        raise ProtocolError(404, "not-found", f"no CodeSystem '{cs_id}' here", ["id"])
    return fhir_response(found)


async def questionnaire(q_id: str, request: Request) -> Response:
    """The Questionnaire of the questions that decide a rating (what the SMART app asks)."""
    found = get_services(request).engine.questionnaire
    if q_id != found["id"]:
        raise ProtocolError(404, "not-found", f"no Questionnaire '{q_id}' here", ["id"])
    return fhir_response(found)


async def code_system_search(request: Request, url: str | None = None) -> Response:
    s = get_services(request)
    return fhir_response(search_bundle(s.engine.code_systems, s.settings.canonical_root, url))


async def questionnaire_search(request: Request, url: str | None = None) -> Response:
    """``GET /fhir/Questionnaire?url=<canonical>[|<version>]``: a searchset Bundle (how EHR
    form renderers look a questionnaire up by its canonical URL); all of them without ``url``."""
    s = get_services(request)
    found = s.engine.questionnaire
    canonical, _, version = (url or "").partition("|")
    match = url is None or (canonical == found["url"]
                            and (not version or version == found["version"]))
    entries = [{"fullUrl": f"{s.settings.canonical_root.rstrip('/')}{QUESTIONNAIRE_PATH}/"
                           f"{found['id']}", "resource": found,
                "search": {"mode": "match"}}] if match else []
    return fhir_response({"resourceType": "Bundle", "type": "searchset",
                          "total": len(entries), "entry": entries})
