"""Clinical knowledge as data: value sets, the procedure catalog and the rating matrix.

The YAML files beside this module are loaded and checked once at start-up by :func:`load_knowledge`.
A site can point ``CDS_KNOWLEDGE_DIR`` at its own copy of the three files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cds_service.errors import StartupError

KNOWLEDGE_DIR = Path(__file__).resolve().parent
VARIANTS = ("V1", "V2", "V3", "V4", "V5", "V6", "V7")
CATEGORIES = ("UA", "MBA", "MBA(D)", "UNA")
# Higher is better: a patient in two scenarios may have the study either one supports.
CATEGORY_RANK = {"UA": 3, "MBA": 2, "MBA(D)": 1, "UNA": 0}
PAMA_CODE = {"UA": "appropriate", "MBA": "appropriate", "MBA(D)": "appropriate",
             "UNA": "not-appropriate"}
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
MODALITIES = {"XR", "CT", "MR", "NM", "PET"}
REGIONS = {"lumbar", "whole-body"}


class KnowledgeError(StartupError, ValueError):
    """The knowledge files are missing, malformed or inconsistent."""


@dataclass(frozen=True, eq=False)  # one object per procedure: identity is equality
class Procedure:
    """One of the procedures the ACR criteria rate, with the codes that order it."""

    id: str
    name: str
    modality: str
    contrast: str
    region: str
    rrl: str
    rrl_rank: int
    preference: int
    order_codes: tuple[dict[str, str], ...]
    codes: tuple[dict[str, str], ...]
    short_name: str = ""

    @property
    def has_contrast(self) -> bool:
        return self.contrast != "none"


@dataclass(frozen=True)
class ValueSetRule:
    """When a value set's codes count: only beside a finding of another set, or by their text."""

    needs_companion: frozenset[str] = frozenset()
    text_terms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Combination:
    """An order coded ``when`` plus any of ``with_any`` (same order or a companion draft)."""

    when: str
    becomes: str
    with_any: frozenset[tuple[str, str]]


