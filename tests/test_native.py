"""The compiled hot path (cds_service/native.py): used only when built from the sources on disk.

Each case runs a fresh interpreter on a copy of the package, as a deployment would import it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cds_service import native

PROBE = ("import cds_service.native as n, cds_service.clinical.scan as s, "
         "cds_service.answer.cards as c; print(n.STATE); print(s.__file__); print(c.__file__)")

compiled_here = pytest.mark.skipif(
    not native.built().get("compiled"),
    reason="the checkout has no compiled build (no C compiler): cds-service native build")


def probe(root: Path, **env: str) -> tuple[str, list[str]]:
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root), **env}, timeout=120)
    assert run.returncode == 0, run.stderr
    state, *files = run.stdout.splitlines()
    return state, files


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    shutil.copytree(native.PACKAGE, tmp_path / "cds_service",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@compiled_here
def test_a_current_build_is_loaded(package_copy: Path) -> None:
    state, files = probe(package_copy)
    assert state == "compiled (mypyc)"
    assert all(f.endswith(".so") for f in files), files


@compiled_here
def test_an_edited_source_wins_over_its_stale_build(package_copy: Path) -> None:
    """All or none: one edited module makes every listed module load from its source."""
    rules = package_copy / "cds_service" / "clinical" / "rules.py"
    rules.write_text(rules.read_text() + "\n# edited after the build\n")
    state, files = probe(package_copy)
    assert state.startswith("pure Python: the sources changed"), state
    assert all(f.endswith(".py") for f in files), files


@compiled_here
def test_cds_native_0_asks_for_the_sources(package_copy: Path) -> None:
    state, files = probe(package_copy, CDS_NATIVE="0")
    assert state == "pure Python: CDS_NATIVE=0"
    assert all(f.endswith(".py") for f in files), files


def test_without_a_build_the_sources_are_loaded(package_copy: Path) -> None:
    (package_copy / "cds_service" / "native.json").unlink(missing_ok=True)
    state, files = probe(package_copy)
    assert state == "pure Python: not built (make install)"
    assert all(f.endswith(".py") for f in files), files


def test_a_failed_build_is_said_and_not_retried_with_the_same_tools(package_copy: Path) -> None:
    manifest = package_copy / "cds_service" / "native.json"
    for so in (package_copy / "cds_service").rglob("*.so"):
        so.unlink()
    # the digest of the copy is the checkout's: the same sources, the same interpreter
    manifest.write_text(json.dumps({"digest": native.digest(), "compiled": False,
                                    "reason": "no cc", "toolchain": native.toolchain()}))
    state, files = probe(package_copy)
    assert state == "pure Python: the build failed: no cc"
    assert all(f.endswith(".py") for f in files), files
    run = subprocess.run([sys.executable, "-c", "from cds_service import native; native.build()"],
                         cwd=package_copy, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(package_copy)})
    assert run.returncode == 0 and "up to date (pure Python)" in run.stdout, run


def test_every_listed_module_has_its_source() -> None:
    assert len(set(native.MODULES)) == len(native.MODULES)
    for module in native.MODULES:
        assert native.source_of(module).is_file(), module
