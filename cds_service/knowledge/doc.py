"""The page ``docs/knowledge-checks.md``: what the loaders check, generated from them.

Each file's keys come from its model (type, required or default, description); the checks beyond
the models come from their declarations (:data:`cds_service.knowledge.checks.KNOWLEDGE_CHECKS`,
:data:`cds_service.render.CARD_CHECKS`), with the message each gives. ``tests/`` fails when the
page is stale; rewrite it with::

    .venv/bin/python -m cds_service.knowledge.doc --write
"""

from __future__ import annotations

import argparse
import re
import sys
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cds_service.knowledge.checks import KNOWLEDGE_CHECKS, Check
from cds_service.knowledge.models import ProceduresFile, QuestionsFile, RatingsFile, ValueSetsFile
from cds_service.knowledge.yaml import unwrap
from cds_service.render import ASSUMPTIONS, CARD_CHECKS, KINDS, PHRASES, CommonFile, KindFile
from cds_service.settings import PROJECT_DIR

PAGE = PROJECT_DIR / "docs" / "knowledge-checks.md"
WRITE_COMMAND = ".venv/bin/python -m cds_service.knowledge.doc --write"
# (file as the checks name it, its model, where it lives)
FILES: tuple[tuple[str, type[BaseModel], str], ...] = (
    ("valuesets.yaml", ValueSetsFile, "`CDS_KNOWLEDGE_DIR`, else `cds_service/knowledge/`"),
    ("procedures.yaml", ProceduresFile, "`CDS_KNOWLEDGE_DIR`, else `cds_service/knowledge/`"),
    ("ratings.yaml", RatingsFile, "`CDS_KNOWLEDGE_DIR`, else `cds_service/knowledge/`"),
    ("questions.yaml", QuestionsFile, "`CDS_KNOWLEDGE_DIR`, else `cds_service/knowledge/`"),
    ("cards/common.yaml", CommonFile, "`CDS_CARDS_DIR`, else `cards/`"),
    ("cards/<kind>.yaml", KindFile, "`CDS_CARDS_DIR`, else `cards/`; one file per card kind"),
)
INTRO = f"""# What the loader checks

<!-- Generated from the loaders by `{WRITE_COMMAND}`: do not edit by hand. -->

The service reads the knowledge and card files once, at start-up, and refuses to start on anything
it cannot use. Every message has the form `<file>: <entry>: <what is wrong and the fix>`, the entry
named by its path in the file (`valuesets.cancer.entries[2] (C44)`, `procedures[1] (mri-wo)`), the
fix a did-you-mean where a key, id or value looks misspelled. How to edit the files:
[editing-knowledge.md](editing-knowledge.md).

Every file is refused when it cannot be read, is not YAML, does not hold a mapping, or gives a key
twice. A key not listed below is refused (`unknown key 'shortname': did you mean 'short_name'?`),
as is a key with no value, which is what a comma inside an unquoted value makes: quote values that
hold a comma (`source: "CPT 2026 (SPECT/CT, 2+ areas)"`). A required key that is missing, a value
of the wrong type or outside the values listed is refused, naming the entry.
"""


def type_text(annotation: Any) -> str:
    """A field's value in words: text, whole number, one of ..., list of ..."""
    annotation = unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return f"mapping of {type_text(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    names = {str: "text", int: "whole number", bool: "`true` or `false`"}
    return names.get(annotation, "see the meaning")


def need_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    default = info.get_default(call_default_factory=False)
    if info.default_factory is not None or default in (None, PydanticUndefined):
        return "optional"
    return f"default `{default}`"


def _nested(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """(path suffix, model) when the field holds mappings of keys of their own."""
    annotation = unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "", annotation
    if origin is list and _nested(args[0]):
        suffix, model = _nested(args[0])  # type: ignore[misc]
        return f"[]{suffix}", model
    if origin is dict and _nested(args[1]):
        suffix, model = _nested(args[1])  # type: ignore[misc]
        return f".<id>{suffix}", model
    return None


def field_rows(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """One table row per key, the keys of nested mappings after their parent."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{info.alias or name}"
        yield (f"| `{key}` | {_cell(type_text(info.annotation))} | {need_text(info)} | "
               f"{_cell(info.description or '')} |")
        nested = _nested(info.annotation)
        if nested is not None:
            yield from field_rows(nested[1], f"{key}{nested[0]}.")


def message_text(check: Check) -> str:
    """A check's message as a pattern: ``{name!r}`` becomes ``<name>``."""
    text = re.sub(r"\{(\w+)(?:![rs])?\}", r"<\1>", check.message)
    return text.replace("{{", "{").replace("}}", "}")


def file_section(file: str, model: type[BaseModel], where: str,
                 checks: list[Check]) -> list[str]:
    lines = [f"## `{file}`", "", f"In {where}. {_first_line(model)}", "",
             "| key | value | need | meaning |", "|---|---|---|---|", *field_rows(model)]
    if checks:
        lines += ["", "Beyond the keys, the file is refused when:", "",
                  "| refused when | message (after `<file>: <entry>: `) |", "|---|---|"]
        lines += [f"| {_cell(c.refused)} | `{_cell(message_text(c))}` |" for c in checks]
    return [*lines, ""]


def render_page() -> str:
    """The whole page."""
    checks = [*KNOWLEDGE_CHECKS, *CARD_CHECKS]
    unplaced = [c.file for c in checks if c.file not in {f for f, _, _ in FILES}]
    if unplaced:
        raise ValueError(f"checks of files the page does not list: {unplaced}")
    lines = [INTRO]
    for file, model, where in FILES:
        lines += file_section(file, model, where, [c for c in checks if c.file == file])
        lines += EXTRA.get(file, lambda: [])()
    return "\n".join(lines).rstrip("\n") + "\n"


def wording_table() -> list[str]:
    """The phrases and assumptions the engine uses, with the placeholders it fills in."""
    lines = ["The phrases and assumptions the engine uses (each is required), and the placeholders "
             "it fills in for each:", "", "| section | code | placeholders |", "|---|---|---|"]
    for section, used in (("phrases", PHRASES), ("assumptions", ASSUMPTIONS)):
        for code, names in used.items():
            shown = ", ".join(f"`{{{n}}}`" for n in names) or "none"
            lines.append(f"| `{section}` | `{code}` | {shown} |")
    return [*lines, ""]


def kinds_note() -> list[str]:
    kinds = ", ".join(f"`{k}`" for k in KINDS)
    return [f"The card kinds, one file each: {kinds}. The folder also holds `evidence.j2`, the "
            "block every detail can include; a missing file stops the start.", ""]


EXTRA = {"cards/common.yaml": wording_table, "cards/<kind>.yaml": kinds_note}


def _first_line(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip().splitlines()
    text = doc[0] if doc else ""
    text = text.split(": ", 1)[-1].replace("``", "`").rstrip(".")
    return text[:1].upper() + text[1:] + "."


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cds_service.knowledge.doc",
                                     description="The page docs/knowledge-checks.md.")
    parser.add_argument("--write", action="store_true", help=f"rewrite {PAGE}")
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is stale")
    args = parser.parse_args(argv)
    page = render_page()
    if args.check:
        current = PAGE.exists() and PAGE.read_text(encoding="utf-8") == page
        print(f"{PAGE}: " + ("up to date" if current else f"stale; run {WRITE_COMMAND}"))
        return 0 if current else 1
    if not args.write:
        print(page, end="")
        return 0
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