@dataclass
class Knowledge:
    """The loaded knowledge with its lookup indexes (built once)."""

    source: dict[str, str]
    variants: dict[str, str]
    procedures: dict[str, Procedure]
    ratings: dict[str, dict[str, str]]
    valueset_descriptions: dict[str, str]
    aliases: dict[str, str]
    rules: dict[str, ValueSetRule] = field(default_factory=dict)
    medication_terms: tuple[str, ...] = ()
    combinations: tuple[Combination, ...] = ()
    _displays: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    # Results of pure functions of the knowledge (the clinical core's outcomes per scenario):
    # bounded by procedures x variant sets x a few flags.
    memo: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)
    # (system, code) lengths past which no coding can match (set by the loader)
    _longest: tuple[int, int] = field(default=(1024, 1024), repr=False)
    _excluded: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict, repr=False)
    _exact: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict, repr=False)
    _prefix: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict, repr=False)
    _prefix_lengths: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    _procedure_codes: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    # (system, code) -> value sets, and ("procedure", system, code) -> procedure: bounded
    _cache: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)
    _screened: dict[tuple[str, str], tuple[frozenset[str], Any]] = field(
        default_factory=dict, repr=False)

    def normalize(self, system: str | None, code: str | None) -> tuple[str, str] | None:
        """The (system, code) pair used for comparisons, or None for an empty coding."""
        if not system or not code or not isinstance(system, str) or not isinstance(code, str):
            return None
        system = self.aliases.get(system.strip(), system.strip())
        code = code.strip()
        if system == ICD10CM:
            code = code.replace(".", "").upper()
        return system, code

    def valuesets_of(self, system: str | None, code: str | None) -> frozenset[str]:
        """Ids of every value set the coding belongs to (empty for most codes: a cheap check).

        Only codes that could be in the knowledge are looked up and cached: one longer than any
        known code (plus slack for padding) cannot match, so the cache stays small whatever a
        request sends.
        """
        if not isinstance(system, str) or not isinstance(code, str):
            return frozenset()
        if len(code) > self._longest[1] or len(system) > self._longest[0]:
            return frozenset()
        cached = self._cache.get((system, code))
        if cached is not None:
            return cached
        found = self._lookup(system, code)
        if len(self._cache) > 50_000:
            self._cache.clear()
        self._cache[(system, code)] = found
        return found

    def _lookup(self, system: str | None, code: str | None) -> frozenset[str]:
        key = self.normalize(system, code)
        if key is None:
            return frozenset()
        found = self._exact.get(key, frozenset())
        for n in self._prefix_lengths.get(key[0], ()):
            if n <= len(key[1]):
                hit = self._prefix.get((key[0], key[1][:n]))
                if hit:
                    found = found | hit
        if found and self._excluded:
            found = frozenset(vs for vs in found if not any(
                key[0] == system and key[1].startswith(code)
                for system, code in self._excluded.get(vs, ())))
        return found

    def display_of(self, system: Any, code: Any) -> str | None:
        """Our display for a code: its own entry's, else that of the longest matching prefix."""
        key = self.normalize(system, code) if isinstance(system, str) else None
        if key is None:
            return None
        for n in range(len(key[1]), 0, -1):
            found = self._displays.get((key[0], key[1][:n]))
            if found:
                return found
        return None

    def combined_procedure(self, proc: Procedure, codings: Iterable[Any]) -> Procedure:
        """The procedure an order really is, given every code of it and its companion drafts."""
        return self.combined_with_keys(proc, self.coding_keys(codings))

    def coding_keys(self, codings: Iterable[Any]) -> set[tuple[str, str]]:
        """The normalised (system, code) pairs of codings (for combined_with_keys)."""
        keys = {self.normalize(c.get("system"), c.get("code"))
                for c in codings if isinstance(c, dict)}
        keys.discard(None)
        return keys  # type: ignore[return-value]

    def combined_with_keys(self, proc: Procedure, keys: set[tuple[str, str]]) -> Procedure:
        for combo in self.combinations:
            if combo.when == proc.id and keys & combo.with_any:
                return self.procedures[combo.becomes]
        return proc

    def valuesets_of_codings(self, codings: Iterable[Any]) -> frozenset[str]:
        found: frozenset[str] = frozenset()
        for c in codings:
            if isinstance(c, dict):
                hit = self.valuesets_of(c.get("system"), c.get("code"))
                if hit:
                    found = found | hit
        return found

    def screen(self, concept: Any) -> tuple[frozenset[str], Procedure | None]:
        """Value sets and catalog procedure of a CodeableConcept's codings, in one pass.

        The per-resource screen of a chart: one cached lookup per coding, nothing else for
        the visits and labs that make most of a record.
        """
        sets: frozenset[str] = frozenset()
        proc: Procedure | None = None
        codings = concept.get("coding") if type(concept) is dict else None
        if type(codings) is not list:
            return sets, proc
        for c in codings:
            if type(c) is not dict:
                continue
            system, code = c.get("system"), c.get("code")
            if type(system) is not str or type(code) is not str:
                continue
            found = self._screened.get((system, code))
            if found is None:
                found = self._screen_one(system, code)
            if found[0]:
                sets = sets | found[0]
            if proc is None:
                proc = found[1]
        return sets, proc

    def _screen_one(self, system: str, code: str) -> tuple[frozenset[str], Procedure | None]:
        found = (self.valuesets_of(system, code), self._procedure_of(system, code))
        if len(code) <= self._longest[1] and len(system) <= self._longest[0]:
            if len(self._screened) > 50_000:
                self._screened.clear()
            self._screened[(system, code)] = found
        return found

    def procedure_of(self, codings: Iterable[Any]) -> Procedure | None:
        """The catalog procedure ordered by any of the codings, or None."""
        for c in codings:
            if isinstance(c, dict):
                found = self._procedure_of(c.get("system"), c.get("code"))
                if found is not None:
                    return found
        return None

    def _procedure_of(self, system: Any, code: Any) -> Procedure | None:
        if not isinstance(system, str) or not isinstance(code, str):
            return None
        if len(code) > self._longest[1] or len(system) > self._longest[0]:
            return None  # longer than any catalog code: no lookup, nothing cached
        key = ("procedure", system, code)
        if key in self._cache:
            return self._cache[key]  # type: ignore[return-value]
        normal = self.normalize(system, code)
        pid = self._procedure_codes.get(normal) if normal else None
        found = self.procedures[pid] if pid else None
        if len(self._cache) > 50_000:
            self._cache.clear()
        self._cache[key] = found  # type: ignore[assignment]
        return found

    def category(self, procedure_id: str, variants: Iterable[str]) -> str:
        """The best category of the procedure over the applicable variants."""
        row = self.ratings[procedure_id]
        return max((row[v] for v in variants), key=CATEGORY_RANK.__getitem__)


