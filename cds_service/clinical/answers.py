"""A clinician's answers (QuestionnaireResponses of the service's Questionnaire) as facts.

An answer in a completed response of this episode settles a fact the record leaves silent; it
never overrides a coded finding: a coded red flag still counts when the answer says none (the
card says so), and a record that dates the pain or shows planned care keeps its own reading.
Pure: no I/O; the clock is passed in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cds_service.clinical.dates import parse_span
from cds_service.clinical.model import ClinicalParams, Evidence, Fact, Facts, Tri
from cds_service.clinical.registry import FINDINGS
from cds_service.questionnaire import Answer, Questions

ANSWERED_STATUSES = {"completed", "amended"}
ATTESTED = "clinician-attested"  # the role of an answer's evidence: "clinician-attested on DATE"
DENIED = " (no)"  # ... ending so when the answer is no
CLOCK_SKEW = timedelta(minutes=5)  # an answer "from the future" by less than this still counts


@dataclass(frozen=True)
class Attested:
    """One answer: its value, when it was given, and the response that holds it."""

    value: Answer
    authored: datetime
    resource: str  # QuestionnaireResponse/<id>

    @property
    def day(self) -> str:
        return self.authored.date().isoformat()


def read_answers(responses: Iterable[Mapping[str, Any]], questions: Questions,
                 canonical_urls: Iterable[str], now: datetime,
                 valid_days: int) -> dict[str, Attested]:
    """linkId -> the latest answer of a completed response to our Questionnaire, given within
    ``valid_days`` (a response to another questionnaire, in progress or undated is ignored)."""
    urls = set(canonical_urls)
    since = now - timedelta(days=valid_days)
    found: dict[str, Attested] = {}
    for qr in responses:
        if qr.get("status") not in ANSWERED_STATUSES:
            continue
        canonical = qr.get("questionnaire")
        if not isinstance(canonical, str) or canonical.split("|", 1)[0] not in urls:
            continue
        span = parse_span(qr.get("authored"))
        if span is None or not since <= span[0] <= now + CLOCK_SKEW:
            continue
        resource = f"QuestionnaireResponse/{qr.get('id', '?')}"
        for link_id, value in _item_answers(qr.get("item"), questions):
            earlier = found.get(link_id)
            if earlier is None or span[0] >= earlier.authored:
                found[link_id] = Attested(value, span[0], resource)
    return found


def _item_answers(items: Any, questions: Questions) -> Iterable[tuple[str, Answer]]:
    """(linkId, value) of every answered item we asked, nested groups included."""
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        yield from _item_answers(item.get("item"), questions)
        question = questions.by_link.get(item.get("linkId"))  # type: ignore[arg-type]
        answers = item.get("answer")
        if question is None or not isinstance(answers, list) or not answers:
            continue
        first = answers[0] if isinstance(answers[0], dict) else {}
        value: Any = None
        if question.type == "boolean":
            value = first.get("valueBoolean")
            value = value if isinstance(value, bool) else None
        elif question.type == "integer":
            value = first.get("valueInteger")
            value = value if type(value) is int and 0 <= value <= 520 else None
        else:
            coding = first.get("valueCoding")
            code = coding.get("code") if isinstance(coding, dict) else None
            value = code if code in dict(question.answers) else None
        if value is not None:
            yield question.link_id, value


def attest(facts: Facts, answers: Mapping[str, Attested], questions: Questions,
           params: ClinicalParams) -> Facts:
    """The facts with the clinician's answers applied where the record is silent."""
    if not answers:
        return facts
    by_fact: dict[str, list[tuple[str, Attested]]] = {}
    onset = _earliest_onset(facts)
    for link_id, answer in answers.items():
        if onset is not None and answer.authored < onset:
            continue  # given before this episode began
        by_fact.setdefault(questions.by_link[link_id].fact, []).append((link_id, answer))
    changes: dict[str, Any] = {}
    for name in FINDINGS:
        for link_id, answer in by_fact.get(name, []):
            changes[name] = _finding(getattr(facts, name), link_id, answer)
    changes |= _duration(facts, by_fact.get("duration", []))
    changes |= _care(facts, dict(by_fact.get("conservative_care", [])), params)
    changes |= _candidate(facts, by_fact.get("intervention_candidate", []))
    updated = dataclasses.replace(facts, **changes)
    return _reassess_assumption(updated, params)


def is_attested(e: Evidence) -> bool:
    return e.role.startswith(ATTESTED)


