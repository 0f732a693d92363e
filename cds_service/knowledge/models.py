"""The knowledge files as pydantic models: one model per file, a field per key.

A misspelled key is refused (``extra="forbid"``: the message suggests the key meant), as is a
value of the wrong type or outside its vocabulary. Checks that need more than one entry (a system
key, an order code among the codes, a row per procedure) are made by the loader
(:mod:`cds_service.knowledge.loader`). Each field's description is shown when it is missing and
on the page ``docs/knowledge-checks.md``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    field_validator,
    model_validator,
)

from cds_service.knowledge.checks import ENTRY_CODE, ENTRY_VERIFIED
from cds_service.knowledge.vocabulary import (
    CATEGORIES,
    CONTRASTS,
    MODALITIES,
    QUESTION_FACTS,
    QUESTION_TYPES,
    REGIONS,
)

# Built from the vocabularies, so each list of values is written once (a type checker cannot
# read a Literal of a variable: hence the ignores).
Category = Literal[CATEGORIES]  # type: ignore[valid-type]
Modality = Literal[tuple(sorted(MODALITIES))]  # type: ignore[valid-type]
Region = Literal[tuple(sorted(REGIONS))]  # type: ignore[valid-type]
Contrast = Literal[CONTRASTS]  # type: ignore[valid-type]
QuestionFact = Literal[QUESTION_FACTS]  # type: ignore[valid-type]
QuestionType = Literal[QUESTION_TYPES]  # type: ignore[valid-type]
VERIFIED = {"yes", "partial", "true"}


def _number_as_text(value: Any) -> Any:
    """A number written without quotes (a CPT code) is read as its text."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


Text = Annotated[str, BeforeValidator(_number_as_text)]
Name = Annotated[str, BeforeValidator(_number_as_text), Field(min_length=1)]


class FileModel(BaseModel):
    """A mapping of an editable file: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ------------------------------------------------------------------ valuesets.yaml


class ValueSetCode(FileModel):
    """One code (or prefix) of a value set, with where it was checked."""

    system: Name = Field(description="a key of `systems` (`icd10cm`, `snomed`, ...) or a URL")
    code: Text | None = Field(None, description="one code (give `code` or `prefix`)")
    prefix: Text | None = Field(
        None, description="a code and every more specific code below it (give `code` or "
                          "`prefix`)")
    display: Text | None = Field(
        None, description="the name a card shows for the code when the record gives none")
    source: Name = Field(description="where the code was checked; every code needs one")
    verified: Any = Field(
        description="`yes` (checked in its source) or `partial` (the concept was checked; a site "
                    "may use other codes); unverified codes are kept out")

    @field_validator("verified")
    @classmethod
    def _verified(cls, value: Any) -> Any:
        if str(value).lower() not in VERIFIED:
            raise ValueError(ENTRY_VERIFIED.text(value="no" if value is False else value))
        return value

    @model_validator(mode="after")
    def _one_code(self) -> ValueSetCode:
        given = [v for v in (self.code, self.prefix) if v is not None]
        if len(given) != 1 or not given[0].strip():
            raise ValueError(ENTRY_CODE.text())
        return self

    @property
    def value(self) -> str:
        return self.code if self.code is not None else str(self.prefix)


class ValueSet(FileModel):
    """The codes that count as evidence of one clinical finding."""

    description: Text | None = Field(None, description="what the set holds, for the reader")
    entries: list[ValueSetCode] = Field(default_factory=list, description="the codes of the set")
    excludes: list[ValueSetCode] = Field(
        default_factory=list, description="codes removed from the set, each with every code "
                                          "below it")
    needs_companion: list[Name] = Field(
        default_factory=list, description="value sets of which a finding must be present too "
                                          "for this set's codes to count")
    text_terms: list[Name] = Field(
        default_factory=list, description="... or words the resource's text must name")
    benign_causes: list[Name] = Field(
        default_factory=list, description="value sets of a benign cause: a finding of this set "
                                          "does not count beside an active condition of one")
    benign_terms: list[Name] = Field(
        default_factory=list, description="... or when its own text names such a cause "
                                          "(words)")
    text_finds: list[Name] = Field(
        default_factory=list, description="phrases (lower case) that put a Condition whose code "
                                          "is in no value set into this one by its text")
    text_excludes: list[Name] = Field(
        default_factory=list, description="... unless its text also names one of these "
                                          "(`remission`, `history of`)")
    alone: Literal["ignored", "unknown"] = Field(
        "ignored", description="what a code of the set means without its companion or words: "
                               "`ignored` (nothing), or `unknown` (the fact is left open: ask)")


class MedicationTerms(FileModel):
    source: Name = Field(description="where the drug classes come from")
    terms: list[Name] = Field(default_factory=list,
                              description="ingredients that make a medication back-pain care")


class MedicationClass(FileModel):
    """A class of drugs read from a medication's name (systemic corticosteroids, ...)."""

    description: Name = Field(description="what the class holds and why, for the reader")
    source: Name = Field(description="where the class comes from (a drug classification)")
    terms: list[Name] = Field(
        min_length=1, description="ingredient names, lower case, each matched as a whole word of "
                                  "the medication's text or display (combination products too)")
    exclude_terms: list[Name] = Field(
        default_factory=list, description="words (forms, routes) that take a medication out of the "
                                          "class even when a term matches: `topical`, `inhaler`, "
                                          "...")


class SiteTerms(FileModel):
    """Words that tell which site a code naming no site (Z98.1, an add-on procedure) is about."""

    source: Name = Field(description="where the words come from")
    lumbar: list[Name] = Field(min_length=1, description="words (whole, lower case) that name "
                                                         "the lumbar spine: `lumbar`, `l4` ...")
    other: list[Name] = Field(min_length=1, description="words that name another site: "
                                                        "`cervical`, `ankle` ...")


