"""Cards from the clinician-editable templates in ``cards/``.

Each card kind is one YAML file (indicator, summary, detail, suggestion labels, override reasons);
``common.yaml`` holds the shared wording and ``evidence.j2`` the evidence block every detail can
include. Templates are compiled and test-rendered once at start-up, so a broken edit stops the
start rather than a request.

A render is a pure function of the context variables its template reads (found once, from the
template's syntax tree), so each text is rendered once per distinct set of those values and then
reused; the memo is bounded and lives in the process only.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from jinja2 import DictLoader, StrictUndefined, TemplateError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment
from pydantic import Field, field_validator

from cds_service import nonadherence
from cds_service.errors import StartupError
from cds_service.knowledge.checks import Check, closest, fix_for
from cds_service.knowledge.models import FileModel, Name, Text
from cds_service.knowledge.vocabulary import CATEGORIES
from cds_service.knowledge.yaml import read_model

KINDS = ("not-appropriate", "better-alternative", "cauda-equina", "mri-safety", "recent-mri",
         "missing-data", "urgent-order", "duplicate",
         "suspicion", "neuro-deficit", "contrast-risk", "mri-scanned")
# Kinds whose cards always carry a suggestion (their templates may read it unguarded).
ALWAYS_SUGGEST = ("better-alternative", "suspicion", "neuro-deficit")
INDICATORS = {"info", "warning", "critical"}
TEXT_FIELDS = ("summary", "detail", "suggestion_label", "action_description", "cancel_label",
               "cancel_description")
SUMMARY_LIMIT = 139
RENDER_MEMO_SIZE = 4096  # rendered texts kept (cleared when full)
# The phrases the engine composes the first line of a card from (common.yaml "phrases"), each
# with the placeholders the engine fills in for it (cds_service/engine.py).
PHRASES: dict[str, tuple[str, ...]] = {
    "duration": ("span",), "duration-bound": ("span",), "duration-unknown": (),
    "duration-today": (), "duration-yesterday": (), "duration-bound-today": (),
    "duration-attested": ("span", "day"), "red-flags": ("found",),
    "red-flags-unknown": ("unknown",), "no-red-flags": ("checked",), "fracture-risk": (),
    "on-record": ("found",), "urgent": (), "device": (), "contrast-risks": (),
    "care-none": (), "care-done": ("weeks",), "care-under-way": ("weeks", "needed"),
    "if-candidate": (), "suggest-if-candidate": (), "smart-link": ("questions",),
    "smart-link-scenario": ("questions",), "unreadable": ("entries",),
    "conflict-duration": ("answered", "day", "span"), "conflict-care": ("answered", "day", "span"),
    "date-before-episode": ("date",), "date-undated": (),
    "age-unknown": (),
    "contrast-risk": ("contrast", "found"), "contrast-gadolinium": (), "contrast-iodinated": (),
    "contrast-intrathecal": (),
    # where a finding is recorded, in words (the evidence table's "recorded" column)
    "source-this-order": (), "source-Condition": (), "source-Procedure": (),
    "source-ServiceRequest": (), "source-MedicationRequest": (),
    "source-AllergyIntolerance": (), "source-QuestionnaireResponse": (),
    "source-Patient": ()}
# The assumptions the clinical rules make (common.yaml "assumptions"), with their placeholders.
ASSUMPTIONS: dict[str, tuple[str, ...]] = {
    "candidate-after-failed-care": ("weeks",), "duration-from-recorded-date": (),
    "care-order-still-active": ("date", "first", "last"),
    "care-orders-still-active": ("date", "first", "last", "count"),
    "care-order-still-active-alone": ("date",)}
PHRASE_SAMPLE = {"span": "10 days", "found": "fever (R50.9)", "unknown": "cancer",
                 "checked": "cancer", "weeks": 3, "needed": 6, "questions": "2 questions",
                 "day": "2026-01-01", "entries": "Breast cancer, on treatment",
                 "answered": "more than 12 weeks", "date": "2026-01-01",
                 "contrast": "gadolinium contrast", "first": "2025-11-01",
                 "last": "2026-02-01", "count": 2}


MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#])")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # control characters (terminal escapes, bells)


def literal(text: str) -> str:
    """Text from the record, shown as written in a card's markdown: the characters markdown or
    HTML would read as markup escaped, line breaks and control characters made spaces (a table
    cell stays one cell)."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(CONTROL.sub(" ", text).split()))


