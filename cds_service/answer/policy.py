"""The alert policy: which card, if any, one rated order gets (the card table of the design).

At most one card per order; nothing interruptive when the order is already right; a cancel only
for a routine order with every red flag recorded as absent. A pure function of the rated order
and the knowledge.
"""

from __future__ import annotations

from typing import NamedTuple

from cds_service.answer.rating import Rated
from cds_service.clinical.facts import Facts, Tri
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
    dated onset and no conservative care under way."""
    return (not facts.urgent and all(f.value is Tri.NO for f in facts.red_flags())
            and facts.duration_dated and facts.care_weeks is None
            and facts.care_states == ("none",))


def choose_card(rated: Rated, knowledge: Knowledge) -> CardChoice | None:
    """The card for one rated order, or None for no card."""
    proc, facts, decision = rated.procedure, rated.facts, rated.decision
    if facts.indication.value is Tri.NO or decision.pama == "no-criteria-apply":
        return None
    alts = decision.alternatives
    options = [a for a in alts if a.procedure.id not in rated.drafted] if isinstance(
        alts, tuple) else []
    mri_unsafe = proc.modality == "MR" and facts.mri_safety.value is Tri.YES
    # the ordered study gives a contrast the record makes a risk, and a study without it is
    # offered: an info card (never a warning: the order may be right for the scenario)
    contrast = (CardChoice("contrast-risk", options[:1])
                if options and agents_of(proc) & contrast_risks(facts) else None)
    if facts.cauda_equina.value is Tri.YES:
        if knowledge.category(proc.id, ("V4",)) == "UA":  # already the right study
            return mri_safety(facts, options) if mri_unsafe else contrast
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
