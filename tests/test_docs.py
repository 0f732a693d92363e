"""The documentation cannot go stale: README.md and the pages under docs/ are checked against the
code.

- docs/configuration.md holds the table ``cds_service.settings_doc.render_table()`` builds from
  the Settings model (rewrite it with ``.venv/bin/python -m cds_service.settings_doc --write``);
- every relative link resolves to a file of the repository, and every ``#anchor`` to a heading of
  the page it names (GitHub's slugs);
- every ``CDS_...`` name the docs mention is a real variable, and every one the code, the tests
  or the deployment files use is documented;
- the rating matrix, the questions, the card kinds and the value-set ids the pages list are those
  of the knowledge and card files.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

from cds_service import settings_doc
from cds_service.knowledge import KNOWLEDGE_DIR, VARIANTS, load_knowledge, read_yaml_mapping
from cds_service.questionnaire import load_questions
from cds_service.render import KINDS
from cds_service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
CONFIGURATION = DOCS / "configuration.md"
CLINICAL = DOCS / "clinical-logic.md"
EDITING = DOCS / "editing-knowledge.md"

# CDS_ variables read outside the Settings model: by `cds-service serve`, the tests, the benchmark.
OTHER_VARIABLES = frozenset({
    "CDS_WORKERS",  # cds_service/cli.py
    "CDS_NATIVE",  # cds_service/native.py
    "CDS_TEST_POSTGRES_URL",  # tests/, .ci/run
    "CDS_BENCH_POSTGRES_URL",  # bench/soak.py
    "CDS_PEER_DIR", "CDS_PEER_INSTALL_TIMEOUT",  # bench/peer.py
    "CDS_SCHEMATHESIS_EXAMPLES",  # tests/test_schemathesis.py
    "CDS_SANDBOX_BUILD", "CDS_SANDBOX_DOCS",  # tests/e2e/test_sandbox.py
    "CDS_SMART_APP_DOCS",  # tests/e2e/test_smart_app_page.py
    "CDS_SMART_LAUNCHER_DEPS",  # tests/e2e/smart_launcher.py
})
# Where the code, tests and deployment name variables (this file aside: it lists them)
CODE_GLOBS = ("cds_service/**/*.py", "tests/**/*.py", "bench/**/*.py", "bench/*.lua",
              "fixtures/*.py", "docs/*.py", "deploy/**/*", ".ci/run", "Makefile")
VARIABLE = re.compile(r"\bCDS_[A-Z0-9_]+")
EXTERNAL = ("http://", "https://", "mailto:")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

FENCE = re.compile(r"^(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------ markdown reading


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        opened = FENCE.match(line.lstrip())
        if fence is None and opened:
            fence = opened.group(1)[0]
            continue
        if fence is not None:
            if opened and opened.group(1)[0] == fence:
                fence = None
            continue
        yield number, line


def link_targets(text: str) -> Iterator[tuple[int, str]]:
    """(line number, target) of every link and image of a markdown text, code aside."""
    for number, line in prose_lines(text):
        line = INLINE_CODE.sub("", line)
        for pattern in (INLINE_LINK, REFERENCE, HTML_LINK):
            for match in pattern.finditer(line):
                yield number, match.group(1)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text, lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown page: its headings' slugs (repeats numbered) and HTML ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    text = path.read_text(encoding="utf-8")
    for _, line in prose_lines(text):
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    found |= set(HTML_ANCHOR.findall(text))
    return found


def broken(page: Path, target: str) -> str | None:
    """Why a link target of the page does not resolve, or None."""
    if target.startswith(EXTERNAL):
        return None
    if not target or SCHEME.match(target):
        return "not a file of the repository"
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part)
    if not path_part:
        resolved = page
    elif path_part.startswith("/"):
        resolved = (ROOT / path_part.lstrip("/")).resolve()
    else:
        resolved = (page.parent / path_part).resolve()
    if not resolved.is_relative_to(ROOT):
        return "outside the repository"
    if not resolved.exists():
        return "no such file"
    if anchor and resolved.suffix == ".md" and unquote(anchor).lower() not in anchors(resolved):
        return f"no heading #{anchor} in {rel(resolved)}"
    return None


# ------------------------------------------------------------------ configuration table


def page_variables(table: str) -> set[str]:
    return set(re.findall(r"^\| `(CDS_[A-Z0-9_]+)` \|", table, re.MULTILINE))


def test_configuration_table_is_the_generated_one() -> None:
    page = settings_doc.table_in_page(CONFIGURATION.read_text(encoding="utf-8"))
    generated = settings_doc.render_table()
    missing = sorted(page_variables(generated) - page_variables(page))
    gone = sorted(page_variables(page) - page_variables(generated))
    assert page == generated, (
        f"docs/configuration.md is not the table of the Settings model (missing: {missing or '-'}; "
        f"documented but gone: {gone or '-'}; or a default or meaning changed). "
        f"Run: {settings_doc.WRITE_COMMAND}")


def test_the_table_has_a_row_per_setting() -> None:
    rows = page_variables(settings_doc.render_table())
    assert rows == {settings_doc.variable(name) for name in Settings.model_fields}


def test_a_setting_without_a_meaning_fails_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    fewer = {k: v for k, v in settings_doc.DESCRIPTIONS.items() if k != "max_body_bytes"}
    monkeypatch.setattr(settings_doc, "DESCRIPTIONS", fewer)
    with pytest.raises(settings_doc.SettingsDocError,
                       match="no description for CDS_MAX_BODY_BYTES"):
        settings_doc.render_table()


def test_a_meaning_of_no_setting_fails_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    more = {**settings_doc.DESCRIPTIONS, "retired_option": "gone"}
    monkeypatch.setattr(settings_doc, "DESCRIPTIONS", more)
    with pytest.raises(settings_doc.SettingsDocError, match="not a setting: CDS_RETIRED_OPTION"):
        settings_doc.render_table()


def test_a_stray_unset_note_fails_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_doc, "WHEN_UNSET", {**settings_doc.WHEN_UNSET, "gone": "x"})
    with pytest.raises(settings_doc.SettingsDocError, match="CDS_GONE"):
        settings_doc.render_table()


def test_write_replaces_only_the_table() -> None:
    page = f"intro\n\n{settings_doc.START}\nold\n{settings_doc.END}\n\nbelow\n"
    written = settings_doc.with_table(page, "| new |\n")
    assert written == f"intro\n\n{settings_doc.START}\n| new |\n{settings_doc.END}\n\nbelow\n"
    assert settings_doc.table_in_page(written) == "| new |\n"


# ------------------------------------------------------------------ links


def test_the_pages_are_there() -> None:
    for page in (CONFIGURATION, CLINICAL, EDITING):
        assert page in PAGES


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_resolves(page: Path) -> None:
    problems = [f"{rel(page)}:{number}: {target}: {why}"
                for number, target in link_targets(page.read_text(encoding="utf-8"))
                if (why := broken(page, target))]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_link_check_sees_what_it_must(tmp_path: Path) -> None:
    text = ("# A title\n## Same\n## Same\n[ok](#a-title) [two](#same-1) [web](https://x.org)\n"
            "[bad](#nowhere) ![img](missing.png) `[code](skipped.md)`\n"
            "```\n[fenced](skipped.md)\n```\n[ref]: other.md\n")
    targets = [t for _, t in link_targets(text)]
    assert targets == ["#a-title", "#same-1", "https://x.org", "#nowhere", "missing.png",
                       "other.md"]
    page = ROOT / "docs" / "any.md"
    assert slug("The order's own indication") == "the-orders-own-indication"
    assert slug("`CDS_ENV` and [a link](x.md)") == "cds_env-and-a-link"
    assert broken(page, "clinical-logic.md#card-kinds-and-the-alert-policy") is None
    assert broken(page, "editing-knowledge.md#value-sets-valuesetsyaml") is None
    assert broken(page, "clinical-logic.md#no-such-heading")
    assert broken(page, "no-such-page.md")
    assert broken(page, "../../outside.md") == "outside the repository"


# ------------------------------------------------------------------ variables


def settings_variables() -> set[str]:
    return {settings_doc.variable(name) for name in Settings.model_fields}


def known(name: str, variables: set[str]) -> bool:
    """A real variable, or (ending in _, as in CDS_JWKS_*) the prefix of one."""
    if name.endswith("_"):
        return any(v.startswith(name) for v in variables)
    return name in variables


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_variable_the_docs_name_is_real(page: Path) -> None:
    variables = settings_variables() | OTHER_VARIABLES
    named = set(VARIABLE.findall(page.read_text(encoding="utf-8")))
    unknown = sorted(n for n in named if not known(n, variables))
    assert not unknown, (f"{rel(page)} names variables that are neither a Settings field nor "
                         f"read elsewhere: {', '.join(unknown)}")


def code_files() -> Iterator[Path]:
    for pattern in CODE_GLOBS:
        for path in sorted(ROOT.glob(pattern)):
            if path.is_file() and path != Path(__file__).resolve() and ".venv" not in path.parts:
                yield path


def code_variables() -> dict[str, set[str]]:
    """variable -> the files of code, tests and deployment that name it."""
    found: dict[str, set[str]] = {}
    for path in code_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a binary file
        for name in VARIABLE.findall(text):
            found.setdefault(name, set()).add(rel(path))
    return found


def test_every_variable_the_code_uses_is_documented() -> None:
    used = code_variables()
    strays = {n: sorted(files) for n, files in used.items()
              if not known(n, settings_variables() | OTHER_VARIABLES)}
    assert not strays, ("variables used but neither a setting nor in OTHER_VARIABLES of "
                        f"tests/test_docs.py (document them in docs/configuration.md): {strays}")
    page = CONFIGURATION.read_text(encoding="utf-8")
    undocumented = sorted(v for v in OTHER_VARIABLES if v not in page)
    assert not undocumented, f"docs/configuration.md does not list {undocumented}"


def test_every_other_variable_is_still_used() -> None:
    gone = sorted(OTHER_VARIABLES - set(code_variables()))
    assert not gone, f"no code reads {gone} any more: drop them from OTHER_VARIABLES and the docs"


# ------------------------------------------------------------------ clinical pages


def test_the_rating_matrix_on_the_clinical_page_is_ratings_yaml() -> None:
    knowledge = load_knowledge()
    rows = ["| procedure | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
    for pid, row in knowledge.ratings.items():
        name = knowledge.procedures[pid].name
        rows.append(f"| `{pid}` {name} | " + " | ".join(row[v] for v in VARIANTS) + " |")
    table = "\n".join(rows)
    assert table in CLINICAL.read_text(encoding="utf-8"), (
        "the rating matrix in docs/clinical-logic.md differs from "
        f"cds_service/knowledge/ratings.yaml; it should read:\n{table}")


def test_every_question_is_on_the_clinical_page() -> None:
    text = CLINICAL.read_text(encoding="utf-8")
    missing = [q.link_id for q in load_questions().items if f"| `{q.link_id}` |" not in text]
    assert not missing, f"docs/clinical-logic.md does not list the questions {missing}"


@pytest.mark.parametrize("page", [CLINICAL, EDITING], ids=rel)
def test_every_card_kind_is_on_the_page(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert not [k for k in KINDS if f"`{k}`" not in text]


def test_every_value_set_is_on_the_editing_page() -> None:
    ids = read_yaml_mapping(KNOWLEDGE_DIR / "valuesets.yaml", ValueError)["valuesets"]
    text = EDITING.read_text(encoding="utf-8")
    missing = [vs for vs in ids if f"`{vs}`" not in text]
    assert not missing, f"docs/editing-knowledge.md does not list the value sets {missing}"
