"""A card from the templates of its kind (``cards/``): the context a template reads, the
suggestions, the override reasons and the link to the SMART app that asks what the record leaves
open."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any, ClassVar

import orjson

from cds_service.answer.payloads import Payloads
from cds_service.answer.policy import CardChoice
from cds_service.answer.rating import Rated
from cds_service.clinical.answers import denies, is_attested
from cds_service.clinical.facts import Evidence, Facts, Tri
from cds_service.clinical.registry import (
    CONTRAST_FACTS,
    CONTRASTS,
    GROUPS,
    NAMES,
    RED_FLAGS,
    spec,
)
from cds_service.clinical.rules import NOT_IN_EPISODE
from cds_service.clinical.scenario import (
    CANCEL,
    Alternative,
    Decision,
    agents_of,
    contrast_risks,
    rated_by,
)
from cds_service.codesystems import SystemUrls
from cds_service.ids import new_uuid
from cds_service.knowledge import CATEGORY_RANK, Knowledge, Procedure
from cds_service.nonadherence import SYSTEM as NON_ADHERENCE
from cds_service.protocol import Action, Card, CardSource, Coding, Link, Suggestion
from cds_service.questionnaire import Questions, questions_to_ask
from cds_service.render import (
    SCENARIO_MISSING,
    CardTemplates,
    TemplateProblem,
    check_summaries,
    literal,
)
from cds_service.settings import Settings

ASKING_KINDS = ("missing-data", "not-appropriate")  # cards that link to the questions
SOURCE_NAMES = {"patient": "demographics", "conditions": "problem list",
                "procedures": "procedures", "servicerequests": "orders and referrals",
                "medications": "medication orders", "allergies": "allergies"}
# Findings that set the scenario without being red flags (a card never calls them so).
SCENARIO_FINDINGS = ("prior_surgery", "elderly")
FLAGS = tuple(n for n in RED_FLAGS if n not in SCENARIO_FINDINGS)
FRACTURE_RISK = tuple(n for n in GROUPS["v6"] if n in FLAGS)  # checked as one: "fracture risk"
# A SNOMED CT semantic tag at the end of a display ("Low back pain (finding)")
SEMANTIC_TAG = re.compile(r"\s+\((finding|disorder|procedure|situation|regime/therapy|"
                          r"observable entity|morphologic abnormality|physical object|event|"
                          r"product|substance|medicinal product)\)$")
SPAN_LONGEST = len("less than a day")  # of _span's words ("over 99 years" is shorter)
MAX_SOURCES = 3  # resources named in a row of findings; more are counted


def _bare(words: str, code: str) -> bool:
    """The words are only the code ("Z95.0", "z950")."""
    def norm(text: str) -> str:
        return re.sub(r"[\s.]", "", text).upper()
    return bool(code) and norm(words) == norm(code)


def finding_name(e: Evidence, knowledge: Knowledge | None = None,
                 fallback: str | None = None) -> str:
    """A finding in words (not escaped): the record's text, else the coding's display, else the
    knowledge's display of the code, else ``fallback`` (the fact's name); never the bare code."""
    for words in (e.text, e.display):
        if words and not _bare(words, e.code):
            return SEMANTIC_TAG.sub("", " ".join(words.split()))
    known = knowledge.display_of(e.system, e.code) if knowledge is not None else None
    return known or fallback or e.code or e.resource


def finding(e: Evidence, knowledge: Knowledge | None = None, fallback: str | None = None) -> str:
    """A finding in words with its code after it, as markdown: "Pacemaker (Z95.0)"."""
    name = literal(finding_name(e, knowledge, fallback))
    return f"{name} ({literal(e.code)})" if e.code else name


def _days_since(day: str | None, now: datetime | None) -> int:
    if not day or now is None:
        return 0
    try:
        return max(0, (now.date() - date.fromisoformat(day)).days)
    except ValueError:
        return 0


def _onset_days(facts: Facts, now: datetime | None) -> int:
    onset = [e for e in facts.duration.evidence if e.date and not is_attested(e)]
    return max((_days_since(e.date, now) for e in onset), default=0)


def span_words(days: int) -> str:
    """A time in words ("less than a day", "1 day", "10 days", "14 weeks", "over 2 years")."""
    if days < 1:
        return "less than a day"
    if days < 28:
        return f"{days} day" + ("s" if days != 1 else "")
    if days < 365:
        return f"{days // 7} weeks"
    years = days // 365
    return f"over {years} year" + ("s" if years != 1 else "")


def _span(facts: Facts, now: datetime | None) -> str:
    """The time since the recorded onset of the pain ("10 days", "14 weeks")."""
    return span_words(_onset_days(facts, now))


def _key(e: Evidence, knowledge: Knowledge) -> tuple[Any, ...]:
    """What makes two pieces of evidence the same finding: its code (the order's reason and
    the problem list's entry are one), else its resource and words."""
    stale = e.role.endswith(NOT_IN_EPISODE)
    if e.code:
        return (knowledge.normalize(e.system, e.code) or (e.system, e.code), stale)
    return (e.resource, e.display, stale)


class Names:
    """Each piece of evidence in words (``finding``) and as a finding (``_key``), worked out once
    per process: a card names the same few codes again and again."""

    LIMIT: ClassVar[int] = 8192  # entries kept (cleared when full)

    def __init__(self, knowledge: Knowledge):
        self.knowledge = knowledge
        self._found: dict[tuple[Evidence, str | None], tuple[tuple[Any, ...], str]] = {}

    def __call__(self, e: Evidence, fallback: str | None) -> tuple[tuple[Any, ...], str]:
        """(what makes it one finding, its name in words with its code, as markdown)."""
        found = self._found.get((e, fallback))
        if found is None:
            if len(self._found) >= self.LIMIT:
                self._found.clear()
            found = self._found[(e, fallback)] = (_key(e, self.knowledge),
                                                  finding(e, self.knowledge, fallback))
        return found


def evidence_rows(facts: Facts, templates: CardTemplates, names: Names,
                  this_order: str) -> list[dict[str, Any]]:
    """One row per finding, in the registry's order: its name in words with its code, every
    fact it supports, its dates and its sources together."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for name in NAMES:
        fact = facts.fact(name)
        if not fact.evidence:
            continue
        label = templates.fact_label(fact.name)
        for e in fact.evidence:
            key, words = names(e, label)
            row = rows.setdefault(key, {  # (dicts as ordered sets: a finding recorded
                "finding": words, "labels": {}, "dates": {},  # 1,500 times is one row)
                "sources": {}, "stale": e.role.endswith(NOT_IN_EPISODE)})
            row["labels"][label] = None
            if e.date:
                row["dates"][e.date] = None
            where = ("this-order" if e.resource == this_order
                     else e.resource.partition("/")[0])
            row["sources"][templates.phrase(f"source-{where}")] = None
    return [_row(r, templates) for r in rows.values()]


def _row(r: dict[str, Any], templates: CardTemplates) -> dict[str, Any]:
    # non-breaking hyphens: a date never wraps in a narrow table cell
    dates = sorted(d.replace("-", "\u2011") for d in r["dates"])
    day = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}" if dates else ""
    if r["stale"]:  # counted as unknown: say why
        day = templates.phrase("date-before-episode", date=day) if day \
            else templates.phrase("date-undated")
    sources = list(r["sources"])
    shown = sources if len(sources) <= MAX_SOURCES else [
        *sources[:MAX_SOURCES - 1], f"{len(sources) - MAX_SOURCES + 1} more"]
    return {"finding": r["finding"], "label": ", ".join(r["labels"]), "date": day,
            "source": ", ".join(shown),
            "recorded": ", ".join(p for p in (day, ", ".join(shown)) if p)}


class CardBuilder:
    """Renders the card an order gets, with its suggestions and links."""

    def __init__(self, knowledge: Knowledge, templates: CardTemplates, questions: Questions,
                 settings: Settings, systems: SystemUrls, payloads: Payloads):
        unlabelled = [n for n in NAMES if n not in templates.facts]
        if unlabelled:
            raise TemplateProblem(
                f"cards/common.yaml: facts lacks {', '.join(unlabelled)}: every fact of the "
                "rules needs a label (and what to document when it is unknown)")
        self.knowledge = knowledge
        self.names = Names(knowledge)
        self._studies: dict[tuple[frozenset[str], str], list[dict[str, Any]]] = {}
        self.templates = templates
        self.questions = questions
        self.settings = settings
        self.payloads = payloads
        self.source = CardSource(label=templates.source["label"],
                                 url=templates.source.get("url") or None)
        self._duration_answers = {code: display for q in questions.items
                                  if q.fact == "duration" for code, display in q.answers}
        unnamed = [v for v in knowledge.variants if v not in templates.scenarios]
        if unnamed:
            common = templates.directory / "common.yaml" if templates.directory \
                else "cards/common.yaml"
            raise SCENARIO_MISSING.fail(common, "scenarios", name=unnamed[0],
                                        all=", ".join(knowledge.variants))
        check_summaries(templates, self.summary_bounds())
        # card kind -> the override reasons its cards offer (the same on every card): the
        # service's own first, then the HL7 Non-Adherence Reason codes that fit the card
        self._reasons = {kind: [Coding(system=systems.override_reason, code=r["code"],
                                       display=r["display"]) for r in k.override_reasons]
                         + [Coding(system=NON_ADHERENCE, code=r["code"], display=r["display"])
                            for r in k.non_adherence]
                         for kind, k in templates.kinds.items()}

    def card(self, rated: Rated, choice: CardChoice) -> Card:
        """The card of the chosen kind, with a suggestion per option and the cancel."""
        t, kind = self.templates, choice.kind
        first = choice.options[0] if choice.options else None
        ctx = self.context(rated, first, choice.cancel, kind)
        suggestions = [self._suggestion(rated, kind, ctx, alt, i == 0)
                       for i, alt in enumerate(choice.options)]
        if choice.cancel:
            suggestions.append(Suggestion(
                label=t.render(kind, "cancel_label", ctx) or "Cancel the order",
                uuid=new_uuid(),
                actions=[Action(type="delete",
                                description=t.render(kind, "cancel_description", ctx)
                                or "Remove the draft order",
                                resourceId=f"ServiceRequest/{rated.order.get('id')}")]))
        reasons = self._reasons[kind]
        links = self._app_link(kind, rated)
        return Card(
            uuid=new_uuid(),
            summary=t.render(kind, "summary", ctx) or rated.procedure.name,
            indicator=t.kinds[kind].indicator,  # type: ignore[arg-type]
            source=self.source,
            detail=t.render(kind, "detail", ctx) or None,
            suggestions=suggestions or None,
            selectionBehavior="at-most-one" if suggestions else None,
            overrideReasons=reasons or None,
            links=links or None)

    def _suggestion(self, rated: Rated, kind: str, ctx: dict[str, Any], alt: Alternative,
                    first: bool) -> Suggestion:
        t = self.templates
        sctx = {**ctx, "suggestion": self._alt(alt.procedure, alt.category)}
        return Suggestion(
            label=t.render(kind, "suggestion_label", sctx) or alt.procedure.name,
            uuid=new_uuid(),
            isRecommended=True if first and alt.category == "UA" else None,
            actions=[Action(type="update",
                            description=t.render(kind, "action_description", sctx)
                            or f"Order {alt.procedure.name}",
                            resource=self.payloads.replacement(rated, alt))])

    # ------------------------------------------------------------------ the template context

    def context(self, rated: Rated, suggestion: Alternative | None, cancel: bool,
                kind: str) -> dict[str, Any]:
        """Every variable a card template may read (``render.sample_context`` lists them)."""
        t = self.templates
        order, proc, facts, decision = rated.order, rated.procedure, rated.facts, rated.decision
        document, not_sent = self._missing(rated)
        mri = facts.recent_mri.evidence[0] if facts.recent_mri.evidence else None
        devices = ", ".join(sorted({self.names(e, t.fact_label("mri_safety"))[1]
                                    for e in facts.mri_safety.evidence if not denies(e)})) \
            if facts.mri_safety.value is Tri.YES else ""
        # candidacy assumed after failed care: said only where it drives the answer and the
        # care is on record as done (not where the record leaves the care open)
        assumed = [(code, params) for code, params in facts.assumptions
                   if code != "candidate-after-failed-care"
                   or (decision.assumption_drives and facts.care_states == ("done",))]
        category = decision.category
        alts = decision.alternatives
        already = next((a.procedure for a in alts if a.procedure.id in rated.drafted),
                       None) if isinstance(alts, tuple) and not suggestion else None
        variants = sorted(decision.variants or ())
        return {
            "kind": kind,
            "order": {"id": order.get("id"), "name": proc.name, "short": proc.short_name,
                      "priority": self._priority(order)},
            "rating": {"pama": decision.pama, "category": category,
                       "category_label": t.categories.get(category or "", "not rated")},
            "scenario": self._scenario(decision),
            # one variant: its id and short name (summaries); several: empty
            "scenario_id": variants[0] if len(variants) == 1 else "",
            "scenario_short": t.scenarios.get(variants[0], "") if len(variants) == 1 else "",
            "span": self._span_summary(facts, rated.now),
            "why": self._why(facts, rated.now, self._age_note(rated, kind)),
            # determinately outside every variant (a severe neurological deficit alone)
            "outside": decision.variants is not None and not decision.variants,
            "conditional": t.phrase("if-candidate") if decision.assumption_rates else "",
            "suggest_if": t.phrase("suggest-if-candidate")
            if decision.assumption_suggests and not decision.assumption_rates else "",
            "suggestion": self._alt(suggestion.procedure, suggestion.category)
            if suggestion else None,
            "cancel": cancel, "alternatives": self._alternatives(decision, proc),
            "evidence": evidence_rows(facts, t, self.names,
                                      f"ServiceRequest/{order.get('id')}"),
            "assumptions": [t.assumption(code, params) for code, params in assumed],
            "missing": document,
            "missing_first": document[0]["document"] if document else "the patient's history",
            "missing_label": " and ".join(m["label"].lower() for m in document[:2])
            or "the patient's history",
            "missing_text": "; ".join(m["document"] for m in document)
            or "the patient's history",
            "devices": devices or "an implant", "device_found": bool(devices),
            "device_short": self._device_short(facts),
            "unavailable": ", ".join(not_sent),
            "care": self._care_text(facts),
            "recent": {"date": mri.date, "resource": mri.resource} if mri else None,
            "already": already.name if already else None,
            "already_short": already.short_name if already else "",
            "duplicate": self._duplicate(rated),
            "suspected": " and ".join(t.fact_short(n) for n in GROUPS["v7"]
                                      if facts.fact(n).value is Tri.YES)
            or "cancer, infection or immunosuppression",
            **self._contrast(facts, proc, decision),
            "scanned": {"date": facts.device_scanned.date,
                        "resource": facts.device_scanned.resource}
            if facts.device_scanned else None,
        }

    @staticmethod
    def _duplicate(rated: Rated) -> dict[str, Any] | None:
        """The order this one likely duplicates, for the templates."""
        dup = rated.duplicate
        if dup is None:
            return None
        return {"resource": dup.resource, "name": dup.procedure.name,
                "short": dup.procedure.short_name, "date": dup.date, "drafted": dup.drafted}

    @staticmethod
    def _age_note(rated: Rated, kind: str) -> bool:
        """The card tells the clinician no imaging is needed yet, by criteria for adults, and
        the age is not recorded as adult (so no cancel is offered)."""
        return (kind in ("not-appropriate", "urgent-order")
                and rated.decision.alternatives == CANCEL
                and rated.facts.child.value is Tri.UNKNOWN)

    def _contrast(self, facts: Facts, proc: Procedure, decision: Decision) -> dict[str, str]:
        """The line that says why the study offered avoids a contrast ("Without gadolinium
        contrast: Pregnant state (Z33.1) on record"), when the ordered study or one of the
        scenario's gives a contrast the record makes a risk; and the findings in a word."""
        avoid = contrast_risks(facts)
        if not avoid:
            return {"contrast": "", "contrast_reason": ""}
        studies = [proc]
        if decision.variants:
            studies += [p for p in self.knowledge.procedures.values()
                        if self.knowledge.category(p.id, rated_by(decision.variants)) != "UNA"]
        given = frozenset().union(*(agents_of(p) for p in studies)) & avoid
        if not given:
            return {"contrast": "", "contrast_reason": ""}
        t = self.templates
        found = [facts.fact(n) for n in CONTRAST_FACTS if facts.fact(n).value is Tri.YES
                 and given & set(spec(n).avoids)]
        named: dict[tuple[Any, ...], str] = {}
        for f in found:
            for e in f.evidence:
                key, words = self.names(e, t.fact_label(f.name))
                named.setdefault(key, words)
        findings = list(named.values())
        agents = " or ".join(t.phrase(f"contrast-{a}") for a in CONTRASTS if a in given)
        return {"contrast": t.phrase("contrast-risk", contrast=agents,
                                     found="; ".join(findings)),
                "contrast_reason": " and ".join(t.fact_label(f.name).lower() for f in found)
                if len(found) <= 2 else t.phrase("contrast-risks")}

    def _scenario(self, decision: Decision) -> str | None:
        if not decision.variants:
            return None
        names = self.templates.scenarios
        return "; ".join(f"{names.get(v) or self.knowledge.variants[v]} ({v})"
                         for v in sorted(decision.variants))

    def _alternatives(self, decision: Decision, proc: Procedure) -> list[dict[str, Any]]:
        """The studies not usually inappropriate in the scenario, best first (a pure function
        of the knowledge: worked out once per scenario and ordered study)."""
        if not decision.variants:
            return []
        key = (frozenset(decision.variants), proc.id)
        found = self._studies.get(key)
        if found is None:
            if len(self._studies) >= Names.LIMIT:
                self._studies.clear()
            found = self._studies[key] = self._rated_studies(decision, proc)
        return found

    def _rated_studies(self, decision: Decision, proc: Procedure) -> list[dict[str, Any]]:
        variants = rated_by(decision.variants or frozenset())
        rated = [(p, self.knowledge.category(p.id, variants))
                 for p in self.knowledge.procedures.values()
                 if p.region == "lumbar" or p is proc]  # the ordered study is always listed
        rated = [(p, c) for p, c in rated if c != "UNA"]
        rated.sort(key=lambda pc: (-CATEGORY_RANK[pc[1]], pc[0].rrl_rank, pc[0].preference))
        return [self._alt(p, c) for p, c in rated]

    def _missing(self, rated: Rated) -> tuple[list[dict[str, str]], list[str]]:
        """What the clinician should document, and what the EHR did not send (said apart)."""
        t, facts = self.templates, rated.facts
        document, not_sent = [], []
        for name in rated.decision.deciding:
            sources = [SOURCE_NAMES[m] for m in facts.fact(name).missing if m in SOURCE_NAMES]
            if sources:
                not_sent += [s for s in sources if s not in not_sent]
            else:
                document.append({"name": name, "label": t.fact_label(name),
                                 "document": t.fact_document(name)})
        for key in rated.missing:
            if SOURCE_NAMES[key] not in not_sent:
                not_sent.append(SOURCE_NAMES[key])
        return document, not_sent

    def _why(self, facts: Facts, now: datetime | None, age_unknown: bool = False) -> str:
        """The first line of every card: what the rating rests on, and what was checked."""
        t = self.templates
        parts = [self._duration_text(facts, now)]
        flags = [facts.fact(n) for n in FLAGS]
        found = [f for f in flags if f.value is Tri.YES]
        unknown = [f for f in flags if f.value is Tri.UNKNOWN]
        if found:
            parts.append(t.phrase("red-flags", found="; ".join(
                self._named(f.name, f.evidence) for f in found)))
        elif unknown:
            parts.append(t.phrase("red-flags-unknown", unknown=", ".join(
                t.fact_short(f.name) for f in unknown)))
        else:
            # "fracture risk" names trauma, osteoporosis and steroid use as one; beside an age
            # that is fracture risk by itself (V6), each is named, so that the line never says
            # fracture risk was checked and not found while the card rates by it
            if facts.fact("elderly").value is Tri.YES:
                checked = [t.fact_short(n) for n in FLAGS]
            else:
                checked = [t.phrase("fracture-risk") if n == FRACTURE_RISK[0]
                           else t.fact_short(n) for n in FLAGS if n not in FRACTURE_RISK[1:]]
            parts.append(t.phrase("no-red-flags", checked=", ".join(checked)))
        # prior lumbar surgery and age set the scenario: findings, never red flags
        seen = [facts.fact(n) for n in SCENARIO_FINDINGS if facts.fact(n).value is Tri.YES]
        if seen:
            parts.append(t.phrase("on-record", found="; ".join(
                self._named(f.name, f.evidence, plain=f.name == "elderly") for f in seen)))
        if facts.unreadable:
            parts.append(t.phrase("unreadable", entries="; ".join(
                literal(finding_name(e)) for e in facts.unreadable)))
        parts += [self._conflict_text(facts, code, params, now)
                  for code, params in facts.conflicts]
        if age_unknown:
            parts.append(t.phrase("age-unknown"))
        if facts.urgent:
            parts.append(t.phrase("urgent"))
        return "; ".join(p for p in parts if p) + "."

    def _named(self, name: str, evidence: list[Evidence], plain: bool = False) -> str:
        """A fact and its findings ("cauda equina symptoms: Urinary retention (R33.9)"); the
        findings alone when they name it already (``plain``: "age 78")."""
        short, found = self.templates.fact_short(name), self._findings(name, evidence)
        if not found:
            return short
        return found if plain else f"{short}: {found}"

    def _findings(self, name: str, evidence: list[Evidence]) -> str:
        """The findings behind a fact in words with their codes, each once."""
        label = self.templates.fact_label(name)
        named: dict[tuple[Any, ...], str] = {}
        for e in evidence:
            if not denies(e):
                key, words = self.names(e, label)
                named.setdefault(key, words)
        return ", ".join(named.values())

    def _conflict_text(self, facts: Facts, code: str, params: dict[str, Any],
                       now: datetime | None) -> str:
        """An answer that disagrees with the record, in words (the record is used)."""
        answered = str(params.get("answered", ""))
        if code == "conflict-duration":
            answered = self._duration_answers.get(answered, answered).lower()
        return self.templates.phrase(code, answered=answered, day=params.get("day"),
                                     span=_span(facts, now))

    def _attested(self, facts: Facts) -> str | None:
        """The clinician's answer of the pain's duration, in words, when it settles it."""
        if any(is_attested(e) for e in facts.duration.evidence) \
                and len(facts.duration_categories) == 1:
            (category,) = facts.duration_categories
            return self._duration_answers.get(category, category).lower()
        return None

    def _duration_text(self, facts: Facts, now: datetime | None) -> str:
        t = self.templates
        said = [e for e in facts.duration.evidence if is_attested(e)]
        attested = self._attested(facts)
        if attested:
            return t.phrase("duration-attested", span=attested, day=said[0].date)
        if not any(e.date for e in facts.duration.evidence):
            return t.phrase("duration-unknown")
        days = _onset_days(facts, now)
        if facts.duration_dated and days < 2:
            return t.phrase("duration-yesterday" if days else "duration-today")
        if not facts.duration_dated and days < 1:
            return t.phrase("duration-bound-today")
        return t.phrase("duration" if facts.duration_dated else "duration-bound",
                        span=span_words(days))

    def _span_summary(self, facts: Facts, now: datetime | None) -> str:
        """The pain's duration for a summary ("10 days"), empty when not known."""
        attested = self._attested(facts)
        if attested:
            return attested
        if not facts.duration_dated:
            return ""
        return span_words(_onset_days(facts, now))

    def _care_text(self, facts: Facts) -> str:
        t = self.templates
        needed = self.settings.conservative_care_weeks
        if facts.care_weeks is None:
            # said only where care can matter: not for pain known to be acute
            matters = bool(facts.duration_categories - {"acute"})
            return "" if facts.conservative_care.value is Tri.UNKNOWN or not matters \
                else t.phrase("care-none")
        weeks = int(facts.care_weeks)
        if weeks >= needed:
            return t.phrase("care-done", weeks=weeks)
        return t.phrase("care-under-way", weeks=weeks, needed=needed)

    def _device_short(self, facts: Facts) -> str:
        """The first MRI-unsafe device in the knowledge's words (bounded: for a summary)."""
        if facts.mri_safety.value is not Tri.YES:
            return ""
        for e in facts.mri_safety.evidence:
            if not denies(e):
                known = self.knowledge.display_of(e.system, e.code)
                if known:
                    return known
        return self.templates.phrase("device")

    @staticmethod
    def _priority(order: dict[str, Any]) -> str:
        priority = order.get("priority")
        return priority if priority in ("routine", "urgent", "asap", "stat") else "routine"

    def summary_bounds(self) -> dict[str, int]:
        """The longest value of each variable a summary may show (the start-up check counts
        each at this length); record text is not among them: it has no bound."""
        t, k = self.templates, self.knowledge
        procs = list(k.procedures.values())
        name = max(len(p.name) for p in procs)
        short = max(len(p.short_name) for p in procs)
        labels = sorted((len(t.fact_label(n)) for n in NAMES), reverse=True)
        contrast = sorted((len(t.fact_label(n)) for n in CONTRAST_FACTS), reverse=True)
        v7 = sum(len(t.fact_short(n)) + 5 for n in GROUPS["v7"])
        date_len = len("2026-01-01")
        answers = max((len(d) for d in self._duration_answers.values()), default=0)
        bounds = {
            "order.name": name, "order.short": short, "order.priority": len("routine"),
            "suggestion.name": name, "suggestion.short": short,
            "suggestion.category_label": max(len(c) for c in t.categories.values()),
            "rating.category_label": max(len(c) for c in [*t.categories.values(), "not rated"]),
            "duplicate.name": name, "duplicate.short": short, "duplicate.date": date_len,
            "recent.date": date_len, "scanned.date": date_len,
            "already": name, "already_short": short,
            "conditional": len(t.phrase("if-candidate")),
            "suggest_if": len(t.phrase("suggest-if-candidate")),
            "missing_label": max(labels[0] + labels[1] + 5, len("the patient's history")),
            "contrast_reason": max(contrast[0] + contrast[1] + 5,
                                   len(t.phrase("contrast-risks"))),
            "suspected": max(v7, len("cancer, infection or immunosuppression")),
            "device_short": max([len(d) for d in k.displays_in("mri_safety")]
                                + [len(t.phrase("device"))]),
            "scenario_short": max((len(v) for v in t.scenarios.values()), default=0),
            "scenario_id": max((len(v) for v in k.variants), default=0),
            "span": max(SPAN_LONGEST, answers),
        }
        return bounds

    def _alt(self, proc: Procedure, category: str) -> dict[str, Any]:
        return {"id": proc.id, "name": proc.name, "short": proc.short_name,
                "category": category, "rrl": proc.rrl,
                "category_label": self.templates.categories.get(category, category)}

    # ------------------------------------------------------------------ the SMART app link

    def questions_to_ask(self, rated: Rated) -> list[str]:
        """The linkIds of the questions whose answers decide the order's rating (or its
        scenario), for the card's link to the SMART app: a few at most, red flags first;
        none for what the EHR did not send (``questionnaire.questions_to_ask``)."""
        return [q.link_id for q in questions_to_ask(
            self.questions, rated.decision.deciding, rated.facts)]

    def _app_link(self, kind: str, rated: Rated) -> list[Link]:
        """A SMART app link asking the questions that would settle the rating (no PHI in the
        app context: the order's reference, the study and the questions' linkIds)."""
        if not self.settings.smart_app_enabled or kind not in ASKING_KINDS:
            return []
        ask = self.questions_to_ask(rated)
        if not ask:
            return []
        count = f"{len(ask)} question" + ("s" if len(ask) != 1 else "")
        context = {"order": f"ServiceRequest/{rated.order.get('id')}",
                   "procedure": rated.procedure.id, "ask": ask}
        # a missing-data card's order is not rated yet; a not-appropriate one is, in every
        # scenario left open: the answers settle which study fits, not the rating
        phrase = "smart-link" if kind == "missing-data" else "smart-link-scenario"
        return [Link(label=self.templates.phrase(phrase, questions=count),
                     url=f"{self.settings.app_base_url}/app/launch", type="smart",
                     appContext=orjson.dumps(context).decode())]
