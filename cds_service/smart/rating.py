"""What the app reads from the EHR and how it rates: the order and the patient's record (read
with the app's token), the same engine as the hooks, and the record's answers to pre-fill."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cds_service.clinical.facts import Facts, Tri
from cds_service.engine import PAMA_DISPLAY, Engine, Rated
from cds_service.knowledge.index import Knowledge, Procedure
from cds_service.questionnaire import Question
from cds_service.record.prefetch import SOURCE_ATTRS, PatientRecord, Source, SourceState
from cds_service.smart.context import AppContext
from cds_service.smart.oauth import Grant
from cds_service.smart.outbound import Outbound
from cds_service.smart.problems import Problem, ehr_down

REFUSED = {"http-401", "http-403"}
# What the page calls each source of the record (a source that could not be read is named)
SOURCE_NAMES = {"patient": "demographics (age, sex)", "conditions": "problem list",
                "procedures": "procedures", "servicerequests": "orders and referrals",
                "medications": "medication orders", "questionnaireresponses": "answers saved "
                "earlier", "allergies": "allergies"}
UNREAD = {"http-500": "the server failed", "timeout": "no answer in time",
          "connection-error": "no connection", "http-404": "not found",
          "retry-failed": "the server failed twice", "budget-exhausted": "no answer in time",
          "http-403": "not granted to the app", "http-401": "not granted to the app",
          "over-budget": "more than the app reads for one page", "too-large": "too large"}


@dataclass
class Chart:
    """What one page read from the EHR: the order and the patient's record."""

    order: dict[str, Any]
    record: PatientRecord
    patient_label: str
    # the order is a draft the EHR does not serve: rated as the card's study, from the record
    draft: bool = False
    # sources of the record that could not be read: name -> why (a short phrase)
    unread: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RatingView:
    """The rating as the page shows it."""

    procedure: str
    determinate: bool
    rating: str
    category: str | None = None
    category_label: str | None = None
    scenario: str | None = None
    still_open: list[str] = field(default_factory=list)
    # why no rating can be shown (the order or the record could not be read)
    unavailable: str | None = None
    # the sources of the record that could not be read, and what that leaves open
    unread_note: str | None = None


def unavailable_view(procedure: str, why: str) -> RatingView:
    return RatingView(procedure, False, "cannot be shown", unavailable=why)


def no_access() -> Problem:
    return Problem(401, "The EHR no longer accepts the app's access",
                   "The EHR's FHIR server refused the app's access token (it may have expired).")


def empty_record(patient_id: str) -> PatientRecord:
    """A record with every source still to be fetched."""
    return PatientRecord(patient_id, **{attr: Source(SourceState.MISSING, note="not fetched")
                                        for attr in SOURCE_ATTRS.values()})


def draft_order(procedure: Procedure, patient_id: str, order_id: str) -> dict[str, Any]:
    """The card's study as a draft ServiceRequest for the patient (the EHR does not serve the
    unsigned order: its reasons are not seen, the record's findings are)."""
    return {"resourceType": "ServiceRequest", "id": order_id, "status": "draft",
            "intent": "order", "subject": {"reference": f"Patient/{patient_id}"},
            "code": {"coding": [dict(c) for c in procedure.order_codes],
                     "text": procedure.name}}


async def read_order(out: Outbound, iss: str, grant: Grant, ctx: AppContext,
                     knowledge: Knowledge) -> tuple[dict[str, Any], bool]:
    """The order of the launch, read from the EHR; or, when the EHR has no such order and the
    card named the study, that study as a draft (True: not saved yet)."""
    order = await out.fhir.read(iss, grant.access_token, "ServiceRequest", ctx.order_id)
    if isinstance(order, str) and order in REFUSED:
        raise no_access()
    if order == "http-404" or (order == "http-410"):
        procedure = knowledge.procedures.get(ctx.procedure or "")
        if procedure is not None:
            return draft_order(procedure, grant.patient, ctx.order_id), True
        raise Problem(404, "The order was not found",
                      "The EHR has no readable ServiceRequest for this order (a draft may "
                      "become readable only once it is saved).",
                      "Save the order in the EHR, then open the app again from its card.")
    if isinstance(order, str):
        raise ehr_down("Reading the order", order)
    if (not isinstance(order, dict) or order.get("resourceType") != "ServiceRequest"
            or order.get("id") != ctx.order_id):
        raise ehr_down("Reading the order", "the answer is not the ServiceRequest asked for")
    if not belongs_to(order, grant.patient):
        raise Problem(403, "The order is not this patient's",
                      "The order the card named belongs to another patient than the one the EHR "
                      "opened the app for; nothing is shown or saved.")
    return order, False


def belongs_to(order: dict[str, Any], patient_id: str) -> bool:
    subject = order.get("subject")
    reference = subject.get("reference") if isinstance(subject, dict) else None
    return isinstance(reference, str) and reference.rstrip("/").split("/")[-2:] == [
        "Patient", patient_id]  # relative or absolute