class ValueSetsFile(FileModel):
    """``valuesets.yaml``: which codes count as evidence for each clinical fact."""

    systems: dict[str, Name] = Field(default_factory=dict,
                                     description="short names of code systems and their URLs")
    system_aliases: dict[str, Name] = Field(
        default_factory=dict, description="other system URLs read as one of the main systems")
    valuesets: dict[str, ValueSet] = Field(description="the value sets, by id")
    medication_terms: MedicationTerms | None = Field(
        None, description="medication counted as conservative care by its ingredient's name")
    medication_classes: dict[str, MedicationClass] = Field(
        default_factory=dict, description="classes of drugs read as facts from the medication "
                                          "list, by id (`systemic_corticosteroids`, "
                                          "`immunosuppressive_drugs`)")
    site_terms: SiteTerms | None = Field(
        None, description="words that place a code naming no site (arthrodesis status, an "
                          "add-on procedure) in the lumbar spine or elsewhere")


# ------------------------------------------------------------------ procedures.yaml


class OrderCode(FileModel):
    """A code the service writes into an order it suggests."""

    system: Name = Field(description="a key of `systems` or a URL")
    code: Name = Field(description="the code (also one of the procedure's `codes`)")
    display: Text | None = Field(None, description="its display (default: the procedure's name)")


class CatalogCode(OrderCode):
    """A code that identifies a procedure in an order."""

    code: Name = Field(description="the code")
    display: Text | None = Field(None, description="its display")
    source: Name = Field(description="where the code was checked; every code needs one")


class ProcedureEntry(FileModel):
    """One of the procedures the ACR criteria rate."""

    id: Name = Field(description="the procedure's id (the key of its `ratings.yaml` row)")
    name: Name = Field(description="our name, shown on cards")
    short_name: Text | None = Field(None, description="the name used in card summaries "
                                                      "(default: `name`)")
    modality: Modality = Field(description="the imaging modality")
    contrast: Contrast = Field(description="the contrast given")
    region: Region = Field(description="the body region imaged")
    rrl: Name = Field(description="ACR's relative radiation level, as shown on cards")
    rrl_rank: int = Field(0, description="0 none, 1, 2: lower is suggested first")
    preference: int = Field(99, description="tie-break between equally close studies, lower "
                                            "first")
    order_codes: list[OrderCode] = Field(
        min_length=1, description="the codes written into a suggested order")
    codes: list[CatalogCode] = Field(min_length=1, description="every code that identifies "
                                                               "the procedure in an order")


class CombinationEntry(FileModel):
    """An order coded ``when`` plus a ``with_any`` code is the procedure ``becomes``."""

    when: Name = Field(description="the id of the procedure ordered")
    becomes: Name = Field(description="the id of the procedure it then is")
    with_any: list[CatalogCode] = Field(
        min_length=1, description="companion codes, in the same order or another draft")


class ProceduresFile(FileModel):
    """``procedures.yaml``: the procedure catalog."""

    source: dict[str, Text] = Field(default_factory=dict, description="the ACR criteria cited")
    systems: dict[str, Name] = Field(default_factory=dict,
                                     description="short names of code systems and their URLs")
    combinations: list[CombinationEntry] = Field(default_factory=list,
                                            description="orders that are another procedure")
    procedures: list[ProcedureEntry] = Field(min_length=1, description="the rated procedures")


# ------------------------------------------------------------------ ratings.yaml


class Variant(FileModel):
    name: Text | None = Field(None, description="the scenario's name, shown on cards")


class RatingsFile(FileModel):
    """``ratings.yaml``: the ACR category of each procedure in each variant."""

    source: dict[str, Text] = Field(default_factory=dict, description="the ACR criteria cited")
    variants: dict[str, Variant] = Field(description="V1 to V7 with their names")
    ratings: dict[str, list[Category]] = Field(
        description="per procedure id, one category per variant, in order")


# ------------------------------------------------------------------ questions.yaml


class Questionnaire(FileModel):
    """The identity of the published Questionnaire."""

    id: str = Field(min_length=1, description="the Questionnaire's id (part of its canonical "
                                              "URL: keep it)")
    name: str = Field(min_length=1, description="its computer-friendly name")
    title: str = Field(min_length=1, description="its title")
    version: str = Field(min_length=1, description="its version (quoted: \"1.0.0\")")
    source: str = Field(min_length=1, description="the criteria the questions come from")
    answers_system_id: str = Field(min_length=1,
                                   description="the id of the code system of choice answers")


class AnswerOption(FileModel):
    code: str = Field(min_length=1, description="the answer's code")
    display: str = Field(min_length=1, description="the answer as shown")


class EnableWhen(FileModel):
    question: str = Field(description="the linkId of an earlier boolean question")
    answer: StrictBool = Field(description="`true` or `false`")


class Question(FileModel):
    """One question of the Questionnaire."""

    link_id: str = Field(alias="linkId", min_length=1,
                         description="stable id: answers are stored under it")
    fact: QuestionFact = Field(description="the engine's fact the answer settles")
    text: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] = Field(
        description="the question as asked")
    type: QuestionType = Field(description="the answer's type")
    answers: list[AnswerOption] = Field(default_factory=list,
                                        description="a choice's answers (code, display)")
    unit: str | None = Field(None, description="the unit of an integer answer")
    enable_when: EnableWhen | None = Field(
        None, description="shown only when an earlier boolean question has this answer")


class QuestionsFile(FileModel):
    """``questions.yaml``: the questions that can settle a rating the record leaves open."""

    questionnaire: Questionnaire = Field(description="the Questionnaire's identity")
    questions: list[Question] = Field(min_length=1, description="the questions, in order")
