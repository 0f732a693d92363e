"""Facts -> possible ACR variants -> the rating of an order, under every possible world.

Unknown facts make several worlds possible. The order is rated in each; the answer is given only
when every world gives the same PAMA code (and a suggestion only when every world picks the same
alternative). Otherwise the decision lists the unknown facts that would settle it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

from cds_service.clinical.facts import Facts, Tri
from cds_service.knowledge import CATEGORY_RANK, PAMA_CODE, Knowledge, Procedure

CANCEL = "cancel"


class World(NamedTuple):
    """One assignment of the facts that decide the scenario (red flags grouped by variant)."""

    indication: bool
    cauda_equina: bool
    v7: bool  # cancer, infection or immunosuppression
    prior_surgery: bool
    v6: bool  # low-velocity trauma, osteoporosis, older age or chronic steroids
    duration: str
    care: bool
    candidate_evidence: bool
    mri_safety: bool


WORLD_FACTS = World._fields
GROUPS = {"v7": ("cancer", "infection", "immunosuppression"),
          "v6": ("trauma", "osteoporosis", "elderly", "steroids")}


def variants_of(world: World, assume_candidate: bool = True) -> frozenset[str]:
    """The ACR variants that apply in a world (empty when the indication is not LBP)."""
    if not world.indication:
        return frozenset()
    out = set()
    if world.cauda_equina:
        out.add("V4")
    if world.v7:
        out.add("V7")
    if world.prior_surgery:
        out.add("V5")
    if world.v6:
        out.add("V6")
    if out:
        return frozenset(out)
    if world.duration == "acute":
        return frozenset({"V1"})
    candidate = world.candidate_evidence or (assume_candidate and world.care)
    return frozenset({"V3"} if world.care and candidate else {"V2"})


def _group_possible(facts: Facts, names: tuple[str, ...]) -> tuple[bool, ...]:
    values = [getattr(facts, n).value for n in names]
    if Tri.YES in values:
        return (True,)
    if all(v is Tri.NO for v in values):
        return (False,)
    return (False, True)


def possible_worlds(facts: Facts) -> list[World]:
    """Every world consistent with the facts."""
    choices: list[tuple[object, ...]] = []
    for name in WORLD_FACTS:
        if name == "duration":
            choices.append(tuple(sorted(facts.duration)))
        elif name in GROUPS:
            choices.append(_group_possible(facts, GROUPS[name]))
        elif name == "care":
            choices.append(facts.care.possible())
        else:
            choices.append(getattr(facts, name).possible())
    return [World(*combo) for combo in itertools.product(*choices)]  # type: ignore[arg-type]


@dataclass(frozen=True)
class Alternative:
    procedure: Procedure
    category: str


@dataclass(frozen=True)
class Outcome:
    """What one world says about the order."""

    variants: frozenset[str]
    pama: str | None
    category: str | None
    alternatives: tuple[Alternative, ...] | str  # or CANCEL
    fallback: bool  # alternatives are only MBA because the UA ones are unsafe (MRI)


def _alternatives(knowledge: Knowledge, ordered: Procedure, variants: frozenset[str],
                  mri_unsafe: bool) -> tuple[tuple[Alternative, ...] | str, bool]:
    """Closest alternatives that are UA and safe, else (MRI unsafe) MBA ones, else cancel."""
    every = [(p, knowledge.category(p.id, variants)) for p in knowledge.procedures.values()]
    rated = [(p, c) for p, c in every if p.id != ordered.id]
    # An MRI that is UA but unsafe for this patient (the ordered one included).
    ua_any = [p for p, c in every if c == "UA" and mri_unsafe and p.modality == "MR"]
    safe = [(p, c) for p, c in rated if not (mri_unsafe and p.modality == "MR")]
    ua = [p for p, c in safe if c == "UA"]

    def key(p: Procedure, keep_contrast: bool) -> tuple[int, int, int, int]:
        same = p.modality == ordered.modality
        contrast = keep_contrast and same and p.has_contrast != ordered.has_contrast
        return (0 if same else 1, 1 if contrast else 0, p.rrl_rank, p.preference)

    if ua:
        best = min(ua, key=lambda p: key(p, True))
        return (Alternative(best, "UA"),), False
    if ua_any:  # every UA study is an MRI and MRI is unsafe: offer the MBA ones
        mba = [(p, c) for p, c in safe if c in ("MBA", "MBA(D)") and p.region == "lumbar"]
        mba.sort(key=lambda pc: (key(pc[0], False), -CATEGORY_RANK[pc[1]]))
        if mba:
            return tuple(Alternative(p, c) for p, c in mba[:3]), True
    if ordered.id in knowledge.ratings and knowledge.category(ordered.id, variants) == "UNA":
        return CANCEL, False
    return (), False


def outcome_in(world: World, knowledge: Knowledge, ordered: Procedure,
               assume_candidate: bool = True) -> Outcome:
    variants = variants_of(world, assume_candidate)
    if not variants:
        pama = "no-criteria-apply" if ordered.region == "lumbar" else None
        return Outcome(variants, pama, None, (), False)
    category = knowledge.category(ordered.id, variants)
    alts, fallback = _alternatives(knowledge, ordered, variants, world.mri_safety)
    return Outcome(variants, PAMA_CODE[category], category, alts, fallback)


@dataclass
class Decision:
    """The rating of one order over all possible worlds."""

    procedure: Procedure
    determinate: bool
    pama: str | None
    category: str | None
    variants: frozenset[str] | None
    alternatives: tuple[Alternative, ...] | str | None
    fallback: bool
    deciding: list[str] = field(default_factory=list)
    worlds: int = 0


def decide(facts: Facts, knowledge: Knowledge, ordered: Procedure) -> Decision:
    """Rate the order; determinate only when every possible world agrees on the PAMA code."""
    assume_candidate = facts.assume_candidate
    worlds = possible_worlds(facts)
    cache: dict[tuple[object, ...], Outcome] = {}
    outcomes: dict[World, Outcome] = {}
    for w in worlds:
        k = (variants_of(w, assume_candidate), w.mri_safety)
        if k not in cache:
            cache[k] = outcome_in(w, knowledge, ordered, assume_candidate)
        outcomes[w] = cache[k]
    distinct = set(outcomes.values())
    pamas = {o.pama for o in distinct}
    categories = {o.category for o in distinct}
    variant_sets = {o.variants for o in distinct}
    alt_sets = {(o.alternatives, o.fallback) for o in distinct}
    determinate = len(pamas) == 1
    alternatives, fallback = (next(iter(alt_sets)) if len(alt_sets) == 1 else (None, False))
    decision = Decision(
        procedure=ordered, determinate=determinate,
        pama=next(iter(pamas)) if determinate else None,
        category=next(iter(categories)) if determinate and len(categories) == 1 else None,
        variants=next(iter(variant_sets)) if len(variant_sets) == 1 else None,
        alternatives=alternatives, fallback=fallback, worlds=len(worlds))
    if not determinate or len(alt_sets) > 1 or len(variant_sets) > 1:
        decision.deciding = _deciding_facts(worlds, outcomes, facts)
    return decision


def _deciding_facts(worlds: list[World], outcomes: dict[World, Outcome],
                    facts: Facts) -> list[str]:
    """Unknown facts whose value changes the rating in some world (else: the open ones)."""
    varying = [i for i, name in enumerate(WORLD_FACTS)
               if len({w[i] for w in worlds}) > 1]
    out = []
    if len({o.pama for o in outcomes.values()}) > 1:
        for i in varying:
            groups: dict[tuple[object, ...], set[str | None]] = {}
            for w in worlds:
                groups.setdefault(w[:i] + w[i + 1:], set()).add(outcomes[w].pama)
            if any(len(pamas) > 1 for pamas in groups.values()):
                out.append(WORLD_FACTS[i])
    if not out:  # the PAMA code is settled; the scenario (and so the suggestion) is not
        out = [WORLD_FACTS[i] for i in varying]
    expanded: list[str] = []
    for name in out:
        if name in GROUPS:
            expanded += [m for m in GROUPS[name] if getattr(facts, m).value is Tri.UNKNOWN]
        else:
            expanded.append(name)
    return expanded
