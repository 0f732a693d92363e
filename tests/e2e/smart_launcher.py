"""The SMART Health IT launcher's backend (../shared/tools/smart-launcher: a real SMART App
Launch authorisation server the project did not write), run for a test on a loopback port.

Its npm packages (the backend's pinned versions) are installed once with npm into
``CDS_SMART_LAUNCHER_DEPS`` (default ``var-launcher/`` in the checkout, ignored by git); the
launcher's tree is copied to a temporary folder beside a link to them (the shared folder is
read-only in CI). It proxies FHIR calls to ``fhir`` (a loopback server of the test). A test
that cannot have it (no node, no npm registry) is skipped with the reason.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from tests.conftest import ROOT

PACKAGES = ["express@4.21.2", "cors@2.8.5", "jsonwebtoken@8.5.1", "node-jose@2.2.0",
            "cross-fetch@3.1.5", "ts-node@10.9.1", "typescript@4.8.4", "@types/node@16"]


def launcher_tree() -> Path | None:
    for shared in (ROOT.parent / "shared", Path("/work/shared")):
        tree = shared / "tools" / "smart-launcher"
        if (tree / "backend" / "index.ts").is_file():
            return tree
    return None


def dependencies() -> Path | str:
    """The folder holding the launcher's node_modules (installed when missing), or why not."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are not installed"
    folder = Path(os.environ.get("CDS_SMART_LAUNCHER_DEPS") or ROOT / "var-launcher")
    if (folder / "node_modules" / ".bin" / "ts-node").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "package.json").write_text('{"name": "launcher-deps", "private": true}\n')
    try:
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", *PACKAGES], cwd=folder,
                       check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"npm install of the launcher's packages failed ({type(exc).__name__})"
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ehr_launch(patient: str, provider: str, encounter: str, client_id: str,
               redirect_uri: str) -> str:
    """The launcher's ``launch`` value for a provider EHR launch that needs no login and no
    approval page (its codec: a base64url JSON array), PKCE required."""
    fields = [0, patient, provider, encounter, 1, 1, 0, "", redirect_uri, client_id, "", "",
              "", "", 0, 2, ""]
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")


class SmartLauncher:
    """``with SmartLauncher(deps, fhir_base) as launcher:`` its FHIR base is ``launcher.iss``."""

    def __init__(self, tree: Path, deps: Path, fhir_base: str, workdir: Path) -> None:
        self.dir = workdir / "smart-launcher"
        shutil.copytree(tree, self.dir)
        (self.dir / "node_modules").symlink_to(deps / "node_modules")
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.iss = f"{self.origin}/v/r4/fhir"
        self.env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1",
                    "NODE_ENV": "production", "SECRET": "launcher-test-secret",
                    "FHIR_SERVER_R4": fhir_base, "FHIR_SERVER_R3": "", "FHIR_SERVER_R2": ""}
        self.log = workdir / "smart-launcher.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(self.dir / "node_modules" / ".bin" / "ts-node"), "--skipProject",
                 "--transpile-only", "backend/index.ts"], cwd=self.dir, env=self.env,
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the launcher stopped: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.iss}/.well-known/smart-configuration",
                             timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the launcher did not start: {self.log.read_text()[-2000:]}")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
