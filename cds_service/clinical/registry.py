"""The facts, declared once: what each is called, whether it is a red flag, which scenario group
it folds into, whether the decision reads it, how an answer settles it, and the value sets its
coded rule reads. Every other list of facts (the red flags a card names as checked, the order of
the evidence rows, the groups of the scenario, the facts a question may settle) derives from
this table.

A fact's name is the one the cards use (``cards/common.yaml`` ``facts.<name>``), the questions use
(``knowledge/questions.yaml`` ``fact: <name>``) and :class:`~cds_service.clinical.model.Facts`
holds it under.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum


class Scope(StrEnum):
    """When a diagnosis on the problem list counts for a fact (reasons on the order always do)."""

    HISTORY = "history"  # active or resolved, any date (cancer history)
    ACTIVE = "active"  # active, any date (immunosuppression, osteoporosis, devices)
    # active and dated in this episode (or in the recent window with no dated episode); active
    # and undated or older: unknown, never yes (red-flag symptoms)
    CURRENT = "current"
    RECENT = "recent"  # as CURRENT, and within the recent-trauma window too
    # active (any date), or resolved within the relapse window (a spinal infection treated in
    # the last 12 months)
    RELAPSE = "relapse"
    GESTATION = "gestation"  # active and dated within a pregnancy's length, or undated


# How a rule reads a fact (each rule is one function of cds_service.clinical.rules).
CODED = "coded"  # the value sets below, each in its scope, on the order and the problem list

# How a clinician's answer settles a fact (cds_service.clinical.answers).
FINDING = "finding"  # yes or no; a coded yes is never undone by an answer
DURATION = "duration"  # the pain duration category, when the record has no dated onset
CARE = "care"  # tried or not, and for how many weeks
CANDIDATE = "candidate"  # a surgery or injection candidate, when nothing is planned on record


@dataclass(frozen=True)
class FactSpec:
    """One fact of the clinical core."""

    name: str
    rule: str  # CODED, or the name of the fact's own rule
    red_flag: bool = False  # named among the red flags every card says were checked
    group: str | None = None  # the scenario's group of red flags it belongs to (v6, v7)
    decides: bool = False  # its value is read by the decision (else only shown, or derived)
    answer: str | None = None  # how a clinician's answer settles it (None: never asked)
    sets: tuple[tuple[str, Scope], ...] = ()  # value sets of a CODED rule, each in its scope
    # medication classes (knowledge: medication_classes) that count for a CODED rule while
    # ordered, each with the days of use it takes (0: any active order)
    medications: tuple[tuple[str, int], ...] = ()
    # procedure value sets that treat a finding: one completed after a finding recorded before
    # this episode makes that finding history (cauda equina two years ago, decompressed), not a
    # finding to ask about
    treated_by: tuple[str, ...] = ()
    # yes puts the order outside these criteria (no-criteria-apply, no card that steers away
    # from imaging); unknown is rated as no, so an unrecorded age or mechanism never leaves
    # every order undecidable (a cancel still needs it recorded as no)
    outside: bool = False
    # classes of substances (knowledge: medication_classes) an AllergyIntolerance names that
    # count for a CODED rule (an allergy to iodinated contrast media)
    allergies: tuple[str, ...] = ()
    # the contrast agents a yes makes a risk (CONTRASTS): a suggestion avoids them, and the card
    # says why; such a fact never decides the rating (it is not a variant of the criteria)
    avoids: tuple[str, ...] = ()

    @functools.cached_property
    def set_names(self) -> frozenset[str]:
        """The value sets of a CODED rule, without their scopes."""
        return frozenset(vs for vs, _ in self.sets)


# In the order of the evidence rows on a card.
FACTS: tuple[FactSpec, ...] = (
    FactSpec("indication", "indication", decides=True,
             sets=(("low_back_pain", Scope.ACTIVE), ("lumbar_degenerative", Scope.ACTIVE),
                   ("radiculopathy", Scope.ACTIVE))),
    FactSpec("radiculopathy", CODED, sets=(("radiculopathy", Scope.ACTIVE),)),
    FactSpec("duration", "duration", answer=DURATION),
    FactSpec("conservative_care", "care", answer=CARE),
    FactSpec("intervention_candidate", "candidate", decides=True, answer=CANDIDATE),
    FactSpec("cauda_equina", CODED, red_flag=True, decides=True, answer=FINDING,
             sets=(("cauda_equina", Scope.CURRENT), ("ces_bladder_bowel", Scope.CURRENT),
                   ("ces_sensory", Scope.CURRENT)),
             treated_by=("lumbar_surgery_procedure",)),
    FactSpec("neuro_deficit", CODED, red_flag=True, decides=True, answer=FINDING,
             sets=(("neuro_deficit", Scope.CURRENT),)),
    FactSpec("cancer", CODED, red_flag=True, group="v7", decides=True, answer=FINDING,
             sets=(("cancer", Scope.HISTORY), ("weight_loss", Scope.CURRENT))),
    FactSpec("infection", CODED, red_flag=True, group="v7", decides=True, answer=FINDING,
             sets=(("spinal_infection", Scope.RELAPSE), ("systemic_infection", Scope.CURRENT),
                   ("drug_use", Scope.ACTIVE))),
    FactSpec("immunosuppression", CODED, red_flag=True, group="v7", decides=True,
             answer=FINDING, sets=(("immunosuppression", Scope.ACTIVE),),
             medications=(("immunosuppressive_drugs", 0),)),
    FactSpec("prior_surgery", "prior_surgery", red_flag=True, decides=True, answer=FINDING,
             sets=(("prior_lumbar_surgery", Scope.HISTORY),)),
    FactSpec("trauma", CODED, red_flag=True, group="v6", decides=True, answer=FINDING,
             sets=(("recent_trauma", Scope.RECENT), ("ankylosed_trauma", Scope.RECENT))),
    FactSpec("osteoporosis", CODED, red_flag=True, group="v6", decides=True, answer=FINDING,
             sets=(("osteoporosis", Scope.ACTIVE),)),
    FactSpec("elderly", "age", red_flag=True, group="v6", decides=True),
    FactSpec("steroids", CODED, red_flag=True, group="v6", decides=True, answer=FINDING,
             sets=(("chronic_steroids", Scope.ACTIVE),),
             medications=(("systemic_corticosteroids", 90),)),  # 3 months: chronic use
    FactSpec("mri_safety", CODED, decides=True, answer=FINDING,
             sets=(("mri_safety", Scope.ACTIVE),)),
    FactSpec("recent_mri", "recent_mri"),
    # The population of the criteria: adults (CDS_ADULT_AGE), and not high-energy trauma (the
    # spine-trauma criteria apply). Low-velocity trauma in an ankylosed spine is in "trauma".
    FactSpec("child", "child", decides=True, outside=True),
    FactSpec("high_energy_trauma", CODED, decides=True, outside=True,
             sets=(("high_energy_trauma", Scope.RECENT),)),
    # Contrast safety: read as yes only from the record (unknown avoids nothing), never asked.
    FactSpec("pregnancy", CODED, sets=(("pregnancy", Scope.GESTATION),),
             avoids=("gadolinium",)),
    FactSpec("iodinated_allergy", CODED, sets=(("iodinated_contrast_allergy", Scope.ACTIVE),),
             allergies=("iodinated_contrast",), avoids=("iodinated", "intrathecal")),
    FactSpec("gadolinium_allergy", CODED,
             sets=(("gadolinium_contrast_allergy", Scope.ACTIVE),),
             allergies=("gadolinium_contrast",), avoids=("gadolinium",)),
    FactSpec("renal_impairment", CODED, sets=(("severe_renal_impairment", Scope.ACTIVE),),
             avoids=("gadolinium", "iodinated")),
)

BY_NAME = {spec.name: spec for spec in FACTS}
NAMES = tuple(spec.name for spec in FACTS)
CODED_FACTS = tuple(spec for spec in FACTS if spec.rule == CODED)
RED_FLAGS = tuple(spec.name for spec in FACTS if spec.red_flag)
# The red flags the scenario reads as one: any of them puts the patient in the group's variant.
GROUPS = {group: tuple(s.name for s in FACTS if s.group == group)
          for group in dict.fromkeys(s.group for s in FACTS if s.group)}
# The facts whose value the decision reads one by one (red flags too: the facts that decide a
# rating name the unknown members of a group).
DECISION_FACTS = tuple(spec.name for spec in FACTS if spec.decides)
OUTSIDE = tuple(spec.name for spec in FACTS if spec.outside)  # yes: no criteria apply
FINDINGS = tuple(spec.name for spec in FACTS if spec.answer == FINDING)
ASKED = frozenset(spec.name for spec in FACTS if spec.answer)  # a question may settle these
# Every value set a fact's row names (the rules read more: cds_service.clinical.rules).
ROW_VALUESETS = frozenset(vs for spec in FACTS for vs, _ in spec.sets)
MEDICATION_CLASSES = frozenset(cls for spec in FACTS for cls, _ in spec.medications)
ALLERGY_CLASSES = frozenset(cls for spec in FACTS for cls in spec.allergies)
# The contrast agents a study may carry (cds_service.clinical.scenario.agents_of): gadolinium
# (MRI with IV contrast), iodinated IV contrast (CT with IV contrast), intrathecal iodinated
# contrast (CT myelography).
CONTRASTS = ("gadolinium", "iodinated", "intrathecal")
CONTRAST_FACTS = tuple(spec.name for spec in FACTS if spec.avoids)
BACK_PAIN_MEDICATION = "back_pain_medication"  # a medication for back pain (conservative care)
OPAQUE = "unreadable"  # a record entry with nothing the service can read it by


def spec(name: str) -> FactSpec:
    """The registry row of a fact."""
    return BY_NAME[name]


# Value sets the rules read besides the rows' own.
LBP_SETS = frozenset({"low_back_pain", "radiculopathy", "lumbar_degenerative"})  # the indication
# Reasons that by themselves put a lumbar order on the low back pain pathway (V4 or outside V1-V3).
SPINAL_SETS = frozenset({"cauda_equina", "ces_bladder_bowel", "ces_sensory", "neuro_deficit"})
THERAPY_SETS = frozenset({"physical_therapy", "chiropractic"})  # conservative care
INTERVENTION_SETS = frozenset({"spine_injection", "lumbar_surgery_procedure", "spine_referral"})
SURGERY_SETS = frozenset({"prior_lumbar_surgery", "fusion_any_site", "lumbar_surgery_procedure"})
# The bladder symptoms a benign cause beside them discounts, and those causes (the episode rule).
BENIGN_SETS = frozenset({"ces_bladder", "bladder_benign_cause"})
# Add-on codes that name no region, and the other regions' primary codes (prior surgery's site).
ADDON_SETS = frozenset({"spine_addon_procedure", "spine_surgery_other_region"})
# Every value set the rules read by name: a knowledge copy must define each (a renamed set would
# otherwise match nothing, and a red flag would silently never count).
VALUESETS_READ = (ROW_VALUESETS | LBP_SETS | SPINAL_SETS | THERAPY_SETS | INTERVENTION_SETS
                  | SURGERY_SETS | BENIGN_SETS | ADDON_SETS)
# An order whose coded reasons fall in none of these names another indication.
REASON_SETS = LBP_SETS | SPINAL_SETS | frozenset(
    vs for spec in FACTS if spec.red_flag for vs, _ in spec.sets) | {"fusion_any_site"}