async def read_chart(out: Outbound, iss: str, grant: Grant, ctx: AppContext,
                     knowledge: Knowledge) -> Chart:
    """The order of the appContext and the patient's record, read with the app's token."""
    order, draft = await read_order(out, iss, grant, ctx, knowledge)
    record = empty_record(grant.patient)
    report = await out.fhir.complete(record, iss, grant.access_token)
    # (allergies only add: a token without their scope still rates, the allergy unknown)
    if REFUSED & {o for k, o in report.outcomes.items() if k != "allergies"}:
        raise no_access()
    unread = {SOURCE_NAMES.get(k, k): UNREAD.get(o, o) for k, o in report.outcomes.items()
              if o != "fetched" and getattr(record, SOURCE_ATTRS[k]).state
              is not SourceState.COMPLETE}
    return Chart(order, record, _patient_label(record, grant.patient), draft, unread)


def _patient_label(record: PatientRecord, patient_id: str) -> str:
    """The patient's name and birth date as the chart shows them (or the id)."""
    patient = record.patient.resources[0] if record.patient.resources else {}
    names = patient.get("name") if isinstance(patient.get("name"), list) else []
    name = names[0] if names and isinstance(names[0], dict) else {}
    text = name.get("text") or " ".join(
        [*(g for g in name.get("given") or [] if isinstance(g, str)),
         *([name["family"]] if isinstance(name.get("family"), str) else [])])
    born = patient.get("birthDate")
    label = text or f"Patient/{patient_id}"
    return f"{label}, born {born}" if isinstance(born, str) else label


def rate(engine: Engine, chart: Chart, now: datetime,
         response: dict[str, Any] | None = None) -> Rated:
    """The engine's result for the order; with ``response`` (the answers on the form as a
    QuestionnaireResponse) in place of the answers the record holds."""
    record = chart.record
    if response is not None:
        record = copy.copy(record)
        record.questionnaire_responses = Source(SourceState.COMPLETE, [response])
    result = engine.rate_order(chart.order, record, now)
    if result is None:
        raise Problem(400, "Not an order this service rates",
                      "The order is not a lumbar spine imaging study of the service's catalog.",
                      "Close this window.")
    return result


def rating_view(engine: Engine, result: Rated, chart: Chart | None = None) -> RatingView:
    d = result.decision
    name = result.procedure.name
    # only what a question settles is "still open" (the rest waits on the record)
    asked = [n for n in d.deciding if engine.questions.for_facts([n])]
    note = unread_note(engine, result, chart.unread) if chart is not None else None
    if not d.determinate or not d.pama:
        still = [engine.templates.fact_label(n) for n in asked]
        return RatingView(name, False, "not rated yet: the answers so far leave it open",
                          still_open=still, unread_note=note)
    if d.variants:
        scenario = "; ".join(f"{engine.knowledge.variants.get(v, v)} ({v})"
                             for v in sorted(d.variants))
    else:  # the record leaves several scenarios open; each gives this rating
        scenario = "more than one is possible; each gives this rating"
    return RatingView(name, True, PAMA_DISPLAY.get(d.pama, d.pama), d.category,
                      engine.templates.categories.get(d.category or "", d.category),
                      scenario, unread_note=note)


def unread_note(engine: Engine, result: Rated, unread: dict[str, str]) -> str | None:
    """Which sources of the record could not be read, and what that leaves open."""
    if not unread:
        return None
    said = "; ".join(f"{name} ({why})" for name, why in unread.items())
    d = result.decision
    if d.determinate and d.pama:
        left = "Whatever they hold, this rating stands: every possibility gives it."
    elif d.deciding:
        facts = ", ".join(engine.templates.fact_label(n).lower() for n in d.deciding)
        left = f"What they hold is unknown here, so these stay open: {facts}."
    else:
        left = "What they hold is unknown here."
    return f"Could not be read from the EHR: {said}. {left}"


def why_line(engine: Engine, result: Rated, asked: list[Question]) -> str | None:
    """One line: the finding on record that raised the questions, and what they decide."""
    if not asked:
        return None
    facts = result.facts
    evidence = [e for e in (*facts.indication.evidence, *facts.radiculopathy.evidence)
                if e.display]
    finding = evidence[0].display.lower() if evidence else "low back pain"
    settles = sorted({engine.templates.fact_short(q.fact) for q in asked})
    return (f"Why these questions: the record shows {finding}, but not "
            f"{' or '.join(settles)}; the rating of {result.procedure.name} turns on "
            f"{'it' if len(settles) == 1 else 'them'}.")


def prefill(asked: list[Question], facts: Facts) -> dict[str, str]:
    """linkId -> the answer the record gives ("yes", "no", a choice code, a number of weeks);
    questions the record leaves open are left out."""
    values: dict[str, str] = {}
    for q in asked:
        value: str | None = None
        if q.fact == "duration":
            known = facts.duration.value is Tri.YES and len(facts.duration_categories) == 1
            value = next(iter(facts.duration_categories)) if known else None
        elif q.fact == "conservative_care" and q.type == "integer":
            value = str(int(facts.care_weeks)) if facts.care_weeks is not None else None
        elif q.fact == "conservative_care":
            value = ("yes" if facts.care_weeks is not None
                     else {Tri.NO: "no"}.get(facts.conservative_care.value))
        else:
            fact = getattr(facts, q.fact, None)
            value = {Tri.YES: "yes", Tri.NO: "no"}.get(fact.value) if fact else None
        if value is not None:
            values[q.link_id] = value
    return values