def denies(e: Evidence) -> bool:
    """An answer that says no (kept as evidence of the answer, not of a finding)."""
    return is_attested(e) and e.role.endswith(DENIED)


def _evidence(link_id: str, answer: Attested, said: str) -> Evidence:
    role = f"{ATTESTED} on {answer.day}" + (DENIED if answer.value is False else "")
    return Evidence(resource=answer.resource, system="", code=link_id,
                    display=f"{ATTESTED}: {said}", date=answer.day, role=role)


def _said(value: Answer) -> str:
    return {True: "yes", False: "no"}.get(value, str(value)) if isinstance(value, bool) \
        else str(value)


def _finding(fact: Fact, link_id: str, answer: Attested) -> Fact:
    said = _evidence(link_id, answer, _said(answer.value))
    if fact.value is Tri.YES:
        if answer.value is False:  # the record's coded finding still counts: say so
            note = dataclasses.replace(
                said, display=f"{ATTESTED}: no; the coded finding still counts")
            return Fact(fact.name, Tri.YES, [*fact.evidence, note])
        return Fact(fact.name, Tri.YES, [*fact.evidence, said])
    return Fact(fact.name, Tri.YES if answer.value else Tri.NO, [said])


def _duration(facts: Facts, answered: list[tuple[str, Attested]]) -> dict[str, Any]:
    if not answered or facts.duration.value is Tri.YES:
        return {}  # a dated onset in the record is kept
    link_id, answer = answered[-1]
    return {"duration_categories": frozenset({str(answer.value)}),
            "duration": Fact("duration", Tri.YES,
                             [_evidence(link_id, answer, f"{answer.value} pain")])}


def _care(facts: Facts, answered: dict[str, Attested],
          params: ClinicalParams) -> dict[str, Any]:
    tried, weeks = answered.get("conservative-care"), answered.get("conservative-care-weeks")
    needed = params.conservative_care_weeks
    if tried is not None and tried.value is False:
        if facts.care_weeks is not None:
            return {}  # the record shows care: kept
        return {"conservative_care": Fact("conservative_care", Tri.NO,
                             [_evidence("conservative-care", tried, "no")]),
                "care_states": ("none",)}
    if weeks is None or not isinstance(weeks.value, int):
        return {}
    total = max(float(weeks.value), facts.care_weeks or 0.0)
    if facts.care_weeks is not None and facts.care_weeks >= weeks.value:
        return {}  # the record shows as much care or more: kept
    evidence = [_evidence("conservative-care-weeks", weeks, f"{weeks.value} weeks")]
    if total >= needed:
        return {"care_weeks": total,
                "conservative_care": Fact("conservative_care", Tri.YES, evidence),
                "care_states": ("done",)}
    return {"care_weeks": total,
            "conservative_care": Fact("conservative_care", Tri.NO, evidence),
            "care_states": ("under-way",)}


def _candidate(facts: Facts, answered: list[tuple[str, Attested]]) -> dict[str, Any]:
    if not answered or facts.intervention_candidate.value is Tri.YES:
        return {}  # a planned intervention on record is kept
    link_id, answer = answered[-1]
    value = Tri.YES if answer.value else Tri.NO
    return {"intervention_candidate": Fact("intervention_candidate", value,
                                       [_evidence(link_id, answer, _said(answer.value))]),
            "candidate_assumed": False}


def _reassess_assumption(facts: Facts, params: ClinicalParams) -> Facts:
    """Candidacy is assumed after failed care only while nobody has said otherwise."""
    answered = any(is_attested(e) for e in facts.intervention_candidate.evidence)
    assumed = (not answered and facts.intervention_candidate.value is not Tri.YES
               and params.assume_candidate_after_failed_care and "done" in facts.care_states)
    assumptions = [a for a in facts.assumptions if a[0] != "candidate-after-failed-care"]
    if assumed:
        assumptions.append(("candidate-after-failed-care",
                            {"weeks": int(facts.care_weeks or params.conservative_care_weeks)}))
    return dataclasses.replace(facts, candidate_assumed=assumed, assumptions=assumptions)


def _earliest_onset(facts: Facts) -> datetime | None:
    """The dated onset of this episode (answers given before it belong to another)."""
    days = [e.date for e in facts.duration.evidence if e.date and not is_attested(e)]
    spans = [parse_span(d) for d in days]
    starts = [s[0] for s in spans if s]
    return min(starts) if starts else None
