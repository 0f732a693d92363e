"""The Node peer for bench/run.py: the CDS Hooks project's own sample service `pama-imaging`.

Source: github.com/cds-hooks/sandbox-cds-services (see ../shared/peers/README.md), found via the
environment variable CDS_PEER_DIR, else ROOT.parent/shared/peers/sandbox-cds-services, else
/work/shared/peers/sandbox-cds-services. Its lock file pins a package the registry no longer
serves, so its runtime dependencies (package.json "dependencies") are installed by name with npm
into a cache folder under the system temp dir, keyed by the package list, and reused on later
runs; the source is copied to the run's scratch folder with `node_modules` linked to the cache.
Nothing is written into the repository or into the peer's folder.

Everything that can go wrong before the peer answers raises PeerUnavailable with a message saying
why: the benchmark then reports the peer as skipped and measures the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SERVICE_PATH = "/cds-services/pama-imaging"
HOOK = "order-select"  # the only hook pama-imaging serves (discovery/service-definitions.json)
# fhirpath 0.17 (package.json: ^0.17.5) depends on fs@0.0.1-security, which the registry no
# longer serves; 2.x keeps the `fhirpath.evaluate(resource, path)` the service uses.
OVERRIDES = {"fhirpath": "^2"}
CACHE_FORMAT = 1  # bump to invalidate every cached install


class PeerUnavailable(Exception):
    """The peer cannot be run here (the message says why)."""


@dataclass
class Peer:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    description: str
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{SERVICE_PATH}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def locate() -> Path:
    """The peer's source folder (see the module docstring for the order searched)."""
    configured = os.environ.get("CDS_PEER_DIR")
    if configured:
        candidates = [Path(configured)]
    else:
        candidates = [ROOT.parent / "shared" / "peers" / "sandbox-cds-services",
                      Path("/work/shared/peers/sandbox-cds-services")]
    for path in candidates:
        if (path / "server.js").is_file() and (path / "package.json").is_file():
            return path
    where = " or ".join(str(p) for p in candidates)
    raise PeerUnavailable(f"peer source not found (no server.js/package.json in {where}; "
                          "set CDS_PEER_DIR)")


def packages(source: Path) -> list[str]:
    """The peer's runtime dependencies as npm specs, with the OVERRIDES applied, sorted."""
    deps = json.loads((source / "package.json").read_text()).get("dependencies", {})
    return sorted(f"{name}@{OVERRIDES.get(name, spec)}" for name, spec in deps.items())


def cache_dir(specs: list[str]) -> Path:
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, specs]).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"cds-bench-peer-{key}"


def _check_owned(path: Path) -> None:
    # The temp dir is shared: never run code from a folder someone else could have planted.
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PeerUnavailable(f"{path} is not owned by this user or is writable by others; "
                              "remove it to reinstall")


def install(specs: list[str], timeout: float) -> tuple[Path, bool]:
    """node_modules for specs, from the cache or installed now: (folder, was it cached)."""
    cache = cache_dir(specs)
    done = cache / "installed.json"
    if done.is_file():
        _check_owned(cache)
        return cache / "node_modules", True
    # Install into a private staging folder, then rename: a half-finished install is never used.
    staging = Path(tempfile.mkdtemp(prefix=cache.name + ".partial-", dir=cache.parent))
    try:
        env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false",
               "npm_config_audit": "false", "npm_config_loglevel": "error"}
        for cmd in (["npm", "init", "-y"], ["npm", "install", *specs]):
            try:
                run = subprocess.run(cmd, cwd=staging, env=env, capture_output=True, text=True,
                                     timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise PeerUnavailable(f"`{' '.join(cmd)}` took more than {timeout:.0f} s "
                                      "(is the npm registry reachable?)") from exc
            if run.returncode != 0:
                tail = (run.stderr or run.stdout).strip().splitlines()[-6:]
                raise PeerUnavailable(f"`{' '.join(cmd)}` failed ({run.returncode}): "
                                      + " | ".join(tail))
        (staging / "installed.json").write_text(json.dumps({"packages": specs}, indent=2))
        try:
            staging.rename(cache)
        except OSError as exc:  # another run finished the same install first: use theirs
            if not done.is_file():
                raise PeerUnavailable(f"cannot move the npm install to {cache}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the rename succeeded
    _check_owned(cache)
    return cache / "node_modules", False


def _versions(modules: Path, names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = json.loads((modules / name / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            out[name] = "?"
    return out


def start(scratch: Path, port: int, install_timeout: float | None = None) -> Peer:
    """Install (or reuse) the dependencies, copy the source into scratch, start `node server.js`.

    One Node process, stdout and stderr to scratch/peer.log. Waits until the discovery endpoint
    answers 200. install_timeout: seconds per npm command (default: env
    CDS_PEER_INSTALL_TIMEOUT, else 300).
    """
    if install_timeout is None:
        install_timeout = float(os.environ.get("CDS_PEER_INSTALL_TIMEOUT", "300"))
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(n for n, p in (("node", node), ("npm", npm)) if p is None)
        raise PeerUnavailable(f"{missing} not found on PATH (install Node.js 20 and npm)")
    try:
        node_version = subprocess.run([node, "--version"], capture_output=True, text=True,
                                      timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise PeerUnavailable(f"`node --version` failed: {exc}") from exc
    source = locate()
    specs = packages(source)
    modules, cached = install(specs, install_timeout)

    app = scratch / "peer-app"
    shutil.copytree(source, app, ignore=shutil.ignore_patterns("node_modules", ".git", "tests"),
                    copy_function=shutil.copyfile)
    for d, _, _ in os.walk(app):  # copytree copies the read-only folder modes: make them ours
        os.chmod(d, 0o755)
    (app / "node_modules").symlink_to(modules, target_is_directory=True)

    log = scratch / "peer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([node, "server.js"], cwd=app, env={**os.environ, "PORT": str(port)},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    versions = _versions(modules, [s.rsplit("@", 1)[0] for s in specs])
    peer = Peer(proc, port, log, "", versions)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerUnavailable(f"node server.js exited ({proc.returncode}): "
                                  + log.read_text(errors="replace")[-1500:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/cds-services", timeout=0.5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    else:
        peer.stop()
        raise PeerUnavailable("node server.js did not answer within 30 s: "
                              + log.read_text(errors="replace")[-1500:])
    deps = ", ".join(f"{k} {v}" for k, v in versions.items()
                     if k in ("express", "body-parser", "fhirpath"))
    peer.description = (f"sandbox-cds-services pama-imaging ({source}), node {node_version}, "
                        f"{deps}; npm install {'cached' if cached else 'done now'} in "
                        f"{modules.parent}")
    return peer
