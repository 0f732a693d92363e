"""Facts -> possible ACR variants -> the rating of an order, under every possible world.

Unknown facts make several worlds possible. The order is rated in each; the answer is given only
when every world gives the same PAMA code (and a suggestion only when every world picks the same
alternative). Otherwise the decision lists the unknown facts that would settle it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

from cds_service.clinical.model import Facts, Tri
from cds_service.clinical.registry import CONTRAST_FACTS, DECISION_FACTS, GROUPS, OUTSIDE, spec
from cds_service.knowledge import CATEGORY_RANK, PAMA_CODE, Knowledge, Procedure

CANCEL = "cancel"
NO_IMAGING_YET = frozenset({"V1", "V2"})  # the variants where no study is appropriate
EMERGENCY = "V4"  # suspected cauda equina: the order is rated by it alone
SUSPICION = "V7"  # cancer, infection, immunosuppression: the study it needs is pointed to
DEFICIT_STUDY = "mri-wo"  # a severe or progressive deficit outside V4-V7 (the ACR narrative)
# Studies that do not show the nerve roots (CT myelography does: MRI may be contraindicated)
DEFICIT_NUDGED = frozenset({"xr-lumbar", "ct-wo", "ct-w"})


class World(NamedTuple):
    """One assignment of the facts that decide the scenario (red flags grouped by variant), in
    the order the facts that decide a rating are named. Each field is a fact of the registry
    that the decision reads, a group of them, or a state the facts carry (checked below)."""

    indication: bool
    cauda_equina: bool
    neuro_deficit: bool  # severe or progressive deficit: outside V1-V3
    v7: bool  # cancer, infection or immunosuppression
    prior_surgery: bool
    v6: bool  # low-velocity trauma, osteoporosis, older age or chronic steroids
    duration: str  # "acute", "subacute" or "chronic"
    conservative_care: str  # "none", "under-way" or "done"
    intervention_candidate: bool
    mri_safety: bool
    child: bool  # outside these criteria (rated as no when unknown)
    high_energy_trauma: bool  # outside these criteria (rated as no when unknown)


WORLD_FACTS = World._fields
STATES = ("duration", "conservative_care")  # worlds take their states, not a yes or no
_folded = {n for n in DECISION_FACTS if not any(n in m for m in GROUPS.values())}
if set(WORLD_FACTS) != _folded | set(GROUPS) | set(STATES):  # a registry edit must reach here
    raise ImportError(f"scenario.World {WORLD_FACTS} does not match the registry's decision "
                      f"facts {sorted(_folded)} and groups {sorted(GROUPS)}")


@functools.lru_cache(maxsize=8192)  # pure, and the worlds are few (at most 2 x 2,304)
def variants_of(world: World, assume_candidate: bool = True) -> frozenset[str]:
    """The ACR variants that apply in a world.

    Empty when the indication is not LBP, when the patient is outside these criteria (a child,
    high-energy trauma), and when a severe or progressive neurological deficit puts the patient
    outside V1-V3 with none of V4-V7 applying (no criteria apply).
    """
    if not world.indication or world.child or world.high_energy_trauma:
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
    if world.neuro_deficit:
        return frozenset()
    if world.duration == "acute":
        return frozenset({"V1"})
    # V3: persistent symptoms during or after 6 weeks of care, in a surgery or injection
    # candidate (assumed after failed care when the setting allows; on record while under way).
    if world.conservative_care == "done" and (world.intervention_candidate or assume_candidate):
        return frozenset({"V3"})
    if world.conservative_care == "under-way" and world.intervention_candidate:
        return frozenset({"V3"})
    return frozenset({"V2"})


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
            choices.append(tuple(sorted(facts.duration_categories)))
        elif name in GROUPS:
            choices.append(_group_possible(facts, GROUPS[name]))
        elif name == "conservative_care":
            choices.append(facts.care_states)
        elif name in OUTSIDE:  # only a recorded yes puts the order outside the criteria
            choices.append((getattr(facts, name).value is Tri.YES,))
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
    # V7 applies and the order is not UA there: the study UA in every applicable variant
    suspicion: Alternative | None = None


IV_CONTRAST = {"iv", "iv-wo-w"}
CROSS_SECTIONAL = {"CT", "MR", "NM", "PET"}
NONE: frozenset[str] = frozenset()


def agents_of(proc: Procedure) -> frozenset[str]:
    """The contrast agents a study gives (registry.CONTRASTS): gadolinium for an MRI with IV
    contrast, iodinated contrast for a CT with IV contrast, intrathecal iodinated contrast for
    CT myelography."""
    if proc.contrast in IV_CONTRAST:
        return frozenset({"gadolinium" if proc.modality == "MR" else "iodinated"}) \
            if proc.modality in ("MR", "CT") else NONE
    return frozenset({"intrathecal"}) if proc.contrast == "intrathecal" else NONE


def contrast_risks(facts: Facts) -> frozenset[str]:
    """The contrast agents the record makes a risk (pregnancy, a contrast allergy, severe renal
    impairment): only facts recorded as yes (an unknown one avoids nothing)."""
    return frozenset(agent for name in CONTRAST_FACTS if facts.fact(name).value is Tri.YES
                     for agent in spec(name).avoids)


def _alternatives(knowledge: Knowledge, ordered: Procedure, variants: frozenset[str],
                  mri_unsafe: bool, avoid: frozenset[str] = NONE,
                  ) -> tuple[tuple[Alternative, ...] | str, bool]:
    """Closest alternatives that are UA and safe, else (MRI unsafe, or the UA studies give a
    contrast at risk) MBA ones, else cancel.

    Closest: same modality first, then the same contrast intent (also across modalities: CT with
    contrast -> MRI without and with), then less radiation. Never radiography in place of a
    cross-sectional study. Safe: no MRI when MRI is unsafe, no study giving a contrast agent in
    ``avoid``. With suspected cauda equina the alternatives are those of V4 alone (an emergency
    pathway: another variant must not make CT without contrast the study), and with MRI unsafe
    CT myelography comes first (CT without contrast does not show the cauda equina).
    """
    basis = rated_by(variants)
    every = [(p, knowledge.category(p.id, basis)) for p in knowledge.procedures.values()]
    rated = [(p, c) for p, c in every if p.id != ordered.id
             and not (p.modality == "XR" and ordered.modality in CROSS_SECTIONAL)]

    def unsafe(p: Procedure) -> bool:
        return (mri_unsafe and p.modality == "MR") or bool(agents_of(p) & avoid)

    # A study that is UA but unsafe for this patient (the ordered one included).
    ua_any = [p for p, c in every if c == "UA" and unsafe(p)]
    safe = [(p, c) for p, c in rated if not unsafe(p)]
    myelography_first = mri_unsafe and "V4" in variants
    ua = [p for p, c in safe if c == "UA"]
    key = functools.partial(_closeness, ordered)
    if ua:
        return (Alternative(min(ua, key=key), "UA"),), False
    if ua_any:  # every UA study is unsafe (MRI, a contrast at risk): offer the MBA ones
        mba = [(p, c) for p, c in safe if c in ("MBA", "MBA(D)") and p.region == "lumbar"]
        mba.sort(key=lambda pc: (not (myelography_first and pc[0].contrast == "intrathecal"),
                                 key(pc[0]), -CATEGORY_RANK[pc[1]]))
        if mba:
            return tuple(Alternative(p, c) for p, c in mba[:3]), True
    if (ordered.id in knowledge.ratings and variants <= NO_IMAGING_YET
            and knowledge.category(ordered.id, variants) == "UNA"):  # (never with V4)
        return CANCEL, False
    return (), False


def _closeness(ordered: Procedure, p: Procedure) -> tuple[int, int, int, int]:
    """How close a study is to the ordered one (smaller is closer): same modality, then the same
    contrast intent, then less radiation."""
    contrast = (p.contrast in IV_CONTRAST) != (ordered.contrast in IV_CONTRAST)
    return (0 if p.modality == ordered.modality else 1, 1 if contrast else 0, p.rrl_rank,
            p.preference)


def rated_by(variants: frozenset[str]) -> frozenset[str]:
    """The variants an order is rated by: suspected cauda equina (V4) alone when it applies (an
    emergency pathway: age or prior surgery must not make an X-ray appropriate there), else
    every applicable variant (the best category over them)."""
    return frozenset({EMERGENCY}) if EMERGENCY in variants else variants


def suspicion_study(knowledge: Knowledge, ordered: Procedure, variants: frozenset[str],
                    mri_unsafe: bool, avoid: frozenset[str] = NONE) -> Alternative | None:
    """When V7 applies (and V4 does not) and the ordered study is not Usually Appropriate for
    it: the closest safe study that is Usually Appropriate in every applicable variant."""
    row = knowledge.ratings.get(ordered.id)
    if (row is None or SUSPICION not in variants or EMERGENCY in variants
            or row[SUSPICION] == "UA"):
        return None
    fits = [p for p in knowledge.procedures.values()
            if p.id != ordered.id and p.id in knowledge.ratings
            and all(knowledge.ratings[p.id][v] == "UA" for v in variants)
            and not (mri_unsafe and p.modality == "MR") and not agents_of(p) & avoid
            and not (p.modality == "XR" and ordered.modality in CROSS_SECTIONAL)]
    if not fits:
        return None
    return Alternative(min(fits, key=functools.partial(_closeness, ordered)), "UA")


def _deficit_only(world: World, variants: frozenset[str]) -> bool:
    """No variant applies because of a severe or progressive neurological deficit alone."""
    return (not variants and world.indication and world.neuro_deficit
            and not any(getattr(world, name) for name in OUTSIDE))


def _deficit_study(knowledge: Knowledge, ordered: Procedure,
                   world: World) -> tuple[Alternative, ...]:
    """The study a new deficit needs in place of a radiograph or CT (MRI, when it is safe)."""
    study = knowledge.procedures.get(DEFICIT_STUDY)
    if study is None or world.mri_safety or ordered.id not in DEFICIT_NUDGED:
        return ()
    return (Alternative(study, "UA"),)


def outcome_in(world: World, knowledge: Knowledge, ordered: Procedure,
               assume_candidate: bool = True, other_indication: bool = False,
               avoid: frozenset[str] = NONE) -> Outcome:
    variants = variants_of(world, assume_candidate)
    deficit = _deficit_only(world, variants)
    if deficit and all(c == "UNA" for c in knowledge.ratings[ordered.id].values()):
        # A deficit sends the patient to imaging, but never to a study no variant supports.
        return Outcome(variants, "not-appropriate", "UNA", (), False)
    if not variants:
        pama = ("no-criteria-apply" if ordered.region == "lumbar" or other_indication
                else None)
        deficit_alts = _deficit_study(knowledge, ordered, world) if deficit else ()
        return Outcome(variants, pama, None, deficit_alts, False)
    category = knowledge.category(ordered.id, rated_by(variants))
    alts, fallback = _alternatives(knowledge, ordered, variants, world.mri_safety, avoid)
    return Outcome(variants, PAMA_CODE[category], category, alts, fallback,
                   suspicion_study(knowledge, ordered, variants, world.mri_safety, avoid))


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
    # Without the assumed candidacy the rating (or only the suggestion) would differ.
    assumption_rates: bool = False
    assumption_suggests: bool = False
    explain: bool = False  # the worlds disagree: say which facts would decide
    suspicion: Alternative | None = None  # the study V7 needs, when every world agrees

    @property
    def assumption_drives(self) -> bool:
        return self.assumption_rates or self.assumption_suggests


MEMO_LIMIT = 50_000


def decision_key(facts: Facts, ordered: Procedure) -> tuple[object, ...]:
    """Everything :func:`decide` reads: equal keys, equal decisions (the value of each decision
    fact of the registry, the duration categories and the states of care)."""
    return ("decision", ordered.id, tuple(getattr(facts, n).value for n in DECISION_FACTS),
            facts.duration_categories, facts.care_states, facts.assume_candidate,
            facts.candidate_assumed, facts.other_indication, contrast_risks(facts))


def decide(facts: Facts, knowledge: Knowledge, ordered: Procedure) -> Decision:
    """Rate the order; determinate only when every possible world agrees on the PAMA code.

    A pure function of :func:`decision_key`, so decisions are memoised on the knowledge: the
    same situation is rated once per process (a few thousand distinct keys in practice).
    """
    key = decision_key(facts, ordered)
    known = knowledge.memo.get(key)
    if known is None:
        if len(knowledge.memo) > MEMO_LIMIT:
            knowledge.memo.clear()
        known = knowledge.memo[key] = _decide_all(facts, knowledge, ordered)
    return dataclasses.replace(known, deciding=list(known.deciding))


def _decide_all(facts: Facts, knowledge: Knowledge, ordered: Procedure) -> Decision:
    """When the candidacy was assumed, the order is also rated without the assumption (in the
    same pass over the worlds): the assumption is kept, and said on the card, only where it
    changes the rating or the suggestion."""
    assume = facts.assume_candidate
    compare = facts.candidate_assumed and assume
    worlds = possible_worlds(facts)
    avoid = contrast_risks(facts)
    outcomes: dict[World, Outcome] = {}
    plain: set[Outcome] = set()
    for w in worlds:
        outcomes[w] = _outcome(w, variants_of(w, assume), facts, knowledge, ordered, assume,
                               avoid)
        if compare:
            without = variants_of(w, False)
            plain.add(outcomes[w] if without == outcomes[w].variants else
                      _outcome(w, without, facts, knowledge, ordered, False, avoid))
    decision = _summarise(set(outcomes.values()), ordered, len(worlds))
    if decision.explain:
        decision.deciding = _deciding_facts(worlds, outcomes, facts)
    if compare:
        other = _summarise(plain, ordered, len(worlds))
        decision.assumption_rates = other.pama != decision.pama
        decision.assumption_suggests = other.alternatives != decision.alternatives
    return decision


def _outcome(world: World, variants: frozenset[str], facts: Facts, knowledge: Knowledge,
             ordered: Procedure, assume: bool, avoid: frozenset[str] = NONE) -> Outcome:
    """outcome_in, memoised on everything it reads (no variant: and why not)."""
    key = ("outcome", ordered.id, variants, world.mri_safety, facts.other_indication,
           _deficit_only(world, variants), avoid)
    outcome = knowledge.memo.get(key)
    if outcome is None:
        outcome = knowledge.memo[key] = outcome_in(world, knowledge, ordered, assume,
                                                   facts.other_indication, avoid)
    return outcome


def _summarise(distinct: set[Outcome], ordered: Procedure, worlds: int) -> Decision:
    """What every world agrees on."""
    pamas = {o.pama for o in distinct}
    categories = {o.category for o in distinct}
    variant_sets = {o.variants for o in distinct}
    alt_sets = {(o.alternatives, o.fallback) for o in distinct}
    suspicions = {o.suspicion for o in distinct}
    determinate = len(pamas) == 1
    alternatives, fallback = (next(iter(alt_sets)) if len(alt_sets) == 1 else (None, False))
    decision = Decision(
        procedure=ordered, determinate=determinate,
        pama=next(iter(pamas)) if determinate else None,
        category=next(iter(categories)) if determinate and len(categories) == 1 else None,
        variants=next(iter(variant_sets)) if len(variant_sets) == 1 else None,
        alternatives=alternatives, fallback=fallback, worlds=worlds,
        suspicion=next(iter(suspicions)) if len(suspicions) == 1 else None)
    decision.explain = not determinate or len(alt_sets) > 1 or len(variant_sets) > 1
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