class TemplateProblem(StartupError, ValueError):
    """A card template is missing, malformed or does not render."""


@dataclass
class CardKind:
    name: str
    indicator: str
    templates: dict[str, Any]
    override_reasons: list[dict[str, str]] = field(default_factory=list)  # the service's own
    # the HL7 Non-Adherence Reason codes offered after them: code and display (nonadherence.py)
    non_adherence: list[dict[str, str]] = field(default_factory=list)
    # field -> the context variables its template reads (the memo key)
    reads: dict[str, tuple[str, ...]] = field(default_factory=dict)
    summary_tree: Any = None  # the summary's syntax tree (its longest length is checked)


@dataclass
class CardTemplates:
    """All card kinds plus the shared wording, ready to render."""

    source: dict[str, str]
    override_system: str
    categories: dict[str, str]
    facts: dict[str, dict[str, str]]
    kinds: dict[str, CardKind]
    assumptions: dict[str, str] = field(default_factory=dict)
    phrases: dict[str, str] = field(default_factory=dict)
    scenarios: dict[str, str] = field(default_factory=dict)  # variant -> its name in a summary
    directory: Path | None = None  # where the templates were read (named in messages)
    # reasons the cards offered before (code, display, now: the Non-Adherence code offered
    # instead): feedback naming one still counts
    former_reasons: list[dict[str, str]] = field(default_factory=list)
    _memo: dict[tuple[str, str, bytes], str] = field(default_factory=dict, repr=False)

    def phrase(self, code: str, **params: Any) -> str:
        """A shared phrase of common.yaml ("phrases"), filled in; its code if it is missing."""
        text = self.phrases.get(code)
        try:
            return text.format(**params) if text else code
        except (KeyError, IndexError, ValueError):
            return code

    def assumption(self, code: str, params: dict[str, Any]) -> str:
        """The wording of an assumption the engine made (its code if the text is missing)."""
        text = self.assumptions.get(code)
        try:
            return text.format(**params) if text else code
        except (KeyError, IndexError, ValueError):
            return code

    def render(self, kind: str, field_name: str, context: dict[str, Any]) -> str | None:
        card = self.kinds[kind]
        template = card.templates.get(field_name)
        if template is None:
            return None
        key = _memo_key(kind, field_name, card.reads.get(field_name), context)
        if key is not None:
            found = self._memo.get(key)
            if found is not None:
                return found
        text = self._render(template, field_name, context)
        if key is not None:
            if len(self._memo) >= RENDER_MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = text
        return text

    @staticmethod
    def _render(template: Any, field_name: str, context: dict[str, Any]) -> str:
        text: str = template.render(**context).strip()
        if field_name == "summary":
            text = one_line(text)
            if len(text) > SUMMARY_LIMIT:  # a last resort: check_summaries rules it out
                text = text[: SUMMARY_LIMIT - 1].rstrip() + "…"
        elif field_name == "detail":
            text = _tidy_markdown(text)
        return text

    def fact_label(self, name: str) -> str:
        return self.facts.get(name, {}).get("label", name.replace("_", " "))

    def fact_short(self, name: str) -> str:
        """The short name of a fact in a sentence ("cauda equina symptoms")."""
        entry = self.facts.get(name, {})
        return entry.get("short") or entry.get("label", name.replace("_", " ")).lower()

    def fact_document(self, name: str) -> str:
        return self.facts.get(name, {}).get("document", name.replace("_", " "))


def _memo_key(kind: str, field_name: str, reads: tuple[str, ...] | None,
              context: dict[str, Any]) -> tuple[str, str, bytes] | None:
    """What the text depends on, or None when it cannot be told (then it is not memoised)."""
    if reads is None or any(name not in context for name in reads):
        return None  # (a missing variable raises in the render: never memoised)
    try:
        return kind, field_name, orjson.dumps([context[name] for name in reads])
    except TypeError:
        return None


def _reads(env: Any, source: str, included: dict[str, str]) -> tuple[str, ...]:
    """The context variables a template reads, those of the templates it includes too."""
    names: set[str] = set()
    pending, seen = [source], set()
    while pending:
        tree = env.parse(pending.pop())
        names |= meta.find_undeclared_variables(tree)
        for ref in meta.find_referenced_templates(tree):
            if ref is None or ref not in included:
                raise TemplateProblem("a template includes a template chosen at render time")
            if ref not in seen:
                seen.add(ref)
                pending.append(included[ref])
    return tuple(sorted(names - set(env.globals)))


