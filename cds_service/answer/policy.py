"""The alert policy: which card, if any, one rated order gets (the card table of the design).

At most one card per order; nothing interruptive when the order is already right; a cancel only
for a routine order with every red flag recorded as absent. A pure function of the rated order
and the knowledge.
"""

from __future__ import annotations

from typing import NamedTuple

from cds_service.answer.rating import Rated
from cds_service.clinical.facts import Facts, Tri
from cds_service.clinical.registry import OUTSIDE
from cds_service.clinical.scenario import CANCEL, Alternative, agents_of, contrast_risks
from cds_service.knowledge import Knowledge

MAY_BE = ("MBA", "MBA(D)")


class CardChoice(NamedTuple):
    """The card an order gets: its kind, the studies it suggests, whether it offers a cancel."""

    kind: str
    options: list[Alternative]
    cancel: bool = False


def may_cancel(facts: Facts) -> bool:
    """A cancel suggestion only for a routine order, with every red flag recorded as absent, a
    dated onset, no conservative care under way, and the patient known to be in the criteria's
    population (an adult; no high-energy trauma)."""
    return (not facts.urgent and all(f.value is Tri.NO for f in facts.red_flags())
            and all(facts.fact(n).value is Tri.NO for n in OUTSIDE)
            and facts.duration_dated and facts.care_weeks is None
            and facts.care_states == ("none",))


# Warning and critical cards keep their kind when the order is also a likely duplicate (their
# detail says so); an order that would get an info card, or none, gets the duplicate card.
KEEP_OVER_DUPLICATE = ("not-appropriate", "cauda-equina", "mri-safety")


def may_cancel_duplicate(facts: Facts) -> bool:
    """A cancel of a duplicate only for a routine order with every red flag recorded as absent
    (never where a red flag is possible, never for an urgent order)."""
    return not facts.urgent and all(f.value is Tri.NO for f in facts.red_flags())


def choose_card(rated: Rated, knowledge: Knowledge) -> CardChoice | None:
    """The card for one rated order, or None for no card: the card table's, or for a likely
    duplicate of a low back pain order the duplicate card (unless a warning or critical card
    says more; it names the duplicate in its detail)."""
    choice = rating_card(rated, knowledge)
    if rated.duplicate is None or (choice is not None and choice.kind in KEEP_OVER_DUPLICATE):
        return choice
    facts, dup = rated.facts, rated.duplicate
    if facts.indication.value is Tri.NO or rated.decision.pama == "no-criteria-apply":
        return choice  # not a low back pain order: these criteria say nothing of it
    if (dup.drafted and dup.procedure.id != rated.procedure.id
            and rated.decision.category == "UA"):
        return choice  # another MRI drafted beside the right one: that one is to reconsider
    return CardChoice("duplicate", [], may_cancel_duplicate(facts))


def rating_card(rated: Rated, knowledge: Knowledge) -> CardChoice | None:
    """The card the rating calls for (the card table without duplicates), or None."""
    proc, facts, decision = rated.procedure, rated.facts, rated.decision
    if facts.indication.value is Tri.NO or any(facts.fact(n).value is Tri.YES for n in OUTSIDE):
        return None  # not low back pain, a child, high-energy trauma: no card at all
    alts = decision.alternatives
    options = [a for a in alts if a.procedure.id not in rated.drafted] if isinstance(
        alts, tuple) else []
    if decision.pama == "no-criteria-apply":
        # only a new severe deficit outside V4-V7 carries a study (MRI for an X-ray or CT)
        return CardChoice("neuro-deficit", options[:1]) if options else None
    mri_unsafe = proc.modality == "MR" and facts.mri_safety.value is Tri.YES
    # the ordered study gives a contrast the record makes a risk, and a study without it is
    # offered: an info card (never a warning: the order may be right for the scenario)
    contrast = (CardChoice("contrast-risk", options[:1])
                if options and agents_of(proc) & contrast_risks(facts) else None)
    if facts.cauda_equina.value is Tri.YES:
        if knowledge.category(proc.id, ("V4",)) == "UA":  # already the right study
            # MRI unsafe: CT myelography only (CT without contrast does not show the cauda)
            myelo = [a for a in options if a.procedure.contrast == "intrathecal"]
            return mri_safety(facts, myelo) if mri_unsafe else contrast
        if facts.mri_safety.value is Tri.YES:  # MRI unsafe: CT myelography first
            if proc.contrast == "intrathecal":  # ... and it is what was ordered
                return contrast
            if any(knowledge.procedures[p].contrast == "intrathecal" for p in rated.drafted
                   if p in knowledge.procedures):
                options = []  # ... or drafted beside it: nothing second-best to offer
            options.sort(key=lambda a: a.procedure.contrast != "intrathecal")
        return CardChoice("cauda-equina", options[:1])
    if not decision.determinate:
        return CardChoice("missing-data", [])
    if decision.pama == "not-appropriate":
        if alts == CANCEL:
            if facts.urgent:
                return CardChoice("urgent-order", [])
            return CardChoice("not-appropriate", [], may_cancel(facts))
        return CardChoice("not-appropriate", options)
    if mri_unsafe:
        return mri_safety(facts, options)
    suspicion = decision.suspicion
    if suspicion is not None and suspicion.procedure.id not in rated.drafted:
        return CardChoice("suspicion", [suspicion])
    if decision.category in MAY_BE and options and options[0].category == "UA":
        return CardChoice("better-alternative", options[:1])
    if contrast:
        return contrast
    if (proc.modality == "MR" and facts.recent_mri.value is Tri.YES
            and not facts.surgery_planned):  # a surgeon's pre-operative MRI is no repeat
        return CardChoice("recent-mri", [])
    return None


def mri_safety(facts: Facts, options: list[Alternative]) -> CardChoice:
    """MRI ordered with an MRI-unsafe device on record: a warning with the studies that avoid
    MRI; an info reminder, with no change suggested, when an MRI was done with it in place."""
    if facts.device_scanned is not None:
        return CardChoice("mri-scanned", [])
    return CardChoice("mri-safety", options)
