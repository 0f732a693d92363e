"""A clinician's answers (QuestionnaireResponses of the service's Questionnaire) as facts.

An answer in a completed response of this episode settles a fact the record leaves silent or
leaves unknown (a symptom code that is undated or older than the episode); it never overrides a
coded finding of the episode or a reason on the order: a coded red flag still counts when the
answer says none (the card says so), and a record that dates the pain or shows planned care keeps
its own reading (an answer that disagrees with it is shown as such; answered weeks of care are
never more than the episode has).

Only a practitioner's answers are clinician-attested: a response whose author is a Practitioner or
PractitionerRole (the service's SMART app writes the signed-in practitioner as the author). A
patient's answers (author Patient or RelatedPerson, or no author) are patient-reported: they settle
neither candidacy, care, duration, nor a red flag to "no"; a patient's "yes" to a red flag makes it
unknown (the clinician is asked), never yes and never no.
Pure: no I/O; the clock is passed in.
"""

from __future__ import annotations

import dataclasses
import re
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
REPORTED = "patient-reported"  # the role of a patient's answer: "patient-reported on DATE"
# The author of a clinician's response: a (relative or absolute) Practitioner or PractitionerRole.
PRACTITIONER = re.compile(r"(?:^|/)(?:Practitioner|PractitionerRole)/[A-Za-z0-9\-.]{1,64}"
                          r"(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
CLINICIAN_TYPES = {"Practitioner", "PractitionerRole"}
WEEK = timedelta(weeks=1)


@dataclass(frozen=True)
class Attested:
    """One answer: its value, when it was given, and the response that holds it."""

    value: Answer
    authored: datetime
    resource: str  # QuestionnaireResponse/<id>
    clinician: bool = True  # authored by a practitioner (else patient-reported)

    @property
    def day(self) -> str:
        return self.authored.date().isoformat()


def read_answers(responses: Iterable[Mapping[str, Any]], questions: Questions,
                 canonical_urls: Iterable[str], now: datetime,
                 valid_days: int) -> dict[str, Attested]:
    """linkId -> the latest answer of a completed response to our Questionnaire, given within
    ``valid_days`` (a response to another questionnaire, in progress or undated is ignored); a
    practitioner's answer is kept over a patient's whatever their order."""
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
        clinician = by_clinician(qr)
        for link_id, value in _item_answers(qr.get("item"), questions):
            earlier = found.get(link_id)
            if earlier is None or (clinician, span[0]) >= (earlier.clinician, earlier.authored):
                found[link_id] = Attested(value, span[0], resource, clinician)
    return found


def by_clinician(qr: Mapping[str, Any]) -> bool:
    """Whether a response's author is a Practitioner or PractitionerRole (a patient, a related
    person, a device or no author: patient-reported)."""
    author = qr.get("author")
    if not isinstance(author, Mapping):
        return False
    ref = author.get("reference")
    if isinstance(ref, str):
        return bool(PRACTITIONER.search(ref))
    return author.get("type") in CLINICIAN_TYPES and isinstance(author.get("identifier"), Mapping)


def _item_answers(items: Any, questions: Questions) -> Iterable[tuple[str, Answer]]:
    """(linkId, value) of every answered item we asked, nested groups included."""
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        yield from _item_answers(item.get("item"), questions)
        link = item.get("linkId")
        question = questions.by_link.get(link) if isinstance(link, str) else None
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
           params: ClinicalParams, now: datetime | None = None) -> Facts:
    """The facts with the clinician's answers applied where the record is silent (a patient's
    answers only raise a red flag to unknown)."""
    if not answers:
        return facts
    by_fact: dict[str, list[tuple[str, Attested]]] = {}
    reported: dict[str, list[tuple[str, Attested]]] = {}
    onset = _earliest_onset(facts)
    for link_id, answer in answers.items():
        if onset is not None and answer.authored < onset:
            continue  # given before this episode began
        (by_fact if answer.clinician else reported).setdefault(
            questions.by_link[link_id].fact, []).append((link_id, answer))
    changes: dict[str, Any] = {}
    for name in FINDINGS:
        for link_id, answer in reported.get(name, []):
            changes[name] = _reported(changes.get(name, getattr(facts, name)), link_id, answer)
        for link_id, answer in by_fact.get(name, []):
            changes[name] = _finding(getattr(facts, name), link_id, answer)
    changes |= _duration(facts, by_fact.get("duration", []))
    changes |= _care(facts, dict(by_fact.get("conservative_care", [])), params,
                     _episode_weeks(facts, onset, now))
    changes |= _candidate(facts, by_fact.get("intervention_candidate", []))
    conflicts = [*facts.conflicts, *changes.pop("conflicts", []), *changes.pop("capped", [])]
    updated = dataclasses.replace(facts, **changes, conflicts=conflicts)
    return _reassess_assumption(updated, params)


def _episode_weeks(facts: Facts, onset: datetime | None, now: datetime | None) -> float | None:
    """The weeks since the dated onset of this episode (None: not dated, or no clock)."""
    if onset is None or now is None or not facts.duration_dated:
        return None
    return max(0.0, (now - onset) / WEEK)


def _reported(fact: Fact, link_id: str, answer: Attested) -> Fact:
    """A patient's answer to a red-flag question: a "yes" makes a fact the record says no to
    unknown (the clinician is asked); anything else changes nothing."""
    if answer.value is not True or fact.value is not Tri.NO:
        return fact
    said = Evidence(resource=answer.resource, system="", code=link_id,
                    display=f"{REPORTED}: yes", date=answer.day,
                    role=f"{REPORTED} on {answer.day}")
    return Fact(fact.name, Tri.UNKNOWN, [said], ["patient-reported, not confirmed"])


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
    if not answered:
        return {}
    link_id, answer = answered[-1]
    if facts.duration.value is Tri.YES:  # a dated onset in the record is kept
        if str(answer.value) in facts.duration_categories:
            return {}
        return {"conflicts": [("conflict-duration", {"answered": str(answer.value),
                                                      "day": answer.day})]}
    return {"duration_categories": frozenset({str(answer.value)}),
            "duration": Fact("duration", Tri.YES,
                             [_evidence(link_id, answer, f"{answer.value} pain")])}


def _care(facts: Facts, answered: dict[str, Attested], params: ClinicalParams,
          episode_weeks: float | None = None) -> dict[str, Any]:
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
    said = float(weeks.value)
    capped: list[tuple[str, dict[str, Any]]] = []
    if episode_weeks is not None and said > episode_weeks:  # never more than the episode
        capped = [("conflict-care", {"answered": weeks.value, "day": weeks.day})]
        said = episode_weeks
    total = max(said, facts.care_weeks or 0.0)
    if facts.care_weeks is not None and facts.care_weeks >= said:
        return {"capped": capped} if capped else {}  # the record shows as much care or more
    evidence = [_evidence("conservative-care-weeks", weeks, f"{weeks.value} weeks")]
    if total >= needed:
        return {"care_weeks": total, "capped": capped,
                "conservative_care": Fact("conservative_care", Tri.YES, evidence),
                "care_states": ("done",)}
    return {"care_weeks": total, "capped": capped,
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
