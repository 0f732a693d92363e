"""The example answers in docs/examples/ are what `cds-service evaluate` says for the fixtures,
at the fixtures' clock: a test compares them, so an example cannot drift from the service.

Rewrite them after a deliberate change with:
    .venv/bin/python -m tests.test_doc_examples --write
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "docs" / "examples"
NOW = "2026-11-01T12:00:00Z"  # the fixtures' clock (fixtures/expected.json "now")
# fixture -> why it is an example
EXAMPLES = {
    "v3-seed-mri-w": "the seed patient's MRI with contrast: a warning card suggesting MRI "
                     "without contrast, and the rating",
    "v3-seed-mri-wo": "the same patient's MRI without contrast: usually appropriate, no card, "
                      "only the rating",
    "candidate-without-recorded-care-mri-wo": "the record cannot settle the rating: an info "
                                              "card asking two questions through the SMART app",
    "v7-cancer-mri-w": "a red flag (cancer): another scenario, another suggestion",
    "order-sign-three": "order-sign with three drafts: each order rated",
}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def evaluate(name: str) -> str:
    """The response JSON of the real command line for one fixture, its uuids numbered."""
    run = subprocess.run(
        [sys.executable, "-m", "cds_service", "evaluate", f"fixtures/requests/{name}.json",
         "--now", NOW, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "CDS_ENV": "development",
             "CDS_DATA_DIR": tempfile.gettempdir()}, check=True)
    seen: dict[str, str] = {}

    def number(match: re.Match[str]) -> str:
        return seen.setdefault(match.group(0), f"00000000-0000-4000-8000-{len(seen) + 1:012d}")

    return json.dumps(json.loads(UUID.sub(number, run.stdout)), indent=2) + "\n"


def index() -> str:
    lines = ["# Example answers", "",
             "What the service answers for some of the fixtures, written by "
             "`tests/test_doc_examples.py` from `cds-service evaluate FILE --now "
             f"{NOW} --json` (uuids numbered; a test fails when an example differs from what "
             "the service says). Each request is the fixture it names.", "",
             "| request | answer | what it shows |", "|---|---|---|"]
    for name, why in EXAMPLES.items():
        lines.append(f"| [{name}.json](../../fixtures/requests/{name}.json) | "
                     f"[{name}.response.json]({name}.response.json) | {why} |")
    return "\n".join(lines) + "\n"


def write() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    (FOLDER / "README.md").write_text(index())
    for name in EXAMPLES:
        (FOLDER / f"{name}.response.json").write_text(evaluate(name))


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_the_example_is_what_the_service_answers(name: str) -> None:
    path = FOLDER / f"{name}.response.json"
    assert path.is_file(), "run: .venv/bin/python -m tests.test_doc_examples --write"
    assert path.read_text() == evaluate(name), (
        f"{path.name} differs from what the service answers now; if the change is meant, "
        "run: .venv/bin/python -m tests.test_doc_examples --write")


def test_the_index_lists_every_example() -> None:
    assert (FOLDER / "README.md").read_text() == index()


if __name__ == "__main__" and "--write" in sys.argv:
    write()