def upper_first(text: str) -> str:
    """The text with its first letter in upper case, the rest as it is ("MRI with contrast")."""
    return text[:1].upper() + text[1:]


def one_line(text: str) -> str:
    """A summary's text: runs of spaces and line breaks collapsed to one space."""
    return " ".join(text.split())


def _tidy_markdown(text: str) -> str:
    """Strip template indentation and runs of blank lines; keep paragraph breaks."""
    out: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line and (not out or not out[-1]):
            continue
        if line.startswith("|") and out and out[-1] and not out[-1].startswith("|"):
            out.append("")  # a table needs a blank line before it
        out.append(line)
    return "\n".join(out).strip()


# ------------------------------------------------------------------ loading and checking

CARD_KIND_FILE = "cards/<kind>.yaml"
COMMON_FILE = "cards/common.yaml"
CATEGORY_MISSING = Check(
    COMMON_FILE, "`categories` lacks the name of an ACR category",
    "no name for the category {name!r}: name each of {all}", TemplateProblem)
CATEGORY_UNKNOWN = Check(
    COMMON_FILE, "`categories` names something that is not an ACR category",
    "{name!r} is not an ACR category: {fix}", TemplateProblem)
WORDING_MISSING = Check(
    COMMON_FILE, "a phrase or an assumption the engine uses is missing",
    "{section}.{code} is required: the engine uses it", TemplateProblem)
WORDING_UNKNOWN = Check(
    COMMON_FILE, "a phrase or an assumption is one the engine does not use (misspelled?)",
    "{code!r} is not one of the engine's {section}: {fix}", TemplateProblem)
WORDING_PLACEHOLDER = Check(
    COMMON_FILE, "a phrase or an assumption uses a placeholder the engine does not fill in for "
    "it (the card would show the code instead of the sentence)",
    "the engine fills in no placeholder {{{name}}} here: {fix}", TemplateProblem)
WORDING_BROKEN = Check(
    COMMON_FILE, "a phrase or an assumption cannot be filled in (a lone brace, `{}`)",
    "cannot be filled in ({error}): name each placeholder, write {{{{ and }}}} for a brace",
    TemplateProblem)
TEMPLATE_COMPILE = Check(
    CARD_KIND_FILE, "a template does not compile (Jinja2 syntax)",
    "{error}", TemplateProblem)
TEMPLATE_RENDER = Check(
    CARD_KIND_FILE, "a template fails when rendered with a sample of every variable (an "
    "unknown variable, a typo in a field name)",
    "{error} (the variables a card can use are listed in docs/editing-knowledge.md)",
    TemplateProblem)
SUMMARY_TOO_LONG = Check(
    CARD_KIND_FILE, f"a summary can be over {SUMMARY_LIMIT} characters: each placeholder "
    "counted at its longest possible value (the longest study name, phrase or date), the "
    "longest branch of each `{% if %}` (CDS Hooks allows under 140; a summary is never cut)",
    "can reach {length} characters, over the {limit} allowed, with {longest}: shorten the "
    "wording", TemplateProblem)
SUMMARY_UNBOUNDED = Check(
    CARD_KIND_FILE, "a summary shows a value whose length has no bound (the record's own text, "
    "a list): the summary could not be kept under 140 characters",
    "{{{{ {name} }}}} has no longest value: show it in the detail, not in the summary "
    "(a summary may use {allowed})", TemplateProblem)
SCENARIO_MISSING = Check(
    COMMON_FILE, "`scenarios` lacks the short name of a variant of the criteria (summaries name "
    "the scenario by it)", "no short name for {name}: name each of {all}", TemplateProblem)
CARD_CHECKS = (CATEGORY_MISSING, CATEGORY_UNKNOWN, WORDING_MISSING, WORDING_UNKNOWN,
               WORDING_PLACEHOLDER, WORDING_BROKEN, TEMPLATE_COMPILE, TEMPLATE_RENDER,
               SUMMARY_TOO_LONG, SUMMARY_UNBOUNDED, SCENARIO_MISSING)


def _category(value: str | None) -> str | None:
    if value is not None and value not in nonadherence.CATEGORIES:
        raise ValueError(f"not a Non-Adherence Reason category: {value!r} (one of "
                         f"{', '.join(nonadherence.CATEGORIES)})")
    return value


def _non_adherence_code(value: str) -> str:
    if value not in nonadherence.BY_CODE:
        near = closest(value, nonadherence.BY_CODE)
        raise ValueError(f"not a Non-Adherence Reason code: {value!r}"
                         + (f" (did you mean {near!r}?)" if near else ""))
    return value


