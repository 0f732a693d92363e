"""The loaded knowledge and its code lookup indexes (built once by the loader).

:class:`Knowledge` answers the per-resource questions of a request: which value sets a coding
belongs to, which catalog procedure it orders. The lookups are cached, bounded by the lengths of
the known codes, so a request cannot grow the caches with codes that cannot match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cds_service.knowledge.vocabulary import CATEGORY_RANK, ICD10CM


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
    # a finding of the set does not count beside a condition of these sets (a benign cause), or
    # when its own text names one of these words
    benign_causes: frozenset[str] = frozenset()
    benign_terms: tuple[str, ...] = ()
    alone_unknown: bool = False  # without companion or words: the fact is unknown, not no


_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class SiteTerms:
    """Words that place a code naming no site in the lumbar spine or elsewhere."""

    lumbar: frozenset[str] = frozenset()
    other: frozenset[str] = frozenset()

    def site_of(self, text: str) -> str | None:
        """"lumbar" or "other" when the text names only one of them; None when it names
        neither, or both (a descriptor listing "cervical, thoracic, or lumbar")."""
        words = set(_WORD.findall(text.lower()))
        lumbar, other = bool(words & self.lumbar), bool(words & self.other)
        if lumbar == other:
            return None
        return "lumbar" if lumbar else "other"


@dataclass(frozen=True)
class MedicationClass:
    """A class of drugs read from a medication's name: its terms (lower-case ingredient names,
    each matched as a whole word) and the words (forms, routes) that exclude a medication."""

    id: str
    description: str
    source: str
    terms: tuple[str, ...]
    exclude_terms: tuple[str, ...] = ()


@dataclass(frozen=True)
class MedicationMatcher:
    """Every class's terms and exclusions in one pattern: one scan of a medication's text."""

    pattern: re.Pattern[str] | None = None
    classes_of_term: dict[str, frozenset[str]] = field(default_factory=dict)
    classes_excluded_by: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, classes: Iterable[MedicationClass]) -> MedicationMatcher:
        of_term: dict[str, set[str]] = {}
        excluded_by: dict[str, set[str]] = {}
        for mc in classes:
            for term in mc.terms:
                of_term.setdefault(term, set()).add(mc.id)
            for word in mc.exclude_terms:
                excluded_by.setdefault(word, set()).add(mc.id)
        words = sorted(set(of_term) | set(excluded_by), key=lambda w: (-len(w), w))
        if not words:
            return cls()
        # whole words: not inside another word ("prednisolone" is not read in
        # "methylprednisolone", which is a term of its own)
        pattern = re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(w) for w in words)
                             + r")(?![\w-])")
        return cls(pattern, {k: frozenset(v) for k, v in of_term.items()},
                   {k: frozenset(v) for k, v in excluded_by.items()})

    def classes_of(self, text: str) -> frozenset[str]:
        if self.pattern is None:
            return frozenset()
        found = set(self.pattern.findall(text.lower()))
        if not found:
            return frozenset()
        hits: set[str] = set()
        excluded: set[str] = set()
        for word in found:
            hits |= self.classes_of_term.get(word, frozenset())
            excluded |= self.classes_excluded_by.get(word, frozenset())
        return frozenset(hits - excluded)


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
    # classes of drugs read as facts (systemic_corticosteroids, immunosuppressive_drugs), by id
    medication_classes: dict[str, MedicationClass] = field(default_factory=dict)
    combinations: tuple[Combination, ...] = ()
    site_terms: SiteTerms = field(default_factory=SiteTerms)
    # (value set, phrases that find it in a Condition's text, phrases that exclude it)
    text_finds: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = ()
    directory: Path | None = None  # where the files were read (named in messages)
    _displays: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    _by_text: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
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
    _screened: dict[tuple[str, str], tuple[frozenset[str], Any, bool]] = field(
        default_factory=dict, repr=False)
    _medication_matcher: MedicationMatcher = field(default_factory=MedicationMatcher,
                                                   repr=False)
    _medication_cache: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
    _systems_read: frozenset[str] | None = field(default=None, repr=False)

    def normalize(self, system: Any, code: Any) -> tuple[str, str] | None:
        """The (system, code) pair used for comparisons, or None for an empty coding."""
        if not system or not code or not isinstance(system, str) or not isinstance(code, str):
            return None
        system = self.aliases.get(system.strip(), system.strip())
        code = code.strip()
        if system == ICD10CM:
            code = code.replace(".", "").upper()
        return system, code

    def reads_system(self, system: Any) -> bool:
        """Whether the knowledge holds codes of this system: a coding in any other system (a
        local code) cannot be told apart from one that matters."""
        if type(system) is not str:
            return False
        known = self._systems_read
        if known is None:
            known = frozenset(s for s, _ in (*self._exact, *self._prefix, *self._procedure_codes))
            self._systems_read = known
        return self.aliases.get(system.strip(), system.strip()) in known

    def valuesets_of(self, system: Any, code: Any) -> frozenset[str]:
        """Ids of every value set the coding belongs to (empty for most codes: a cheap check);
        any JSON value may come in (typed Any: the compiled module checks declared types).

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

    def medication_classes_of(self, text: str) -> frozenset[str]:
        """Ids of the medication classes a medication's text or display names (empty for most).

        A class matches when one of its terms is a whole word of the text (case ignored) and
        none of its exclude terms is: "Prednisone 5 MG Oral Tablet" is in
        ``systemic_corticosteroids``, "Hydrocortisone 1 % Topical Cream" is not. Called once per
        MedicationRequest: one regular-expression scan, cached for short texts.
        """
        if not isinstance(text, str) or not text:
            return frozenset()
        cached = self._medication_cache.get(text)
        if cached is not None:
            return cached
        found = self._medication_matcher.classes_of(text)
        if len(text) <= 512:
            if len(self._medication_cache) > 20_000:
                self._medication_cache.clear()
            self._medication_cache[text] = found
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

    def displays_in(self, valueset: str) -> list[str]:
        """Our displays of the codes of a value set (the names a card may give its findings)."""
        return [d for (system, code), d in self._displays.items()
                if valueset in self._exact.get((system, code), ())
                or valueset in self._prefix.get((system, code), ())]

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

    def sets_by_text(self, text: str) -> frozenset[str]:
        """The value sets whose phrases a Condition's text names (for a code in no value set:
        injection drug use recorded under a code no set lists)."""
        known = self._by_text.get(text)
        if known is not None:
            return known
        lowered = text.lower()
        found = frozenset(vs for vs, finds, excludes in self.text_finds
                          if any(f in lowered for f in finds)
                          and not any(x in lowered for x in excludes))
        if len(self._by_text) > 20_000:  # a chart repeats its texts; many charts do not
            self._by_text.clear()
        self._by_text[text] = found
        return found

    def screen(self, concept: Any) -> tuple[frozenset[str], Procedure | None, bool]:
        """Value sets and catalog procedure of a CodeableConcept's codings, and whether any
        coding is a code of a system the knowledge reads (else the concept is unreadable: text
        only, a local code), in one pass.

        The per-resource screen of a chart: one cached lookup per coding, nothing else for
        the visits and labs that make most of a record.
        """
        codings = concept.get("coding") if type(concept) is dict else None
        if type(codings) is list and len(codings) == 1 and type(codings[0]) is dict:
            system, code = codings[0].get("system"), codings[0].get("code")
            if type(system) is str and type(code) is str:  # the usual concept: one coding
                known = self._screened.get((system, code))
                if known is not None:
                    return known
        sets: frozenset[str] = frozenset()
        proc: Procedure | None = None
        readable = False
        if type(codings) is not list:
            return sets, proc, readable
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
            readable = readable or found[2]
        return sets, proc, readable

    def _screen_one(self, system: str,
                    code: str) -> tuple[frozenset[str], Procedure | None, bool]:
        found = (self.valuesets_of(system, code), self._procedure_of(system, code),
                 self.reads_system(system))
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
