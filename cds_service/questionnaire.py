"""The questions that decide a rating, as data (``knowledge/questions.yaml``), and what is built
from them: the FHIR R4 Questionnaire the service publishes, the QuestionnaireResponse the SMART
app writes, and the answers the engine reads back from a response.

One source: the Questionnaire, the app's form and the engine's reading of answers all come from
the same list of questions, keyed by linkId.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cds_service.clinical.registry import RED_FLAGS
from cds_service.codesystems import PATH as CODESYSTEM_PATH
from cds_service.codesystems import code_system
from cds_service.knowledge import KNOWLEDGE_DIR, KnowledgeError
from cds_service.knowledge.checks import (
    QUESTION_ANSWERS,
    QUESTION_ENABLE,
    QUESTION_LINK_ID,
    fix_for,
)
from cds_service.knowledge.models import Question as QuestionEntry
from cds_service.knowledge.models import QuestionsFile
from cds_service.knowledge.vocabulary import QUESTION_FACTS, QUESTION_TYPES
from cds_service.knowledge.yaml import entry_name, read_model

if TYPE_CHECKING:
    from cds_service.clinical.model import Facts

QUESTIONNAIRE_PATH = "/fhir/Questionnaire"
MAX_ASKED = 4  # questions behind a card's link at most: those that decide the rating
# Why a fact is unknown, when it is the EHR's gap and never the clinician's task: a source of the
# record not sent or not whole (its prefetch key, or the record layer's note on it).
RECORD_SOURCES = frozenset({"patient", "conditions", "procedures", "servicerequests",
                            "medications", "allergies", "questionnaireresponses", "missing"})
RECORD_NOTES = ("not prefetched", "patient not provided", "not a FHIR resource",
                "the EHR reported an error", "resource of another patient",
                "unexpected resource type", "bad page", "more pages not read",
                "next link not followed", "page cap reached")


def is_ehr_gap(note: str) -> bool:
    """A fact's missing note that is an integration fault (a source not sent or not read)."""
    return note in RECORD_SOURCES or note.startswith(RECORD_NOTES)


# Red flags are asked first; prior lumbar surgery and age set the scenario (not red flags).
ASKED_FIRST = tuple(n for n in RED_FLAGS if n not in ("prior_surgery", "elderly"))
TYPES = set(QUESTION_TYPES)
# The facts a question may settle (the registry's names)
FACTS = set(QUESTION_FACTS)

Answer = bool | int | str  # boolean, integer, or the code of a choice


@dataclass(frozen=True)
class Question:
    link_id: str
    fact: str
    text: str
    type: str
    answers: tuple[tuple[str, str], ...] = ()  # (code, display) of a choice
    unit: str | None = None
    enable_when: tuple[str, Answer] | None = None  # (linkId, answer)


@dataclass(frozen=True)
class Questions:
    """The questionnaire's identity and its questions, in order."""

    id: str
    name: str
    title: str
    version: str
    source: str
    answers_system_id: str
    items: tuple[Question, ...]
    by_link: dict[str, Question] = field(default_factory=dict, compare=False)

    def url(self, canonical_root: str) -> str:
        return f"{canonical_root.rstrip('/')}{QUESTIONNAIRE_PATH}/{self.id}"

    def answers_system(self, canonical_root: str) -> str:
        return f"{canonical_root.rstrip('/')}{CODESYSTEM_PATH}/{self.answers_system_id}"

    def for_facts(self, facts: Iterable[str]) -> list[Question]:
        """The questions that settle any of the facts (with those they depend on), in order."""
        wanted = set(facts)
        chosen = {q.link_id for q in self.items if q.fact in wanted}
        chosen |= {q.enable_when[0] for q in self.items
                   if q.link_id in chosen and q.enable_when}
        return [q for q in self.items if q.link_id in chosen]


def questions_to_ask(questions: Questions, deciding: Sequence[str], facts: Facts,
                     limit: int = MAX_ASKED) -> list[Question]:
    """The questions to ask about an order (a card's link, the SMART app): those of the facts
    that decide its rating (``Decision.deciding``), red flags first, then in the order given;
    each fact's questions whole (with those they depend on), ``limit`` questions at most. None
    for a fact the EHR left open (a source not sent or not read: an integration fault, not the
    clinician's task; see ``is_ehr_gap``)."""
    mine = [n for n in dict.fromkeys(deciding)
            if not any(is_ehr_gap(note) for note in facts.fact(n).missing)]
    ordered = [n for n in ASKED_FIRST if n in mine] + [n for n in mine if n not in ASKED_FIRST]
    chosen: list[str] = []
    asked: list[Question] = []
    for name in ordered:
        trial = questions.for_facts([*chosen, name])
        if len(trial) > len(asked) and len(trial) <= limit:
            chosen.append(name)
            asked = trial
    return asked


def load_questions(directory: Path | None = None) -> Questions:
    """Read and check ``questions.yaml``; raise KnowledgeError naming the file, the question
    and the fix."""
    path = (directory or KNOWLEDGE_DIR) / "questions.yaml"
    doc, raw = read_model(QuestionsFile, path, KnowledgeError)
    items: list[Question] = []
    for i, entry in enumerate(doc.questions):
        items.append(_question(entry, path, entry_name(("questions", i), raw), items))
    head = doc.questionnaire
    return Questions(head.id, head.name, head.title, head.version, head.source,
                     head.answers_system_id, tuple(items), {q.link_id: q for q in items})