class OverrideReason(FileModel):
    code: Name = Field(description="the reason's code (EHRs send it back: keep it)")
    display: Name = Field(description="the reason as shown")
    category: Name | None = Field(
        None, description="the HL7 Non-Adherence Reason category it counts under in the report "
                          "(e.g. `cds-not-applicable`)")

    _check_category = field_validator("category")(_category)


class FormerReason(FileModel):
    code: Name = Field(description="a reason code the cards offered before")
    display: Name = Field(description="the display they offered with it")
    now: Name = Field(description="the HL7 Non-Adherence Reason code offered instead")

    _check_now = field_validator("now")(_non_adherence_code)


class CardSourceFile(FileModel):
    label: Name = Field(description="the source named on every card")
    url: Text | None = Field(None, description="a link to the source")


class CommonFile(FileModel):
    """``cards/common.yaml``: the wording every card shares."""

    source: CardSourceFile = Field(description="the card's source")
    override_reason_system: Text | None = Field(
        None, description="a site's own code system of override reasons")
    categories: dict[str, Text] = Field(default_factory=dict,
                                        description="the name of each ACR category")
    facts: dict[str, dict[str, Text]] = Field(
        default_factory=dict, description="per fact: its `label`, `short` name and what to "
                                          "`document` when it is unknown")
    phrases: dict[str, Text] = Field(default_factory=dict,
                                     description="parts of the first line of every card")
    assumptions: dict[str, Text] = Field(default_factory=dict,
                                         description="the wording of each assumption")
    scenarios: dict[str, Text] = Field(
        default_factory=dict, description="per variant (V1 ...): its short name in a summary")
    former_override_reasons: list[FormerReason] = Field(
        default_factory=list, description="reasons no longer offered, that feedback may name")


class KindFile(FileModel):
    """``cards/<kind>.yaml``: the wording of one card kind (Jinja2 templates)."""

    indicator: Literal["info", "warning", "critical"] = Field(description="the card's urgency")
    summary: Name = Field(description=f"the headline: the action and the reason, in "
                                      f"{SUMMARY_LIMIT} characters at most with every value at "
                                      f"its longest")
    detail: Text | None = Field(None, description="the body, markdown")
    suggestion_label: Text | None = Field(None, description="the label of a suggested study")
    action_description: Text | None = Field(None, description="the action of a suggestion")
    cancel_label: Text | None = Field(None, description="the label of a cancel")
    cancel_description: Text | None = Field(None, description="the action of a cancel")
    override_reasons: list[OverrideReason] = Field(
        default_factory=list, description="the service's own reasons offered for an override "
                                          "(first on the card)")
    non_adherence_reasons: list[Name] = Field(
        default_factory=list, description="HL7 Non-Adherence Reason codes offered after them "
                                          "(their displays are the code system's)")

    @field_validator("non_adherence_reasons")
    @classmethod
    def _known(cls, codes: list[str]) -> list[str]:
        return [_non_adherence_code(c) for c in codes]


def load_templates(directory: Path) -> CardTemplates:
    """Load, compile and test-render every card template; raise TemplateProblem on any fault."""
    common_path = directory / "common.yaml"
    common, _ = read_model(CommonFile, common_path, TemplateProblem)
    try:
        evidence = (directory / "evidence.j2").read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateProblem(f"cannot read {directory / 'evidence.j2'}: {exc}") from exc
    env = SandboxedEnvironment(loader=DictLoader({"evidence": evidence}),
                               undefined=StrictUndefined, autoescape=False,
                               trim_blocks=False, lstrip_blocks=True,
                               auto_reload=False)  # compiled once: never re-checked per render
    env.filters["upper_first"] = upper_first
    kinds = {kind: _card_kind(env, kind, directory / f"{kind}.yaml", evidence)
             for kind in KINDS}
    _check_categories(common.categories, common_path)
    _check_wording(common.phrases, PHRASES, "phrases", common_path)
    _check_wording(common.assumptions, ASSUMPTIONS, "assumptions", common_path)
    templates = CardTemplates(
        source=common.source.model_dump(exclude_none=True),
        override_system=common.override_reason_system or "",
        categories=dict(common.categories), kinds=kinds,
        facts={name: dict(wording) for name, wording in common.facts.items()},
        assumptions=dict(common.assumptions), phrases=dict(common.phrases),
        scenarios=dict(common.scenarios), directory=directory,
        former_reasons=[r.model_dump() for r in common.former_override_reasons])
    _test_render(templates, directory)
    return templates


