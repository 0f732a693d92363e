"""Issue 21, classes 5, 6 and 14: cauda equina with an MRI safety concern, contrast where it is a
risk (pregnancy, iodinated or gadolinium contrast allergy, severe renal impairment or dialysis),
a pre-operative MRI and a device already scanned.

Properties over generated records, then the rules one by one.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.answer.policy import choose_card
from cds_service.answer.rating import Rated
from cds_service.api.hooks import SERVICES
from cds_service.clinical.facts import Tri
from cds_service.clinical.scenario import agents_of, possible_worlds, variants_of
from cds_service.engine import Engine, OrderResult
from cds_service.knowledge import load_knowledge
from cds_service.protocol import HookRequest
from cds_service.record import record_from_prefetch
from cds_service.record.prefetch import OPTIONAL_KEYS
from cds_service.render import load_templates
from tests.builders import (
    ICD,
    PATIENT,
    bundle,
    condition,
    day,
    hook_request,
    order,
    procedure,
    seed_prefetch,
    service_request,
)
from tests.conftest import FIXTURE_NOW, ROOT, dev_settings
from tests.test_clinical import rate

NOW = FIXTURE_NOW
KNOWLEDGE = load_knowledge()
ENGINE = Engine(KNOWLEDGE, load_templates(ROOT / "cards"), dev_settings())
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"

# (code, text): the contrast risks, the red flags that make contrast studies appropriate, devices
CODES = [("Z33.1", "Pregnant state"), ("Z3A.20", "20 weeks gestation"),
         ("O26.891", "Other pregnancy related conditions"), ("Z91.041", "Radiographic dye allergy"),
         ("Z91.048", "Gadolinium contrast allergy"), ("Z91.048", "Latex-free tape allergy"),
         ("N18.4", "CKD stage 4"), ("N18.6", "End stage renal disease"),
         ("Z99.2", "Dependence on renal dialysis"), ("N18.3", "CKD stage 3"),
         ("G83.4", "Cauda equina syndrome"), ("Z95.0", "Pacemaker"), ("Z96.82", "Neurostimulator"),
         ("C61", "Prostate cancer"), ("R50.9", "Fever"), ("M96.1", "Postlaminectomy"),
         ("M81.0", "Osteoporosis"), ("D84.9", "Immunodeficiency")]
ALLERGIES = ["Iohexol", "Iodinated contrast media", "Radiographic dye", "Gadobutrol",
             "Gadolinium-based contrast", "Penicillin", "Peanut", ""]
STUDIES = [("cpt", "72100"), ("cpt", "72148"), ("cpt", "72149"), ("cpt", "72158"),
           ("cpt", "72131"), ("cpt", "72132"), ("cpt", "72133"), ("loinc", "24965-6")]
GADOLINIUM = {"mri-w", "mri-wwo"}
IODINATED_IV = {"ct-w", "ct-wwo"}


def allergy(aid: str, text: str, verification: str = "confirmed",
            clinical: str = "active") -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "AllergyIntolerance", "id": aid,
        "clinicalStatus": {"coding": [{"code": clinical}]},
        "verificationStatus": {"coding": [{"code": verification}]},
        "patient": {"reference": f"Patient/{PATIENT}"}}
    if text:
        res["code"] = {"text": text}
    return res


def draft(oid: str, study: tuple[str, str], reason: str | None = "M54.16") -> dict[str, Any]:
    d = order(oid, cpt=study[1], reason=reason)
    if study[0] == "loinc":
        d["code"] = {"coding": [{"system": LOINC, "code": study[1]}]}
    return d


@st.composite
def hook_calls(draw: st.DrawFn) -> dict[str, Any]:
    prefetch = seed_prefetch(NOW)
    lbp = prefetch["conditions"]["entry"][0]["resource"]
    lbp["onsetDateTime"] = day(NOW, draw(st.sampled_from([5, 45, 112])))
    for i in range(draw(st.integers(0, 5))):
        code, text = draw(st.sampled_from(CODES))
        onset = draw(st.one_of(st.none(), st.sampled_from([1, 60, 200, 400, 1500])))
        cond = condition(f"x{i}", code, day(NOW, onset) if onset is not None else None,
                         status=draw(st.sampled_from(["active", "active", "resolved"])))
        cond["code"]["text"] = text
        prefetch["conditions"]["entry"].append({"resource": cond})
    allergies = [allergy(f"a{i}", draw(st.sampled_from(ALLERGIES)),
                         draw(st.sampled_from(["confirmed", "unconfirmed", "refuted",
                                               "entered-in-error"])),
                         draw(st.sampled_from(["active", "active", "inactive", "resolved"])))
                 for i in range(draw(st.integers(0, 2)))]
    mode = draw(st.sampled_from(["keep", "keep", "drop", "outcome"]))
    if mode == "keep":
        prefetch["allergies"] = bundle(*allergies)
    elif mode == "drop":
        del prefetch["allergies"]
    else:
        prefetch["allergies"] = {"resourceType": "OperationOutcome", "issue": []}
    if draw(st.booleans()):
        prefetch["procedures"]["entry"].append({"resource": procedure(
            "mri-old", "72148", day(NOW, draw(st.sampled_from([100, 500, 2000]))))})
    drafts = [draft(f"d{i}", draw(st.sampled_from(STUDIES)),
                    draw(st.sampled_from(["M54.16", "M54.50", "R33.9", "R50.9"])))
              for i in range(draw(st.integers(1, 2)))]
    return hook_request(*drafts, hook=draw(st.sampled_from(["order-select", "order-sign"])),
                        prefetch=prefetch)


def evaluate(body: dict[str, Any]) -> list[OrderResult]:
    request = HookRequest.model_validate(body)
    record = record_from_prefetch(request.prefetch, request.context.patientId)
    return ENGINE.answer(ENGINE.rate(request, record, NOW)).orders


def suggested(result: OrderResult) -> list[str]:
    """The studies the card suggests, in order."""
    out = []
    for card in result.cards:
        for s in card.suggestions or []:
            for a in s.actions:
                if a.type == "update" and a.resource is not None:
                    proc = KNOWLEDGE.procedure_of(a.resource["code"]["coding"])
                    assert proc is not None
                    out.append(proc.id)
    return out


def recommended(result: OrderResult) -> list[str]:
    out = []
    for card in result.cards:
        for s in card.suggestions or []:
            if s.isRecommended:
                out += [KNOWLEDGE.procedure_of(a.resource["code"]["coding"]).id  # type: ignore
                        for a in s.actions if a.type == "update" and a.resource is not None]
    return out


def yes(result: OrderResult, name: str) -> bool:
    return result.facts.fact(name).value is Tri.YES


PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(hook_calls())
def test_the_studies_offered_avoid_the_contrast_at_risk(body: dict[str, Any]) -> None:
    for r in evaluate(body):
        offered = set(suggested(r))
        if yes(r, "pregnancy") or yes(r, "gadolinium_allergy") or yes(r, "renal_impairment"):
            assert not offered & GADOLINIUM, (offered, r.kinds)
        if yes(r, "iodinated_allergy"):
            assert not offered & (IODINATED_IV | {"ct-myelo"}), offered
        if yes(r, "renal_impairment"):
            assert not offered & IODINATED_IV, offered


@PROPERTY
@given(hook_calls())
def test_with_pregnancy_on_record_no_recommended_suggestion_adds_gadolinium(
        body: dict[str, Any]) -> None:
    for r in evaluate(body):
        if yes(r, "pregnancy"):
            assert not set(recommended(r)) & GADOLINIUM


@PROPERTY
@given(hook_calls())
def test_with_cauda_equina_and_an_mri_safety_concern_ct_myelography_comes_first(
        body: dict[str, Any]) -> None:
    for r in evaluate(body):
        offered = suggested(r)
        if (yes(r, "cauda_equina") and yes(r, "mri_safety") and offered
                and not yes(r, "iodinated_allergy")):
            assert offered[0] == "ct-myelo", (offered, r.kinds)
        if yes(r, "cauda_equina") and yes(r, "mri_safety"):
            assert "ct-wo" not in offered[:1] or yes(r, "iodinated_allergy"), offered


@PROPERTY
@given(hook_calls())
def test_one_card_at_most_and_every_suggestion_ua_or_mba_in_every_world(
        body: dict[str, Any]) -> None:
    for r in evaluate(body):
        assert len(r.cards) <= 1
        worlds = [variants_of(w, r.facts.assume_candidate) for w in possible_worlds(r.facts)]
        for pid in suggested(r):
            for variants in worlds:
                if variants:
                    assert KNOWLEDGE.category(pid, variants) != "UNA", (pid, variants)


@PROPERTY
@given(hook_calls())
def test_a_contrast_risk_never_warns_on_an_order_usually_appropriate(
        body: dict[str, Any]) -> None:
    for r in evaluate(body):
        if r.kind == "contrast-risk":
            assert r.card is not None and r.card.indicator == "info"
            assert agents_of(r.procedure)  # only for a study that gives contrast


@PROPERTY
@given(hook_calls())
def test_the_allergies_key_absent_changes_no_rating_and_raises_no_card(
        body: dict[str, Any]) -> None:
    """Without the optional key a contrast allergy is unknown: it avoids nothing, so the answer
    is the one given for a record with no allergy on it."""
    prefetch = body["prefetch"]
    prefetch.pop("allergies", None)
    absent = evaluate(body)
    prefetch["allergies"] = bundle()
    empty = evaluate(body)
    assert [(r.decision.pama, r.decision.category, r.kind, suggested(r)) for r in absent] == [
        (r.decision.pama, r.decision.category, r.kind, suggested(r)) for r in empty]
    for r in absent:
        assert all(e.resource.startswith("Condition/")
                   for name in ("iodinated_allergy", "gadolinium_allergy")
                   for e in r.facts.fact(name).evidence)
        assert "allergies" not in r.rated.missing


# ------------------------------------------------------------------ contrast facts, one by one


def with_record(*conds: dict[str, Any], allergies: list[dict[str, Any]] | None = None,
                procedures: list[dict[str, Any]] = (),  # type: ignore[assignment]
                requests: list[dict[str, Any]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    p = seed_prefetch(NOW)
    p["conditions"]["entry"] += [{"resource": c} for c in conds]
    p["procedures"]["entry"] += [{"resource": c} for c in procedures]
    p["servicerequests"]["entry"] += [{"resource": c} for c in requests]
    if allergies is not None:
        p["allergies"] = bundle(*allergies)
    return p


@pytest.mark.parametrize(("verification", "clinical", "counts"), [
    ("confirmed", "active", True), ("unconfirmed", "active", True),
    ("refuted", "active", False), ("entered-in-error", "active", False),
    ("confirmed", "inactive", False), ("confirmed", "resolved", False)])
def test_an_allergy_counts_unless_refuted_or_no_longer_current(
        verification: str, clinical: str, counts: bool) -> None:
    facts, _ = rate(with_record(allergies=[allergy("a", "Iohexol", verification, clinical)]),
                    "mri-wo")
    assert facts.iodinated_allergy.value is (Tri.YES if counts else Tri.NO)


@pytest.mark.parametrize(("text", "iodinated", "gadolinium"), [
    ("Iohexol", True, False), ("Iopamidol 61% injection", True, False),
    ("IODINE", True, False), ("Contrast media", True, False), ("X-ray dye", True, False),
    ("Gadobutrol", False, True), ("MRI contrast media", False, True),
    ("Povidone-iodine", False, False), ("Penicillin", False, False)])
def test_allergy_names_are_read_by_substance_class(text: str, iodinated: bool,
                                                   gadolinium: bool) -> None:
    facts, _ = rate(with_record(allergies=[allergy("a", text)]), "mri-wo")
    assert (facts.iodinated_allergy.value is Tri.YES) is iodinated
    assert (facts.gadolinium_allergy.value is Tri.YES) is gadolinium


def test_the_allergies_key_absent_or_unreadable_leaves_the_allergy_unknown() -> None:
    facts, decision = rate(with_record(), "mri-wo")  # seed_prefetch sends an empty key
    assert facts.iodinated_allergy.value is Tri.NO
    absent = seed_prefetch(NOW)
    del absent["allergies"]
    facts, other = rate(absent, "mri-wo")
    assert facts.iodinated_allergy.value is Tri.UNKNOWN
    assert facts.gadolinium_allergy.value is Tri.UNKNOWN
    assert (other.pama, other.alternatives) == (decision.pama, decision.alternatives)
    facts, _ = rate(with_record(allergies=[allergy("a", "")]), "mri-wo")  # no name at all
    assert facts.iodinated_allergy.value is Tri.UNKNOWN
    assert "allergies" in OPTIONAL_KEYS


def test_the_discovery_asks_for_allergies() -> None:
    for service in SERVICES.values():
        assert service.prefetch["allergies"] == \
            "AllergyIntolerance?patient={{context.patientId}}"


def test_a_gadolinium_allergy_code_counts_only_with_its_text() -> None:
    named = condition("g", "Z91.048", day(NOW, 900))
    named["code"]["text"] = "Allergy to gadolinium contrast"
    facts, _ = rate(with_record(named), "mri-wo")
    assert facts.gadolinium_allergy.value is Tri.YES
    latex = condition("g", "Z91.048", day(NOW, 900))
    latex["code"]["text"] = "Allergy to adhesive tape"
    facts, _ = rate(with_record(latex), "mri-wo")
    assert facts.gadolinium_allergy.value is Tri.NO


@pytest.mark.parametrize(("code", "days", "counts"), [
    ("Z33.1", 100, True), ("Z3A.30", 5, True), ("O26.891", 60, True), ("Z33.1", 400, False),
    ("O90.89", 20, False), ("O80", 3, False)])
def test_pregnancy_counts_while_it_can_last(code: str, days: int, counts: bool) -> None:
    facts, _ = rate(with_record(condition("p", code, day(NOW, days))), "mri-wo")
    assert (facts.pregnancy.value is Tri.YES) is counts


def test_pregnancy_in_snomed_ct_counts() -> None:
    preg = condition("p", "x", day(NOW, 90))
    preg["code"] = {"coding": [{"system": SNOMED, "code": "77386006", "display": "Pregnancy"}]}
    facts, _ = rate(with_record(preg), "mri-wo")
    assert facts.pregnancy.value is Tri.YES


@pytest.mark.parametrize("code", ["N18.4", "N18.5", "N18.6", "Z99.2"])
def test_severe_renal_impairment_and_dialysis(code: str) -> None:
    facts, _ = rate(with_record(condition("r", code, day(NOW, 900))), "mri-wo")
    assert facts.renal_impairment.value is Tri.YES
    facts, _ = rate(with_record(condition("r", "N18.3", day(NOW, 900))), "mri-wo")
    assert facts.renal_impairment.value is Tri.NO


def test_contrast_facts_never_change_the_rating_or_the_scenario() -> None:
    cancer = condition("ca", "C61", day(NOW, 300))
    _, plain = rate(with_record(cancer), "mri-wwo")
    _, pregnant = rate(with_record(cancer, condition("p", "Z33.1", day(NOW, 60))), "mri-wwo")
    assert (plain.pama, plain.category, plain.variants) == (
        pregnant.pama, pregnant.category, pregnant.variants) == ("appropriate", "UA",
                                                                 frozenset({"V7"}))


def alternatives(decision: Any) -> list[str]:
    return [a.procedure.id for a in decision.alternatives]


@pytest.mark.parametrize(("risk", "ordered", "without", "with_risk"), [
    (condition("p", "Z33.1", day(NOW, 60)), "mri-w", ["mri-wwo"], ["mri-wo"]),
    (condition("g", "Z99.2", day(NOW, 900)), "mri-w", ["mri-wwo"], ["mri-wo"]),
    (condition("d", "Z91.041", day(NOW, 900)), "ct-wwo", ["mri-wwo"], ["mri-wwo"]),
])
def test_the_alternative_avoids_the_contrast_at_risk(risk: dict[str, Any], ordered: str,
                                                     without: list[str],
                                                     with_risk: list[str]) -> None:
    cancer = condition("ca", "C61", day(NOW, 300))
    _, plain = rate(with_record(cancer), ordered)
    _, risky = rate(with_record(cancer, risk), ordered)
    assert alternatives(plain) == without
    assert alternatives(risky) == with_risk


def test_an_iodinated_allergy_with_mri_unsafe_offers_ct_without_contrast() -> None:
    base = (condition("ca", "C61", day(NOW, 300)), condition("pm", "Z95.0", day(NOW, 900)))
    _, plain = rate(with_record(*base), "mri-wwo")
    assert alternatives(plain)[0] == "ct-w"  # the contrast intent
    _, allergic = rate(with_record(*base, allergies=[allergy("a", "Iohexol")]), "mri-wwo")
    assert "ct-w" not in alternatives(allergic) and "ct-myelo" not in alternatives(allergic)
    assert alternatives(allergic)[0] == "ct-wo"


def test_no_ua_study_left_offers_the_best_mba_one_without_that_contrast() -> None:
    """Cauda equina, a pacemaker and an iodinated contrast allergy: no MRI, no CT myelography:
    CT without contrast (may be appropriate), never a study usually not appropriate."""
    conds = (condition("ces", "G83.4", day(NOW, 1)), condition("pm", "Z95.0", day(NOW, 900)))
    _, decision = rate(with_record(*conds, allergies=[allergy("a", "Iohexol")]),
                       "xr-lumbar")
    assert alternatives(decision) == ["ct-wo"]
    assert all(a.category == "MBA" for a in decision.alternatives)


# ------------------------------------------------------------------ the cards


def card_of(prefetch: dict[str, Any], cpt: str, reason: str = "M54.16",
            system: str = "cpt") -> OrderResult:
    (result,) = evaluate(hook_request(draft("d0", (system, cpt), reason), prefetch=prefetch))
    return result


def test_an_ordered_study_giving_the_contrast_at_risk_gets_an_info_card() -> None:
    r = card_of(with_record(condition("ca", "C61", day(NOW, 300)),
                            condition("p", "Z33.1", day(NOW, 60))), "72158")
    assert r.kind == "contrast-risk" and r.card is not None and r.card.indicator == "info"
    assert suggested(r) == ["mri-wo"] and recommended(r) == ["mri-wo"]
    assert "Pregnancy on record" in r.card.summary
    assert "Without gadolinium contrast: Pregnant state (Z33.1) on record" in (r.card.detail
                                                                             or "")


def test_the_card_says_why_in_one_line() -> None:
    r = card_of(with_record(condition("ca", "C61", day(NOW, 300)),
                            condition("p", "Z33.1", day(NOW, 60))), "72149")
    assert r.kind == "not-appropriate" and suggested(r) == ["mri-wo"]
    assert ("**Contrast**: Without gadolinium contrast: Pregnant state (Z33.1) on record."
            in (r.card.detail or ""))
    seed = card_of(seed_prefetch(NOW), "72149")
    assert "**Contrast**" not in (seed.card.detail or "")  # type: ignore[union-attr]


def test_cauda_equina_pacemaker_mri_gets_ct_myelography_and_no_card_for_it() -> None:
    conds = (condition("ces", "G83.4", day(NOW, 1)), condition("pm", "Z95.0", day(NOW, 900)))
    mri = card_of(with_record(*conds), "72148")
    assert mri.kind == "mri-safety" and suggested(mri)[0] == "ct-myelo"
    ct = card_of(with_record(*conds), "72131")
    assert ct.kind == "cauda-equina" and suggested(ct) == ["ct-myelo"]
    myelo = card_of(with_record(*conds), "24965-6", system="loinc")
    assert myelo.kind is None  # CT myelography is the study when MRI may be unsafe


# ------------------------------------------------------------------ recent MRI, scanned device


RECENT_MRI = procedure("mri-prev", "72148", day(NOW, 120))


def planned_surgery() -> dict[str, Any]:
    surgery = procedure("lami", "63047", day(NOW, -10))
    surgery["status"] = "preparation"
    return surgery


def surgery_order() -> dict[str, Any]:
    return {**service_request("fusion", "22630", day(NOW, 5)), "status": "active"}


def surgery_referral() -> dict[str, Any]:
    ref = {**service_request("ref", "99243", day(NOW, 20)), "status": "active"}
    ref["category"] = [{"text": "referral"}]
    ref["reasonCode"] = [{"coding": [{"system": ICD, "code": "M54.16"}]}]
    return ref


def test_a_recent_mri_gets_its_info_card() -> None:
    assert card_of(with_record(procedures=[RECENT_MRI]), "72148").kind == "recent-mri"


@pytest.mark.parametrize("plan", ["procedure", "order", "referral"])
def test_no_recent_mri_card_when_surgery_is_planned(plan: str) -> None:
    record = {"procedure": with_record(procedures=[RECENT_MRI, planned_surgery()]),
              "order": with_record(procedures=[RECENT_MRI], requests=[surgery_order()]),
              "referral": with_record(procedures=[RECENT_MRI],
                                      requests=[surgery_referral()])}[plan]
    r = card_of(record, "72148")
    assert r.facts.recent_mri.value is Tri.YES and r.facts.surgery_planned
    assert r.kind is None


def test_a_surgery_long_done_is_no_plan() -> None:
    old = service_request("fusion", "22630", day(NOW, 900))
    old["status"] = "completed"
    r = card_of(with_record(procedures=[RECENT_MRI], requests=[old]), "72148")
    assert not r.facts.surgery_planned and r.kind == "recent-mri"


def test_a_device_scanned_since_it_was_recorded_gets_an_info_reminder() -> None:
    pm = condition("pm", "Z95.0", day(NOW, 1200))
    scanned = card_of(with_record(pm, procedures=[procedure("m", "72148", day(NOW, 500))]),
                      "72148")
    assert scanned.kind == "mri-scanned" and scanned.card is not None
    assert scanned.card.indicator == "info" and not scanned.card.suggestions
    assert day(NOW, 500) in scanned.card.summary
    before = card_of(with_record(pm, procedures=[procedure("m", "72148", day(NOW, 1500))]),
                     "72148")
    assert before.kind == "mri-safety" and before.card.indicator == "warning"  # type: ignore
    undated = condition("pm", "Z95.0", None)
    unknown = card_of(with_record(undated, procedures=[procedure("m", "72148", day(NOW, 500))]),
                      "72148")
    assert unknown.kind == "mri-safety"  # an undated device may be newer than the scan


def test_choose_card_is_the_one_policy() -> None:
    """The engine's card is the policy's choice (no second path for the new kinds)."""
    r = card_of(with_record(condition("ca", "C61", day(NOW, 300)),
                            condition("p", "Z33.1", day(NOW, 60))), "72158")
    rated: Rated = r.rated
    choice = choose_card(rated, KNOWLEDGE)
    assert choice is not None and choice.kind == r.kind