def _question(entry: QuestionEntry, path: Path, where: str, earlier: list[Question]) -> Question:
    if any(q.link_id == entry.link_id for q in earlier):
        raise QUESTION_LINK_ID.fail(path, where, link_id=entry.link_id)
    if (entry.type == "choice") != bool(entry.answers):
        raise QUESTION_ANSWERS.fail(path, where, type=entry.type, has="lists answers"
                                    if entry.answers else "lists no answers")
    when: tuple[str, Answer] | None = None
    if entry.enable_when is not None:
        name = entry.enable_when.question
        target = next((q for q in earlier if q.link_id == name and q.type == "boolean"), None)
        if target is None:
            booleans = [q.link_id for q in earlier if q.type == "boolean"]
            raise QUESTION_ENABLE.fail(path, f"{where}.enable_when", name=name,
                                       fix=fix_for(name, booleans, listed="name one of"))
        when = (target.link_id, entry.enable_when.answer)
    return Question(entry.link_id, entry.fact, entry.text.strip(), entry.type,
                    tuple((a.code, a.display) for a in entry.answers), entry.unit, when)


# ------------------------------------------------------------------ FHIR resources


def build_questionnaire(questions: Questions, canonical_root: str) -> dict[str, Any]:
    """The FHIR R4 Questionnaire (SDC-style: linkIds, item types, answer options, enableWhen)."""
    system = questions.answers_system(canonical_root)
    items = []
    for q in questions.items:
        item: dict[str, Any] = {"linkId": q.link_id, "text": q.text, "type": q.type,
                                "required": False}
        if q.answers:
            item["answerOption"] = [{"valueCoding": {"system": system, "code": c, "display": d}}
                                    for c, d in q.answers]
        if q.unit:
            item["extension"] = [{
                "url": "http://hl7.org/fhir/StructureDefinition/questionnaire-unit",
                "valueCoding": {"system": "http://unitsofmeasure.org", "code": "wk",
                                "display": q.unit}}]
        if q.enable_when:
            item["enableWhen"] = [{"question": q.enable_when[0], "operator": "=",
                                   "answerBoolean": q.enable_when[1]}]
        items.append(item)
    return {
        "resourceType": "Questionnaire", "id": questions.id,
        "url": questions.url(canonical_root), "version": questions.version,
        "name": questions.name, "title": questions.title, "status": "active",
        "experimental": False, "subjectType": ["Patient"],
        "description": "The questions that settle the ACR appropriateness rating of a lumbar "
                       f"spine imaging order when the record does not. Source of the criteria: "
                       f"{questions.source}.",
        "item": items,
    }


def answers_code_system(questions: Questions, canonical_root: str,
                        version: str) -> dict[str, Any]:
    """The code system of the choice answers (pain duration categories)."""
    return code_system(
        questions.answers_system_id, questions.answers_system(canonical_root), version,
        "LumbarImagingAnswers", "Answers of the lumbar imaging questions",
        "Coded answers of the Questionnaire " + questions.url(canonical_root),
        [{"code": c, "display": d} for q in questions.items for c, d in q.answers])


def build_response(questions: Questions, canonical_root: str, answers: Mapping[str, Answer],
                   patient_id: str, authored: datetime,
                   order_reference: str | None = None,
                   author: str | None = None, encounter: str | None = None) -> dict[str, Any]:
    """A completed QuestionnaireResponse holding the given answers (unanswered items left out,
    as are those a false enableWhen hides), authored by the practitioner signed in (``author``:
    ``Practitioner/123``; without one the answers read as not a clinician's)."""
    system = questions.answers_system(canonical_root)
    items = []
    for q in questions.items:
        if q.link_id not in answers or not _enabled(q, answers):
            continue
        value = answers[q.link_id]
        if q.type == "boolean":
            answer: dict[str, Any] = {"valueBoolean": bool(value)}
        elif q.type == "integer":
            answer = {"valueInteger": int(value)}
        else:
            display = dict(q.answers)[str(value)]
            answer = {"valueCoding": {"system": system, "code": str(value), "display": display}}
        items.append({"linkId": q.link_id, "text": q.text, "answer": [answer]})
    response: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": f"{questions.url(canonical_root)}|{questions.version}",
        "status": "completed", "subject": {"reference": f"Patient/{patient_id}"},
        "authored": authored.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "item": items,
    }
    if order_reference:
        response["basedOn"] = [{"reference": order_reference}]
    if author:
        response["author"] = {"reference": author}
    if encounter:  # the encounter of the launch (``Encounter/123``)
        response["encounter"] = {"reference": encounter}
    return response


def _enabled(q: Question, answers: Mapping[str, Answer]) -> bool:
    return q.enable_when is None or answers.get(q.enable_when[0]) == q.enable_when[1]


def parse_form(questions: Questions, form: Mapping[str, str],
               asked: Iterable[str] | None = None) -> tuple[dict[str, Answer], list[str]]:
    """Answers from an HTML form (``yes``/``no``, a whole number of weeks, a choice code), and
    the problems found (the linkIds of answers that cannot be read). Empty fields: unanswered."""
    answers: dict[str, Answer] = {}
    problems: list[str] = []
    for q in questions.items:
        if asked is not None and q.link_id not in set(asked):
            continue
        raw = (form.get(q.link_id) or "").strip()
        if not raw:
            continue
        value = _form_value(q, raw)
        if value is None:
            problems.append(q.link_id)
        else:
            answers[q.link_id] = value
    return answers, problems


def _form_value(q: Question, raw: str) -> Answer | None:
    if q.type == "boolean":
        return {"yes": True, "no": False}.get(raw.lower())
    if q.type == "integer":
        return int(raw) if raw.isdigit() and int(raw) <= 520 else None  # up to ten years
    return raw if raw in dict(q.answers) else None