def _card_kind(env: Any, kind: str, path: Path, evidence: str) -> CardKind:
    data, _ = read_model(KindFile, path, TemplateProblem)
    compiled, reads = {}, {}
    for name in TEXT_FIELDS:
        text = getattr(data, name)
        if text:
            try:
                compiled[name] = env.from_string(text)
                reads[name] = _reads(env, text, {"evidence": evidence})
            except TemplateError as exc:
                raise TEMPLATE_COMPILE.fail(path, name, error=exc) from exc
    reasons = [r.model_dump(exclude_none=True) for r in data.override_reasons]
    standard = [{"code": c, "display": nonadherence.BY_CODE[c].display}
                for c in data.non_adherence_reasons]
    return CardKind(kind, data.indicator, compiled, reasons, standard, reads,
                    env.parse(data.summary))


def _check_categories(categories: dict[str, str], path: Path) -> None:
    for name in categories:
        if name not in CATEGORIES:
            raise CATEGORY_UNKNOWN.fail(path, "categories", name=name,
                                        fix=fix_for(name, set(CATEGORIES) - set(categories)))
    for name in CATEGORIES:
        if name not in categories:
            raise CATEGORY_MISSING.fail(path, "categories", name=name, all=", ".join(CATEGORIES))


def _check_wording(texts: dict[str, str], used: dict[str, tuple[str, ...]], section: str,
                   path: Path) -> None:
    """Each text the engine uses is there, and uses only the placeholders it is given."""
    for code in texts:
        if code not in used:
            raise WORDING_UNKNOWN.fail(path, section, code=code, section=section,
                                       fix=fix_for(code, set(used) - set(texts)))
    for code, allowed in used.items():
        if code not in texts:
            raise WORDING_MISSING.fail(path, section, code=code, section=section)
        _check_placeholders(texts[code], allowed, path, f"{section}.{code}")