def read_yaml_mapping(path: Path, error: type[Exception]) -> dict[str, Any]:
    """A YAML file holding a mapping; any fault raises ``error`` naming the file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} must hold a mapping at the top level")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, KnowledgeError)


def load_knowledge(directory: Path | None = None) -> Knowledge:
    """Load and check the three knowledge files; raise KnowledgeError naming any problem."""
    directory = directory or KNOWLEDGE_DIR
    vs_doc = _read_yaml(directory / "valuesets.yaml")
    proc_doc = _read_yaml(directory / "procedures.yaml")
    rating_doc = _read_yaml(directory / "ratings.yaml")

    vs_systems: dict[str, str] = vs_doc.get("systems") or {}
    aliases: dict[str, str] = dict(vs_doc.get("system_aliases") or {})
    exact: dict[tuple[str, str], set[str]] = {}
    prefix: dict[tuple[str, str], set[str]] = {}
    descriptions: dict[str, str] = {}
    knowledge = Knowledge(source={}, variants={}, procedures={}, ratings={},
                          valueset_descriptions=descriptions, aliases=aliases)
    excluded: dict[str, list[tuple[str, str]]] = {}
    valuesets = vs_doc.get("valuesets") or {}

    def checked_key(entry: Any, where: str) -> tuple[str, str]:
        if not isinstance(entry, dict):
            raise KnowledgeError(f"{where}: must be a mapping")
        system = vs_systems.get(entry.get("system"), entry.get("system"))
        if not system or not str(system).startswith(("http", "urn:")):
            raise KnowledgeError(f"{where}: unknown system {entry.get('system')!r}")
        if not entry.get("source"):
            raise KnowledgeError(f"{where}: every code needs a source")
        if str(entry.get("verified")).lower() not in {"yes", "partial", "true"}:
            raise KnowledgeError(f"{where}: unverified codes must be kept out")
        if ("code" in entry) == ("prefix" in entry):
            raise KnowledgeError(f"{where}: give exactly one of code or prefix")
        key = knowledge.normalize(str(system), str(entry.get("code", entry.get("prefix"))))
        if key is None:
            raise KnowledgeError(f"{where}: empty code")
        return key

    for vs_id, vs in valuesets.items():
        if not isinstance(vs, dict):
            raise KnowledgeError(f"value set {vs_id}: must be a mapping")
        descriptions[vs_id] = str(vs.get("description", vs_id))
        for i, entry in enumerate(vs.get("entries") or []):
            key = checked_key(entry, f"value set {vs_id} entry {i}")
            (exact if "code" in entry else prefix).setdefault(key, set()).add(vs_id)
            if entry.get("display"):
                knowledge._displays.setdefault(key, str(entry["display"]))
        for i, entry in enumerate(vs.get("excludes") or []):
            excluded.setdefault(vs_id, []).append(
                checked_key(entry, f"value set {vs_id} exclusion {i}"))
        companions = frozenset(str(v) for v in vs.get("needs_companion") or [])
        unknown = companions - set(valuesets)
        if unknown:
            raise KnowledgeError(f"value set {vs_id}: needs_companion names unknown "
                                 f"value set(s) {', '.join(sorted(unknown))}")
        terms = tuple(str(t).lower() for t in vs.get("text_terms") or [])
        if companions or terms:
            knowledge.rules[vs_id] = ValueSetRule(companions, terms)
    knowledge._excluded = {k: tuple(v) for k, v in excluded.items()}
    meds = vs_doc.get("medication_terms") or {}
    if meds and not meds.get("source"):
        raise KnowledgeError("medication_terms: needs a source")
    knowledge.medication_terms = tuple(str(t).lower() for t in meds.get("terms") or [])

    proc_systems: dict[str, str] = proc_doc.get("systems") or {}
    procedures: dict[str, Procedure] = {}
    proc_codes: dict[tuple[str, str], str] = {}

    def coding(entry: dict[str, Any], where: str) -> dict[str, str]:
        system = proc_systems.get(entry.get("system"), entry.get("system"))
        if not system or "code" not in entry:
            raise KnowledgeError(f"{where}: a code needs system and code")
        out = {"system": str(system), "code": str(entry["code"])}
        if entry.get("display"):
            out["display"] = str(entry["display"])
        return out

    for p in proc_doc.get("procedures") or []:
        pid = p.get("id")
        where = f"procedure {pid}"
        for name in ("id", "name", "modality", "contrast", "region", "rrl", "codes", "order_codes"):
            if p.get(name) in (None, "", []):
                raise KnowledgeError(f"{where}: missing {name}")
        if p["modality"] not in MODALITIES or p["region"] not in REGIONS:
            raise KnowledgeError(f"{where}: bad modality or region")
        codes = []
        for c in p["codes"]:
            if not c.get("source"):
                raise KnowledgeError(f"{where}: code {c.get('code')} needs a source")
            cd = coding(c, where)
            key = knowledge.normalize(cd["system"], cd["code"])
            assert key is not None
            if key in proc_codes and proc_codes[key] != pid:
                raise KnowledgeError(f"{where}: code {cd['code']} also maps to {proc_codes[key]}")
            proc_codes[key] = pid
            codes.append(cd)
        procedures[pid] = Procedure(
            id=pid, name=str(p["name"]), modality=p["modality"], contrast=str(p["contrast"]),
            region=p["region"], rrl=str(p["rrl"]), rrl_rank=int(p.get("rrl_rank", 0)),
            preference=int(p.get("preference", 99)),
            # every coding the service writes carries a display (EHRs show the first one)
            order_codes=tuple({**coding(c, where), "display": str(c.get("display") or p["name"])}
                              for c in p["order_codes"]), codes=tuple(codes),
            short_name=str(p.get("short_name") or p["name"]))

    combinations = []
    for i, combo in enumerate(proc_doc.get("combinations") or []):
        where = f"combination {i}"
        if combo.get("when") not in procedures or combo.get("becomes") not in procedures:
            raise KnowledgeError(f"{where}: when and becomes must name procedures")
        keys = set()
        for c in combo.get("with_any") or []:
            if not c.get("source"):
                raise KnowledgeError(f"{where}: code {c.get('code')} needs a source")
            cd = coding(c, where)
            key = knowledge.normalize(cd["system"], cd["code"])
            assert key is not None
            keys.add(key)
        if not keys:
            raise KnowledgeError(f"{where}: with_any needs at least one code")
        combinations.append(Combination(combo["when"], combo["becomes"], frozenset(keys)))
    knowledge.combinations = tuple(combinations)

    variants = {k: str(v.get("name", k)) for k, v in (rating_doc.get("variants") or {}).items()}
    if tuple(variants) != VARIANTS:
        raise KnowledgeError(f"ratings.yaml must define variants {', '.join(VARIANTS)}")
    ratings: dict[str, dict[str, str]] = {}
    for pid, row in (rating_doc.get("ratings") or {}).items():
        if pid not in procedures:
            raise KnowledgeError(f"ratings.yaml: unknown procedure {pid}")
        if not isinstance(row, list) or len(row) != len(VARIANTS):
            raise KnowledgeError(f"ratings.yaml: {pid} needs one category per variant (7)")
        for cat in row:
            if cat not in CATEGORIES:
                raise KnowledgeError(f"ratings.yaml: {pid}: unknown category {cat!r}")
        ratings[pid] = dict(zip(VARIANTS, row, strict=True))
    missing = set(procedures) - set(ratings)
    if missing:
        raise KnowledgeError(f"ratings.yaml: no ratings for {', '.join(sorted(missing))}")

    knowledge.source = {k: str(v) for k, v in (proc_doc.get("source") or {}).items()}
    knowledge.variants = variants
    knowledge.procedures = procedures
    knowledge.ratings = ratings
    knowledge._exact = {k: frozenset(v) for k, v in exact.items()}
    knowledge._prefix = {k: frozenset(v) for k, v in prefix.items()}
    lengths: dict[str, set[int]] = {}
    for system, code in prefix:
        lengths.setdefault(system, set()).add(len(code))
    knowledge._prefix_lengths = {s: tuple(sorted(n)) for s, n in lengths.items()}
    knowledge._procedure_codes = proc_codes
    keys = [*exact, *prefix, *proc_codes]
    systems = [*keys, *((alias, "") for alias in aliases)]
    knowledge._longest = (max(len(s) for s, _ in systems) + 16,
                          max(len(c) for _, c in keys) + 16)
    return knowledge
