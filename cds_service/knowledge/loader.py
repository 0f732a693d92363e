"""Loading the knowledge files: each read into its model, then the checks across entries and
files, then the lookup indexes of :class:`Knowledge`.

Every refusal is a :class:`KnowledgeError` whose message names the file, the entry and the fix.
The value sets the clinical rules read by id are checked by :func:`require_valuesets`, which the
engine calls with its list (the knowledge does not know the rules).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cds_service.knowledge.checks import (
    BENIGN_CAUSE,
    CODE_TWICE,
    COMBINATION,
    COMPANION,
    ENTRY_SYSTEM,
    MEDICATION_TERM,
    ORDER_CODE,
    PROCEDURE_ID,
    PROCEDURE_SYSTEM,
    RATING_LENGTH,
    RATING_MISSING,
    RATING_ROW,
    VALUESET_READ,
    VARIANTS,
    Check,
    KnowledgeError,
    closest,
    fix_for,
)
from cds_service.knowledge.index import (
    Combination,
    Knowledge,
    MedicationClass,
    MedicationMatcher,
    Procedure,
    SiteTerms,
    ValueSetRule,
)
from cds_service.knowledge.models import MedicationClass as MedicationClassModel
from cds_service.knowledge.models import (
    OrderCode,
    ProcedureEntry,
    ProceduresFile,
    RatingsFile,
    ValueSetCode,
    ValueSetsFile,
)
from cds_service.knowledge.vocabulary import VARIANTS as VARIANT_IDS
from cds_service.knowledge.yaml import entry_name, read_model

KNOWLEDGE_DIR = Path(__file__).resolve().parent
Key = tuple[str, str]


def load_knowledge(directory: Path | None = None) -> Knowledge:
    """Load and check the three knowledge files; raise KnowledgeError naming any problem."""
    directory = directory or KNOWLEDGE_DIR
    vs_path, proc_path = directory / "valuesets.yaml", directory / "procedures.yaml"
    rating_path = directory / "ratings.yaml"
    valuesets, vs_raw = read_model(ValueSetsFile, vs_path, KnowledgeError)
    catalog, proc_raw = read_model(ProceduresFile, proc_path, KnowledgeError)
    ratings, _ = read_model(RatingsFile, rating_path, KnowledgeError)
    knowledge = Knowledge(source={}, variants={}, procedures={}, ratings={},
                          valueset_descriptions={}, aliases=dict(valuesets.system_aliases),
                          directory=directory)
    exact, prefix = _index_valuesets(knowledge, valuesets, vs_path, vs_raw)
    proc_codes = _index_procedures(knowledge, catalog, proc_path, proc_raw)
    knowledge.combinations = _combinations(knowledge, catalog, proc_path, proc_raw)
    _index_ratings(knowledge, ratings, rating_path)
    knowledge.source = dict(catalog.source)
    _finish_indexes(knowledge, exact, prefix, proc_codes)
    return knowledge


def require_valuesets(knowledge: Knowledge, names: Iterable[str], reader: str) -> None:
    """Raise KnowledgeError unless every value set ``reader`` reads by id is defined (a renamed
    set would match nothing, and its fact would silently never count)."""
    wanted = set(names)
    known = set(knowledge.valueset_descriptions)
    missing = sorted(wanted - known)
    if not missing:
        return
    path = (knowledge.directory or KNOWLEDGE_DIR) / "valuesets.yaml"
    spare = known - wanted  # (a renamed set is defined but read by nobody)
    problems = []
    for name in missing:
        near = closest(name, spare)
        fix = (f"is {near!r} a misspelling of it? Rename it back" if near else
               "add it, or rename back the set that holds its codes")
        problems.append(str(VALUESET_READ.fail(path, "valuesets", name=name, reader=reader,
                                               fix=fix)))
    raise KnowledgeError("\n".join(problems))


# ------------------------------------------------------------------ valuesets.yaml


def _system_url(system: str, systems: Mapping[str, str], check: Check, path: Path,
                where: str) -> str:
    url = systems.get(system, system)
    if not url.startswith(("http", "urn:")):
        raise check.fail(path, where, system=system,
                         fix=fix_for(system, systems, listed="give a URL or one of"))
    return url


def _entry_key(knowledge: Knowledge, entry: ValueSetCode, systems: Mapping[str, str],
               path: Path, where: str) -> Key:
    url = _system_url(entry.system, systems, ENTRY_SYSTEM, path, where)
    key = knowledge.normalize(url, entry.value)
    assert key is not None  # (the model refuses an empty code)
    return key


def _index_valuesets(knowledge: Knowledge, doc: ValueSetsFile, path: Path,
                     raw: Any) -> tuple[dict[Key, set[str]], dict[Key, set[str]]]:
    """Index every entry by (system, code); return the exact and the prefix index."""
    exact: dict[Key, set[str]] = {}
    prefix: dict[Key, set[str]] = {}
    excluded: dict[str, tuple[Key, ...]] = {}
    for vs_id, vs in doc.valuesets.items():
        knowledge.valueset_descriptions[vs_id] = vs.description or vs_id
        for i, entry in enumerate(vs.entries):
            where = entry_name(("valuesets", vs_id, "entries", i), raw)
            key = _entry_key(knowledge, entry, doc.systems, path, where)
            (exact if entry.code is not None else prefix).setdefault(key, set()).add(vs_id)
            if entry.display:
                knowledge._displays.setdefault(key, entry.display)
        if vs.excludes:
            excluded[vs_id] = tuple(
                _entry_key(knowledge, entry, doc.systems, path,
                           entry_name(("valuesets", vs_id, "excludes", i), raw))
                for i, entry in enumerate(vs.excludes))
        for name in vs.needs_companion:
            if name not in doc.valuesets:
                raise COMPANION.fail(path, f"valuesets.{vs_id}.needs_companion", name=name,
                                     fix=fix_for(name, set(doc.valuesets) - {vs_id}))
        for name in vs.benign_causes:
            if name not in doc.valuesets:
                raise BENIGN_CAUSE.fail(path, f"valuesets.{vs_id}.benign_causes", name=name,
                                        fix=fix_for(name, set(doc.valuesets) - {vs_id}))
        if vs.text_finds:
            knowledge.text_finds += ((vs_id, tuple(t.lower() for t in vs.text_finds),
                                      tuple(t.lower() for t in vs.text_excludes)),)
        terms = tuple(t.lower() for t in vs.text_terms)
        benign = tuple(t.lower() for t in vs.benign_terms)
        if vs.needs_companion or terms or vs.benign_causes or benign:
            knowledge.rules[vs_id] = ValueSetRule(
                frozenset(vs.needs_companion), terms, benign_causes=frozenset(vs.benign_causes),
                benign_terms=benign, alone_unknown=vs.alone == "unknown")
    knowledge._excluded = excluded
    if doc.site_terms is not None:
        knowledge.site_terms = SiteTerms(frozenset(t.lower() for t in doc.site_terms.lumbar),
                                         frozenset(t.lower() for t in doc.site_terms.other))
    meds = doc.medication_terms
    knowledge.medication_terms = tuple(t.lower() for t in meds.terms) if meds else ()
    knowledge.medication_classes = {
        class_id: _medication_class(class_id, mc, path)
        for class_id, mc in doc.medication_classes.items()}
    knowledge._medication_matcher = MedicationMatcher.build(
        knowledge.medication_classes.values())
    return exact, prefix


_WORDS = re.compile(r"[a-z0-9]+(?:[ -][a-z0-9]+)*")


def _medication_class(class_id: str, mc: MedicationClassModel, path: Path) -> MedicationClass:
    """A medication class with its terms in lower case, each a word or words."""
    terms = tuple(t.strip().lower() for t in mc.terms)
    excludes = tuple(t.strip().lower() for t in mc.exclude_terms)
    for key, words in (("terms", terms), ("exclude_terms", excludes)):
        for i, word in enumerate(words):
            where = f"medication_classes.{class_id}.{key}[{i}]"
            if not _WORDS.fullmatch(word):
                raise MEDICATION_TERM.fail(
                    path, where, which="term" if key == "terms" else "exclude term", term=word,
                    problem="is not a word or words: write letters, digits, spaces or hyphens "
                            "(it is matched as a whole word of the medication's name)")
    for i, word in enumerate(terms):
        if word in excludes:
            raise MEDICATION_TERM.fail(
                path, f"medication_classes.{class_id}.terms[{i}]", which="term", term=word,
                problem="is also an exclude term of the class, so it could never match: keep it "
                        "in one of the two lists")
    return MedicationClass(class_id, mc.description, mc.source, terms, excludes)


# ------------------------------------------------------------------ procedures.yaml


def _coding(code: OrderCode, url: str) -> dict[str, str]:
    out = {"system": url, "code": code.code}
    if code.display:
        out["display"] = code.display
    return out


def _index_procedures(knowledge: Knowledge, doc: ProceduresFile, path: Path,
                      raw: Any) -> dict[Key, str]:
    """Build the procedures; return the index of their codes (each code to one procedure)."""
    proc_codes: dict[Key, str] = {}
    codes_of: dict[str, tuple[dict[str, str], ...]] = {}
    for i, p in enumerate(doc.procedures):
        where = entry_name(("procedures", i), raw)
        if p.id in codes_of:
            raise PROCEDURE_ID.fail(path, where, id=p.id)
        codes = []
        for j, c in enumerate(p.codes):
            here = entry_name(("procedures", i, "codes", j), raw)
            coding = _coding(c, _system_url(c.system, doc.systems, PROCEDURE_SYSTEM, path, here))
            key = _normal(knowledge, coding)
            if proc_codes.get(key, p.id) != p.id:
                raise CODE_TWICE.fail(path, here, code=c.code, system=c.system,
                                      other=proc_codes[key])
            proc_codes[key] = p.id
            codes.append(coding)
        codes_of[p.id] = tuple(codes)
    for i, p in enumerate(doc.procedures):
        order_codes = _order_codes(knowledge, p, doc.systems, proc_codes, path,
                                   ("procedures", i), raw)
        knowledge.procedures[p.id] = Procedure(
            id=p.id, name=p.name, modality=p.modality, contrast=p.contrast, region=p.region,
            rrl=p.rrl, rrl_rank=p.rrl_rank, preference=p.preference, order_codes=order_codes,
            codes=codes_of[p.id], short_name=p.short_name or p.name)
    return proc_codes


def _order_codes(knowledge: Knowledge, p: ProcedureEntry, systems: Mapping[str, str],
                 proc_codes: Mapping[Key, str], path: Path, loc: tuple[str, int],
                 raw: Any) -> tuple[dict[str, str], ...]:
    """The codings the service writes for the procedure: each one of its own codes (an order
    it could not recognise itself would not be rated), each with a display."""
    out = []
    for j, c in enumerate(p.order_codes):
        where = entry_name((*loc, "order_codes", j), raw)
        url = _system_url(c.system, systems, PROCEDURE_SYSTEM, path, where)
        owner = proc_codes.get(_normal(knowledge, {"system": url, "code": c.code}))
        if owner != p.id:
            near = closest(c.code, [k.code for k in p.codes if k.system == c.system])
            raise ORDER_CODE.fail(
                path, where, code=c.code, system=c.system, procedure=p.id,
                elsewhere=f" (it is a code of {owner!r})" if owner else "",
                fix=f"; did you mean {near!r}?" if near else "")
        # every coding the service writes carries a display (EHRs show the first one)
        out.append({**_coding(c, url), "display": c.display or p.name})
    return tuple(out)


def _normal(knowledge: Knowledge, coding: Mapping[str, str]) -> Key:
    key = knowledge.normalize(coding["system"], coding["code"])
    assert key is not None  # (the model refuses an empty code)
    return key


def _combinations(knowledge: Knowledge, doc: ProceduresFile, path: Path,
                  raw: Any) -> tuple[Combination, ...]:
    out = []
    for i, combo in enumerate(doc.combinations):
        for key in ("when", "becomes"):
            name = getattr(combo, key)
            if name not in knowledge.procedures:
                raise COMBINATION.fail(path, f"combinations[{i}].{key}", key=key, name=name,
                                       fix=fix_for(name, knowledge.procedures))
        keys = set()
        for j, c in enumerate(combo.with_any):
            where = entry_name(("combinations", i, "with_any", j), raw)
            url = _system_url(c.system, doc.systems, PROCEDURE_SYSTEM, path, where)
            keys.add(_normal(knowledge, {"system": url, "code": c.code}))
        out.append(Combination(combo.when, combo.becomes, frozenset(keys)))
    return tuple(out)


# ------------------------------------------------------------------ ratings.yaml


def _index_ratings(knowledge: Knowledge, doc: RatingsFile, path: Path) -> None:
    if tuple(doc.variants) != VARIANT_IDS:
        raise VARIANTS.fail(path, "variants", found=", ".join(doc.variants) or "none",
                            expected=", ".join(VARIANT_IDS))
    knowledge.variants = {k: v.name or k for k, v in doc.variants.items()}
    for pid, row in doc.ratings.items():
        if pid not in knowledge.procedures:
            raise RATING_ROW.fail(path, f"ratings.{pid}", name=pid,
                                  fix=fix_for(pid, knowledge.procedures))
        if len(row) != len(VARIANT_IDS):
            raise RATING_LENGTH.fail(path, f"ratings.{pid}", count=len(row),
                                     variants=", ".join(VARIANT_IDS))
        knowledge.ratings[pid] = dict(zip(VARIANT_IDS, row, strict=True))
    missing = set(knowledge.procedures) - set(knowledge.ratings)
    if missing:
        raise RATING_MISSING.fail(path, "ratings", names=", ".join(sorted(missing)))


def _finish_indexes(knowledge: Knowledge, exact: dict[Key, set[str]],
                    prefix: dict[Key, set[str]], proc_codes: dict[Key, str]) -> None:
    knowledge._exact = {k: frozenset(v) for k, v in exact.items()}
    knowledge._prefix = {k: frozenset(v) for k, v in prefix.items()}
    lengths: dict[str, set[int]] = {}
    for system, code in prefix:
        lengths.setdefault(system, set()).add(len(code))
    knowledge._prefix_lengths = {s: tuple(sorted(n)) for s, n in lengths.items()}
    knowledge._procedure_codes = proc_codes
    keys = [*exact, *prefix, *proc_codes]
    systems = [*keys, *((alias, "") for alias in knowledge.aliases)]
    knowledge._longest = (max(len(s) for s, _ in systems) + 16,
                          max(len(c) for _, c in keys) + 16)