def _check_placeholders(text: str, allowed: tuple[str, ...], path: Path, where: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise WORDING_BROKEN.fail(path, where, error=exc) from exc
    for name in (re.split(r"[.\[!:]", f, maxsplit=1)[0] for f in fields):
        if not name.isidentifier():
            raise WORDING_BROKEN.fail(path, where, error=f"a placeholder {{{name}}}")
        if name not in allowed:
            near = closest(name, allowed)
            fix = (f"did you mean {{{near}}}?" if near else
                   "this one may use " + ", ".join("{" + a + "}" for a in allowed)
                   if allowed else "this one takes no placeholder")
            raise WORDING_PLACEHOLDER.fail(path, where, name=name, fix=fix)
    try:
        text.format(**{k: PHRASE_SAMPLE[k] for k in allowed})
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise WORDING_BROKEN.fail(path, where, error=exc) from exc


def sample_context() -> dict[str, Any]:
    """A context with every variable a template may use (for the start-up check)."""
    alt = {"name": "MRI lumbar spine without IV contrast", "short": "MRI without contrast",
           "category": "UA", "category_label": "Usually appropriate", "rrl": "0"}
    return {
        "kind": "sample", "why": "Pain for 10 days; no red flags recorded.", "conditional": "",
        "suggest_if": "",
        "care": "3 of 6 weeks of conservative care so far", "device_found": True,
        "order": {"id": "sample", "name": "MRI lumbar spine with IV contrast",
                  "short": "MRI with contrast", "priority": "stat"},
        "rating": {"pama": "not-appropriate", "category": "UNA",
                   "category_label": "Usually not appropriate"},
        "scenario": "sample scenario", "outside": False, "suggestion": alt, "cancel": False,
        "alternatives": [alt], "assumptions": ["sample assumption"],
        "evidence": [{"finding": "Lumbar radiculopathy (M54.16)", "label": "Pain duration",
                      "date": "2026-01-01", "source": "this order, Condition/sample",
                      "recorded": "2026-01-01, this order, Condition/sample"}],
        "missing": [{"name": "duration", "label": "Pain duration", "document": "onset"}],
        "missing_first": "onset", "missing_text": "onset", "missing_label": "pain duration",
        "devices": "pacemaker",
        "unavailable": "procedures",
        "recent": {"date": "2026-01-01", "resource": "Procedure/sample"},
        "already": "MRI lumbar spine without IV contrast", "already_short": "MRI without contrast",
        "scenario_id": "V1", "scenario_short": "acute low back pain", "span": "10 days",
        "device_short": "pacemaker",
        "duplicate": {"resource": "ServiceRequest/sample", "name": "MRI lumbar spine without "
                      "IV contrast", "short": "MRI without contrast", "date": "2026-01-01",
                      "drafted": False},
        "suspected": "cancer",
        "contrast": "Without gadolinium contrast: pregnancy (Z33.1) on record",
        "contrast_reason": "pregnancy",
        "scanned": {"date": "2026-01-01", "resource": "Procedure/sample"},
    }


def _test_render(templates: CardTemplates, directory: Path) -> None:
    variants = [sample_context(), {**sample_context(), "suggestion": None, "cancel": True,
                                   "scenario": None, "alternatives": [], "evidence": []}]
    for kind in templates.kinds.values():
        path = directory / f"{kind.name}.yaml"
        for name in kind.templates:
            for ctx in variants:
                if ctx["suggestion"] is None and name in ("suggestion_label",
                                                          "action_description"):
                    continue
                if kind.name in ALWAYS_SUGGEST and ctx["suggestion"] is None:
                    continue
                try:
                    templates.render(kind.name, name, ctx)
                except Exception as exc:  # noqa: BLE001 - any template fault stops the start
                    raise TEMPLATE_RENDER.fail(path, name, error=exc) from exc


# ------------------------------------------------------------------ the longest summary

# Filters that never lengthen a text (a summary may use them on a bounded value).
SAME_LENGTH_FILTERS = {"upper_first", "capitalize", "lower", "upper", "title", "trim"}


class _Unbounded(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def check_summaries(templates: CardTemplates, bounds: dict[str, int]) -> None:
    """Refuse a summary that can exceed the limit: every value it shows counted at its longest
    (``bounds``: a context variable, dotted for a field, -> its longest length), the longest
    branch of every ``{% if %}``; and one that shows a value with no bound."""
    for kind in templates.kinds.values():
        path = (templates.directory or Path("cards")) / f"{kind.name}.yaml"
        try:
            length, longest = _longest(kind.summary_tree, bounds)
        except _Unbounded as exc:
            raise SUMMARY_UNBOUNDED.fail(path, "summary", name=exc.name,
                                         allowed=", ".join(sorted(bounds))) from None
        if length > SUMMARY_LIMIT:
            raise SUMMARY_TOO_LONG.fail(path, "summary", length=length, limit=SUMMARY_LIMIT,
                                        longest=", ".join(f"{n} {k}" for k, n in longest))


def _longest(node: Any, bounds: dict[str, int]) -> tuple[int, list[tuple[str, int]]]:
    """The longest text a template node can render, and the values counted in it."""
    if isinstance(node, nodes.TemplateData):
        return len(node.data), []
    if isinstance(node, nodes.Const):
        return len(str(node.value)), []
    if isinstance(node, (nodes.Name, nodes.Getattr)):
        name = _dotted(node)
        if name not in bounds:
            raise _Unbounded(name)
        return bounds[name], [(name, bounds[name])]
    if isinstance(node, nodes.Filter) and node.name in SAME_LENGTH_FILTERS and node.node:
        return _longest(node.node, bounds)
    if isinstance(node, nodes.CondExpr):
        return max(_longest(node.expr1, bounds), _longest(node.expr2, bounds) if node.expr2
                   else (0, []))
    if isinstance(node, nodes.Or):  # a value or its fallback: the longer of the two
        return max(_longest(node.left, bounds), _longest(node.right, bounds))
    if isinstance(node, nodes.If):
        branches = [node.body, *[e.body for e in node.elif_], node.else_]
        return max(_longest_all(b, bounds) for b in branches)
    if isinstance(node, (nodes.Template, nodes.Output)):
        return _longest_all(node.body if isinstance(node, nodes.Template) else node.nodes,
                            bounds)
    raise _Unbounded(type(node).__name__.lower())


def _longest_all(body: list[Any], bounds: dict[str, int]) -> tuple[int, list[tuple[str, int]]]:
    total, counted = 0, []
    for child in body:
        length, names = _longest(child, bounds)
        total += length
        counted += names
    return total, counted


def _dotted(node: Any) -> str:
    if isinstance(node, nodes.Getattr):
        return f"{_dotted(node.node)}.{node.attr}"
    return str(getattr(node, "name", type(node).__name__))
