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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from jinja2 import DictLoader, StrictUndefined, TemplateError, meta
from jinja2.sandbox import SandboxedEnvironment

from cds_service.errors import StartupError
from cds_service.knowledge import read_yaml_mapping

KINDS = ("not-appropriate", "better-alternative", "cauda-equina", "mri-safety", "recent-mri",
         "missing-data", "urgent-order")
INDICATORS = {"info", "warning", "critical"}
TEXT_FIELDS = ("summary", "detail", "suggestion_label", "action_description", "cancel_label",
               "cancel_description")
SUMMARY_LIMIT = 139
RENDER_MEMO_SIZE = 4096  # rendered texts kept (cleared when full)
# The phrases the engine composes the first line of a card from (common.yaml "phrases").
PHRASES = ("duration", "duration-bound", "duration-unknown", "duration-attested", "red-flags",
           "red-flags-unknown", "no-red-flags", "urgent", "care-none", "care-done",
           "care-under-way", "if-candidate", "suggest-if-candidate", "smart-link",
           "smart-link-scenario")
PHRASE_SAMPLE = {"span": "10 days", "found": "fever (R50.9)", "unknown": "cancer",
                 "checked": "cancer", "weeks": 3, "needed": 6, "questions": "2 questions",
                 "day": "2026-01-01"}


class TemplateProblem(StartupError, ValueError):
    """A card template is missing, malformed or does not render."""


@dataclass
class CardKind:
    name: str
    indicator: str
    templates: dict[str, Any]
    override_reasons: list[dict[str, str]] = field(default_factory=list)
    # field -> the context variables its template reads (the memo key)
    reads: dict[str, tuple[str, ...]] = field(default_factory=dict)


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
            text = " ".join(text.split())
            if len(text) > SUMMARY_LIMIT:
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


def _read(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, TemplateProblem)


def load_templates(directory: Path) -> CardTemplates:
    """Load, compile and test-render every card template; raise TemplateProblem on any fault."""
    common = _read(directory / "common.yaml")
    try:
        evidence = (directory / "evidence.j2").read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateProblem(f"cannot read {directory / 'evidence.j2'}: {exc}") from exc
    env = SandboxedEnvironment(loader=DictLoader({"evidence": evidence}),
                               undefined=StrictUndefined, autoescape=False,
                               trim_blocks=False, lstrip_blocks=True,
                               auto_reload=False)  # compiled once: never re-checked per render
    source = common.get("source") or {}
    if not source.get("label"):
        raise TemplateProblem("common.yaml: source.label is required")
    kinds: dict[str, CardKind] = {}
    for kind in KINDS:
        path = directory / f"{kind}.yaml"
        data = _read(path)
        if data.get("indicator") not in INDICATORS:
            raise TemplateProblem(f"{path}: indicator must be one of {sorted(INDICATORS)}")
        if not data.get("summary"):
            raise TemplateProblem(f"{path}: summary is required")
        compiled, reads = {}, {}
        for name in TEXT_FIELDS:
            if data.get(name):
                try:
                    compiled[name] = env.from_string(str(data[name]))
                    reads[name] = _reads(env, str(data[name]), {"evidence": evidence})
                except TemplateError as exc:
                    raise TemplateProblem(f"{path}: {name}: {exc}") from exc
        reasons = []
        for r in data.get("override_reasons") or []:
            if not isinstance(r, dict) or not r.get("code") or not r.get("display"):
                raise TemplateProblem(f"{path}: each override reason needs code and display")
            reasons.append({"code": str(r["code"]), "display": str(r["display"])})
        kinds[kind] = CardKind(kind, data["indicator"], compiled, reasons, reads)
    templates = CardTemplates(
        source={k: str(v) for k, v in source.items()},
        override_system=str(common.get("override_reason_system") or ""),
        categories={k: str(v) for k, v in (common.get("categories") or {}).items()},
        facts=common.get("facts") or {}, kinds=kinds,
        assumptions={str(k): str(v) for k, v in (common.get("assumptions") or {}).items()},
        phrases={str(k): str(v) for k, v in (common.get("phrases") or {}).items()})
    for code in templates.assumptions:
        if templates.assumption(code, {"weeks": 8}) == code:
            raise TemplateProblem(f"common.yaml: assumptions.{code}: only {{weeks}} may be used")
    for code in PHRASES:
        if code not in templates.phrases:
            raise TemplateProblem(f"common.yaml: phrases.{code} is required")
        if templates.phrase(code, **PHRASE_SAMPLE) == code:
            raise TemplateProblem(f"common.yaml: phrases.{code}: unknown placeholder (use "
                                  f"{', '.join('{' + k + '}' for k in PHRASE_SAMPLE)})")
    _test_render(templates)
    return templates


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
        "evidence": [{"label": "Pain duration", "code": "M54.16", "display": "sample",
                      "date": "2026-01-01", "resource": "Condition/sample"}],
        "missing": [{"name": "duration", "label": "Pain duration", "document": "onset"}],
        "missing_first": "onset", "missing_text": "onset", "missing_label": "pain duration",
        "devices": "pacemaker",
        "unavailable": "procedures",
        "recent": {"date": "2026-01-01", "resource": "Procedure/sample"},
        "already": "MRI lumbar spine without IV contrast",
    }


def _test_render(templates: CardTemplates) -> None:
    variants = [sample_context(), {**sample_context(), "suggestion": None, "cancel": True,
                                   "scenario": None, "alternatives": [], "evidence": []}]
    for kind in templates.kinds.values():
        for name in kind.templates:
            for ctx in variants:
                if ctx["suggestion"] is None and name in ("suggestion_label",
                                                          "action_description"):
                    continue
                if kind.name == "better-alternative" and ctx["suggestion"] is None:
                    continue
                try:
                    templates.render(kind.name, name, ctx)
                except Exception as exc:  # noqa: BLE001 - any template fault stops the start
                    raise TemplateProblem(f"cards/{kind.name}.yaml: {name}: {exc}") from exc
