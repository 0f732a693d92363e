"""The hook call's hot path compiled with mypyc, and the guard that keeps the sources the truth.

    cds-service native build    # compile in place (`make install` does it)
    cds-service native status   # compiled or pure Python, and why

The modules in ``MODULES`` are plain typed Python (the clinical core, the record, the answer).
mypyc (part of mypy) turns them into C extension modules beside their sources: about 40 % less
of the service's own CPU per hook call (30 % of the whole call), the same code. A compiled
module is used only while it was built from the sources on disk: ``native.json`` records a
digest of them, and when it is missing, stale (a source edited since the build) or the build
failed, every listed module is loaded from its ``.py`` file instead (all or none: compiled
modules call each other directly). ``CDS_NATIVE=0`` asks for pure Python. The state is logged
at start-up and shown by ``status``.

mypyc trusts the type hints: a value of another type than declared raises ``TypeError`` where
plain Python would carry on. The test suite runs against the compiled modules for that reason.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent
MANIFEST = PACKAGE / "native.json"
GROUP = "cds_service._native"  # the shared library: cds_service/_native__mypyc.*.so
OFF = {"0", "false", "no", "off"}

# The hot path of a hook call, leaves first. Not here: modules with pydantic models (render,
# protocol), which mypyc cannot compile, and the async web and database layers.
MODULES = (
    "cds_service.limits",
    "cds_service.knowledge.index",
    "cds_service.record.prefetch",
    "cds_service.clinical.dates",
    "cds_service.clinical.model",
    "cds_service.clinical.registry",
    "cds_service.clinical.scan",
    "cds_service.clinical.rules",
    "cds_service.clinical.answers",
    "cds_service.clinical.facts",
    "cds_service.clinical.scenario",
    "cds_service.answer.policy",
    "cds_service.answer.payloads",
    "cds_service.answer.rating",
    "cds_service.answer.cards",
    "cds_service.questionnaire",
    "cds_service.engine",
)


def source_of(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def digest() -> str:
    """What a build is valid for: the listed sources, byte for byte, and this Python."""
    h = hashlib.sha256(sys.implementation.cache_tag.encode())
    for module in MODULES:
        h.update(module.encode() + b"\0" + source_of(module).read_bytes() + b"\0")
    return h.hexdigest()


def built() -> dict[str, object]:
    try:
        found = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def why_pure() -> str | None:
    """None when the compiled modules may be used, else the reason they are not."""
    if os.environ.get("CDS_NATIVE", "1").strip().lower() in OFF:
        return "CDS_NATIVE=0"
    manifest = built()
    if not manifest:
        return "not built (make install)"
    if manifest.get("digest") != digest():
        return "the sources changed since the build (make install rebuilds)"
    if not manifest.get("compiled"):
        return f"the build failed: {manifest.get('reason', '?')}"
    try:
        importlib.import_module(f"{GROUP}__mypyc")
    except ImportError as exc:
        return f"the compiled library does not load ({exc})"
    return None


class SourcesFirst(importlib.abc.MetaPathFinder):
    """Loads the listed modules from their ``.py`` files even where a compiled one sits beside."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_of(fullname))


STATE = "pure Python"


def guard() -> str:
    """Decide once, before any listed module is imported; the state as said at start-up."""
    global STATE
    reason = why_pure()
    if reason is None:
        STATE = "compiled (mypyc)"
    else:
        if not any(isinstance(f, SourcesFirst) for f in sys.meta_path):
            sys.meta_path.insert(0, SourcesFirst())
        STATE = f"pure Python: {reason}"
    return STATE


def compiled_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.so") if p.is_file()]


def toolchain() -> str:
    """What a failed build depends on besides the sources: tried again when it changes."""
    versions = []
    for dist in ("mypy", "setuptools"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"no {dist}")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "no cc"
    return ", ".join([*versions, compiler])


def build() -> int:
    """Compile the listed modules in place; on failure leave pure Python (and say why)."""
    wanted = digest()
    manifest = built()
    if manifest.get("digest") == wanted and (
            manifest.get("compiled") or manifest.get("toolchain") == toolchain()):
        print(f"native: up to date ({'compiled' if manifest.get('compiled') else 'pure Python'})")
        return 0
    for old in compiled_files():
        old.unlink()
    work = Path(tempfile.mkdtemp(prefix="cds-native-"))
    cwd = Path.cwd()
    try:
        from mypyc.build import mypycify
        from setuptools import setup

        os.chdir(ROOT)
        paths = [str(source_of(m).relative_to(ROOT)) for m in MODULES]
        extensions = mypycify(["--follow-imports=silent", "--ignore-missing-imports", *paths],
                              opt_level="3", debug_level="0", group_name=GROUP,
                              target_dir=str(work / "c"))
        setup(name="cds-native", ext_modules=extensions, script_args=[
            "build_ext", "--inplace", "--build-temp", str(work / "o"), "--parallel", "2"])
        result = {"digest": wanted, "compiled": True, "modules": list(MODULES)}
        print(f"native: compiled {len(MODULES)} modules")
    except (Exception, SystemExit) as exc:  # no compiler, a type error: pure Python still works
        for partial in compiled_files():
            partial.unlink()
        reason = ("mypy or the C compiler failed (their messages are above)"
                  if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {str(exc)[:300]}")
        result = {"digest": wanted, "compiled": False, "reason": reason,
                  "toolchain": toolchain()}
        print(f"native: not compiled, the service runs as pure Python ({reason})", file=sys.stderr)
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    MANIFEST.write_text(json.dumps(result, indent=1) + "\n")
    return 0
