"""Patient record -> clinical facts, each yes / no / unknown with the evidence behind it.

The facts are declared once in :mod:`cds_service.clinical.registry`; the record is scanned once by
:mod:`cds_service.clinical.scan`; each fact is read by a small rule of
:mod:`cds_service.clinical.rules`. This module puts them together for one draft order.

Where facts come from: the order's own reasons first (they are the indication the clinician chose),
then the problem list, procedures, orders and medication orders. Resources are first screened with a
cheap code lookup; only the few that match a value set are validated with the FHIR R4B models.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from cds_service.clinical.model import ClinicalParams, Evidence, Fact, Facts, Tri
from cds_service.clinical.registry import CODED_FACTS, CONTRAST_FACTS, VALUESETS_READ
from cds_service.clinical.rules import (
    candidate_fact,
    care_fact,
    child_fact,
    coded_fact,
    device_scanned,
    duration_fact,
    elderly_fact,
    indication_fact,
    prior_surgery_fact,
    recent_mri_fact,
    rule_context,
    surgery_planned,
    unreadable_entries,
)
from cds_service.clinical.scan import DraftScan, RecordScan, scan_drafts, scan_record, str_field
from cds_service.knowledge import Knowledge

URGENT = {"stat", "asap", "urgent"}

__all__ = ["VALUESETS_READ", "ClinicalParams", "DraftScan", "Evidence", "Fact", "Facts",
           "RecordScan", "Tri", "derive_facts", "scan_drafts", "scan_record"]


def derive_facts(scan: RecordScan, order: Mapping[str, Any],
                 drafts: list[Mapping[str, Any]] | DraftScan, knowledge: Knowledge,
                 now: datetime, params: ClinicalParams | None = None,
                 lumbar: bool = True) -> Facts:
    """All facts for one draft order (order reasons count as current findings).

    ``drafts``: the request's draft orders, or their :func:`scan_drafts` (screened once when
    many orders are evaluated).
    """
    params = params or ClinicalParams()
    if not isinstance(drafts, DraftScan):
        drafts = scan_drafts(drafts, knowledge)
    ctx = rule_context(scan, order, drafts, knowledge, now, params)
    # Facts by the registry's names (Any: mypy cannot see that each name is a Fact field)
    found: dict[str, Any] = {row.name: coded_fact(row, ctx) for row in CODED_FACTS}
    found["indication"], other_indication = indication_fact(ctx, lumbar)
    found["duration"], categories, dated, assumptions = duration_fact(ctx)
    candidate = found["intervention_candidate"] = candidate_fact(ctx)
    found["conservative_care"], care_weeks, care_states, open_end = care_fact(ctx, candidate)
    if open_end is not None:  # the weeks run up to today on an order with no end: said so
        code, date, first, last, count = open_end
        assumptions.append((code, {"date": date, "first": first, "last": last, "count": count}))
    assumed = (candidate.value is not Tri.YES and params.assume_candidate_after_failed_care
               and "done" in care_states)
    if assumed:
        assumptions.append(("candidate-after-failed-care",
                            {"weeks": int(care_weeks or params.conservative_care_weeks)}))
    found["elderly"], age = elderly_fact(ctx)
    found["child"] = child_fact(ctx, age)
    found["prior_surgery"] = prior_surgery_fact(ctx)
    found["recent_mri"] = recent_mri_fact(ctx)
    return Facts(
        **found, duration_categories=categories, duration_dated=dated, care_weeks=care_weeks,
        care_states=care_states, candidate_assumed=assumed, age=age,
        other_indication=other_indication,
        urgent=(str_field(order, "priority") or "").lower() in URGENT,
        assumptions=assumptions, assume_candidate=params.assume_candidate_after_failed_care,
        # (what is unreadable is said for the facts that decide; a contrast risk only avoids)
        unreadable=unreadable_entries(
            ctx, [f for name, f in found.items() if name not in CONTRAST_FACTS]),
        surgery_planned=surgery_planned(ctx),
        device_scanned=device_scanned(ctx, found["mri_safety"]))
