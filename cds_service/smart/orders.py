"""The patient's lumbar imaging orders, for a launch that names none (an EHR's menu); and the
order re-rated with the clinician's answers, for the EHR that listens (SMART Web Messaging)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from cds_service.answer.payloads import indication_reasons
from cds_service.answer.rating import order_codings
from cds_service.engine import Engine, Rated
from cds_service.knowledge.index import Knowledge
from cds_service.smart.oauth import FHIR_ID, Grant
from cds_service.smart.outbound import Outbound
from cds_service.smart.problems import ehr_down
from cds_service.smart.rating import REFUSED, belongs_to, empty_record, no_access

OPEN_STATUSES = ("draft", "active")  # an order still to be done (or still being written)
MAX_OFFERED = 20


@dataclass(frozen=True)
class OrderChoice:
    id: str
    study: str
    status: str
    authored: str | None


async def lumbar_orders(out: Outbound, iss: str, grant: Grant,
                        knowledge: Knowledge) -> list[OrderChoice]:
    """The patient's draft or active orders of a study the service rates (one search)."""
    record = empty_record(grant.patient)
    report = await out.fhir.complete(record, iss, grant.access_token, keys=["servicerequests"])
    outcome = report.outcomes.get("servicerequests", "fetched")
    if outcome in REFUSED:
        raise no_access()
    if outcome not in ("fetched", "page-cap"):
        raise ehr_down("Reading the patient's orders", outcome)
    found = []
    for order in record.service_requests.resources:
        rid, status = order.get("id"), order.get("status")
        procedure = knowledge.procedure_of(order_codings(order))
        if (procedure is None or procedure.region != "lumbar" or status not in OPEN_STATUSES
                or not isinstance(rid, str) or not FHIR_ID.fullmatch(rid)
                or not belongs_to(order, grant.patient)):
            continue
        authored = order.get("authoredOn")
        found.append(OrderChoice(rid, procedure.name, status,
                                 authored[:10] if isinstance(authored, str) else None))
    found.sort(key=lambda c: c.authored or "", reverse=True)  # the latest first
    return found[:MAX_OFFERED]


def rerated_order(engine: Engine, rated: Rated) -> dict[str, Any]:
    """The order carrying its rating (the PAMA rating extension), its study named in
    ``code.coding[0].display`` and its reasons (the record's indication when it has none)."""
    d = rated.decision
    assert d.pama is not None
    order = engine.payloads.with_rating(copy.deepcopy(rated.order), d.pama, d.category)
    codings = order_codings(order)
    if codings and not codings[0].get("display"):
        codings[0]["display"] = rated.procedure.name
    if not order.get("reasonCode"):
        order["reasonCode"] = indication_reasons(rated.facts)
    return order
