"""The checks the loaders make beyond each file's model, declared once with their messages.

A :class:`Check` is what ``docs/knowledge-checks.md`` lists (``python -m cds_service.knowledge.doc``
writes the page) and what the loaders raise: the message of a refused file is always
``<file>: <entry>: <the check's message>``, the message ending in the fix (a did-you-mean for a
misspelled id or key).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cds_service.errors import StartupError


class KnowledgeError(StartupError, ValueError):
    """The knowledge files are missing, malformed or inconsistent."""


def closest(word: object, choices: Iterable[str]) -> str | None:
    """The choice a misspelled word most likely meant, or None."""
    found = difflib.get_close_matches(str(word), sorted(set(choices)), n=1, cutoff=0.6)
    return found[0] if found else None


def fix_for(word: object, choices: Iterable[str], listed: str = "use one of") -> str:
    """The fix for a word that is not one of the choices: the closest one, else all of them."""
    options = sorted(set(choices))
    near = closest(word, options)
    if near is not None:
        return f"did you mean {near!r}?"
    return f"{listed} {', '.join(options)}" if options else "none is defined"


@dataclass(frozen=True)
class Check:
    """One rule a loader enforces: the file it reads, when the file is refused, the message."""

    file: str  # as the page names it: "valuesets.yaml", "cards/common.yaml", ...
    refused: str  # when the file is refused (a sentence for the page)
    message: str  # str.format template; the loader prefixes the file and the entry
    error: type[StartupError] = KnowledgeError

    def text(self, **values: Any) -> str:
        """The message with its values filled in (raised inside a model's validator)."""
        return self.message.format(**values)

    def fail(self, path: Path | str, where: str, **values: Any) -> StartupError:
        """The exception to raise: the file, the entry, the message."""
        entry = f"{where}: " if where else ""
        return self.error(f"{path}: {entry}{self.text(**values)}")


# ------------------------------------------------------------------ knowledge files

ENTRY_SYSTEM = Check(
    "valuesets.yaml",
    "an entry's `system` is neither a key of `systems` nor a URL (`http...`, `urn:...`)",
    "system {system!r} is neither a key of systems nor a URL: {fix}")
ENTRY_VERIFIED = Check(
    "valuesets.yaml",
    "an entry's `verified` is not `yes`, `partial` or `true`",
    "verified is {value!r}: unverified codes must be kept out (check the code in its source "
    "and write verified: yes or partial, or remove the entry)")
ENTRY_CODE = Check(
    "valuesets.yaml",
    "an entry has both or neither of `code` and `prefix`, or an empty one",
    "give exactly one of code or prefix, not empty (code: one code; prefix: the code and every "
    "code below it)")
COMPANION = Check(
    "valuesets.yaml",
    "`needs_companion` names a value set that is not defined",
    "needs_companion names an unknown value set {name!r}: {fix}")
BENIGN_CAUSE = Check(
    "valuesets.yaml",
    "`benign_causes` names a value set that is not defined",
    "benign_causes names an unknown value set {name!r}: {fix}")
VALUESET_READ = Check(
    "valuesets.yaml",
    "a value set the rules read by id is missing (renamed or removed); checked when the engine "
    "is built",
    "no value set {name!r}, which {reader} reads by id: {fix} (a missing set matches nothing, "
    "so its fact would silently never count)")
MEDICATION_TERM = Check(
    "valuesets.yaml",
    "a medication class's term or exclude term is not a word or words (letters, digits, spaces, "
    "hyphens), or is both a term and an exclude term of the class",
    "{which} {term!r} {problem}")
PROCEDURE_SYSTEM = Check(
    "procedures.yaml",
    "a code's `system` is neither a key of `systems` nor a URL (`http...`, `urn:...`)",
    "system {system!r} is neither a key of systems nor a URL: {fix}")
PROCEDURE_ID = Check(
    "procedures.yaml",
    "two procedures have the same `id`",
    "id {id!r} is used twice: give each procedure its own id")
CODE_TWICE = Check(
    "procedures.yaml",
    "a code identifies two procedures",
    "code {code} ({system}) also identifies procedure {other!r}: keep it under one procedure")
ORDER_CODE = Check(
    "procedures.yaml",
    "an order code is not among the procedure's own `codes` (the service would write an order "
    "it cannot itself recognise)",
    "order code {code} ({system}) is not among the codes of {procedure!r}{elsewhere}: add it to "
    "its codes with a source, or correct the order code{fix}")
COMBINATION = Check(
    "procedures.yaml",
    "a combination's `when` or `becomes` is not the id of a procedure",
    "{key} names {name!r}, which is not a procedure: {fix}")
VARIANTS = Check(
    "ratings.yaml",
    "`variants` is not exactly V1 to V7, in order",
    "variants are {found}; the ACR criteria have {expected}, in order")
RATING_ROW = Check(
    "ratings.yaml",
    "a row names a procedure that is not in procedures.yaml",
    "{name!r} is not a procedure of procedures.yaml: {fix}")
RATING_LENGTH = Check(
    "ratings.yaml",
    "a row does not have one category per variant (seven)",
    "{count} categories; give one per variant, in the order {variants}")
RATING_MISSING = Check(
    "ratings.yaml",
    "a procedure of procedures.yaml has no row",
    "no row for {names}: add one (seven categories) per procedure")
QUESTION_LINK_ID = Check(
    "questions.yaml",
    "two questions have the same `linkId`",
    "linkId {link_id!r} is used twice: each question needs a unique linkId (answers are "
    "stored under it)")
QUESTION_ANSWERS = Check(
    "questions.yaml",
    "a `choice` question lists no answers, or another type lists some",
    "a {type} question {has}: a choice lists its answers (code, display); other types list "
    "none")
QUESTION_ENABLE = Check(
    "questions.yaml",
    "`enable_when` does not name an earlier `boolean` question",
    "enable_when names {name!r}, which is not an earlier boolean question: {fix}")

KNOWLEDGE_CHECKS = (ENTRY_SYSTEM, ENTRY_VERIFIED, ENTRY_CODE, COMPANION, VALUESET_READ,
                    MEDICATION_TERM, PROCEDURE_SYSTEM, PROCEDURE_ID, CODE_TWICE, ORDER_CODE,
                    COMBINATION, VARIANTS, RATING_ROW, RATING_LENGTH, RATING_MISSING,
                    QUESTION_LINK_ID, QUESTION_ANSWERS, QUESTION_ENABLE, BENIGN_CAUSE)
