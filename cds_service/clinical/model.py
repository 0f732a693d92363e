"""The types of the clinical core: a fact (yes / no / unknown, with its evidence), the facts of
one order, and the tunable thresholds of the rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from cds_service.clinical.registry import RED_FLAGS

# An onset known only to lie before a date (a condition's recordedDate): the earliest instant.
MIN_TIME = datetime.min.replace(tzinfo=UTC)
Span = tuple[datetime, datetime]


class Tri(StrEnum):
    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ClinicalParams:
    """Tunable thresholds of the clinical rules (from settings)."""

    conservative_care_weeks: int = 6
    elderly_over_age: int = 70
    adult_age: int = 18  # younger: outside these criteria (the fact "child")
    episode_grace_days: int = 14
    care_window_days: int = 180  # with no dated episode: how far back care and candidacy count
    recent_mri_months: int = 12
    recent_trauma_days: int = 90
    recent_red_flag_days: int = 90
    infection_relapse_days: int = 365  # a spinal infection treated this recently counts
    assume_candidate_after_failed_care: bool = True


@dataclass(frozen=True)
class Evidence:
    """One resource that supports a fact."""

    resource: str
    system: str
    code: str
    display: str | None
    date: str | None
    role: str
    text: str | None = None  # the record's own words for it (its concept's text), if any


@dataclass
class Fact:
    name: str
    value: Tri
    evidence: list[Evidence] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    # (written out: a compiled class's own __init__ is native; the one @dataclass makes is not)
    def __init__(self, name: str, value: Tri, evidence: list[Evidence] | None = None,
                 missing: list[str] | None = None) -> None:
        self.name = name
        self.value = value
        self.evidence = [] if evidence is None else evidence
        self.missing = [] if missing is None else missing

    def possible(self) -> tuple[bool, ...]:
        """The truth values this fact can take."""
        if self.value is Tri.YES:
            return (True,)
        if self.value is Tri.NO:
            return (False,)
        return (False, True)


@dataclass
class Facts:
    """Everything the scenario needs for one order.

    One attribute per fact of the registry (:mod:`cds_service.clinical.registry`), named as the
    registry names it, plus what the facts carry besides yes / no / unknown.
    """

    indication: Fact
    radiculopathy: Fact
    duration: Fact
    conservative_care: Fact
    intervention_candidate: Fact
    cauda_equina: Fact
    neuro_deficit: Fact
    cancer: Fact
    infection: Fact
    immunosuppression: Fact
    prior_surgery: Fact
    trauma: Fact
    osteoporosis: Fact
    elderly: Fact
    steroids: Fact
    mri_safety: Fact
    recent_mri: Fact
    child: Fact  # younger than the adult age: outside these criteria
    high_energy_trauma: Fact  # a vehicle crash, a fall from a height: outside these criteria
    pregnancy: Fact
    iodinated_allergy: Fact
    gadolinium_allergy: Fact
    renal_impairment: Fact
    # the categories the pain duration may fall in ("acute", "subacute", "chronic")
    duration_categories: frozenset[str] = frozenset({"acute", "subacute", "chronic"})
    duration_dated: bool = False  # the duration comes from a dated onset, not a bound
    care_weeks: float | None = None
    # "none", "under-way" (fewer weeks than the threshold), "done": the states care may be in
    care_states: tuple[str, ...] = ("none",)
    candidate_assumed: bool = False
    age: tuple[int, int] | None = None
    other_indication: bool = False  # the order's reasons name an indication that is not LBP
    urgent: bool = False  # priority stat, asap or urgent
    # record entries the service cannot read (text only, a local code) that left a fact unknown
    unreadable: list[Evidence] = field(default_factory=list)
    # (code, parameters); the wording is in cards/common.yaml "assumptions"
    assumptions: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    assume_candidate: bool = True  # candidate assumed after failed care (ClinicalParams)
    # (code, parameters) of an answer that disagrees with the record (the record is used); the
    # wording is in cards/common.yaml "phrases"
    conflicts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # lumbar surgery planned (a procedure in preparation, an active surgery order, a spine
    # referral): a pre-operative MRI is no repeat to question
    surgery_planned: bool = False
    # a completed MRI dated after every MRI-unsafe device on record: the device was scanned
    device_scanned: Evidence | None = None

    def fact(self, name: str) -> Fact:
        """The fact of that registry name."""
        found: Fact = getattr(self, name)
        return found

    def red_flags(self) -> list[Fact]:
        return [getattr(self, n) for n in RED_FLAGS]
