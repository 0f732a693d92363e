"""Load benchmark: the service against the bare FastAPI stack and the Node peer, same bodies.

    .venv/bin/python bench/run.py [--duration 10] [--connections 8] [--only a-seed-100] [--no-peer]

Needs wrk (Debian: apt-get install wrk); installs nothing into the system and says what is missing.
The peer is the CDS Hooks project's own `pama-imaging` sample service (Node.js, bench/peer.py),
started by this script with its npm dependencies cached under the system temp dir; it is skipped
with a message (not an error) when Node.js/npm is missing or the peer cannot be installed, and
for a request kind it does not answer with 200 (it serves order-select only).
Prints requests/s, p50/p90/p99 latency and errors per request kind and server, the ratios
service/bare and service/peer measured in the same run, and the service worker's memory before
and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import peer as node_peer  # noqa: E402
from bodies import build  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(app: str, port: int, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    # The server's log goes to a file: a pipe nobody reads fills up and stalls the server.
    log = Path(tempfile.mkstemp(prefix="cds-bench-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--no-access-log", "--log-level", "warning"],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{app} did not start: {log.read_text()[-4000:]}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk_missing() -> bool:
    """True (and says so) when wrk is not installed."""
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk (Debian). Nothing was run.",
              file=sys.stderr)
        return True
    return False


def wrk(url: str, body_file: Path, duration: float, connections: int) -> dict[str, Any]:
    env = {**os.environ, "BODY_FILE": str(body_file)}
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", str(connections), "-d", f"{max(duration, 1):.0f}s",
         "--latency", "-s", str(HERE / "post.lua"), url],
        env=env, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = {"raw": out}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rps"] = float(m.group(1)) if m else 0.0
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        result[f"p{pct}"] = float(m.group(1)) * UNITS[m.group(2)] if m else float("nan")
    m = re.search(r"(\d+) requests in", out)
    result["requests"] = int(m.group(1)) if m else 0
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors += sum(int(x) for x in m.groups()) if m else 0
    result["errors"] = errors
    return result


def measure_peer(peer: node_peer.Peer | None, skip: str, hook: str, body_file: Path,
                 svc: dict[str, Any], warm: float, args: argparse.Namespace) -> dict[str, Any]:
    """The peer's numbers for one request kind, like the other two: a 200 check, warm-up, run.

    {"peer": wrk result (+ "answer") or {"skipped": why}, "ratio_peer": service/peer or None}.
    """
    if peer is None:
        return {"peer": {"skipped": skip}, "ratio_peer": None}
    if hook != node_peer.HOOK:
        return {"peer": {"skipped": f"pama-imaging serves {node_peer.HOOK} only, not {hook}"},
                "ratio_peer": None}
    try:
        check = httpx.post(peer.url, content=body_file.read_bytes(),
                           headers={"Content-Type": "application/json"}, timeout=10)
    except httpx.HTTPError as exc:
        return {"peer": {"skipped": f"peer did not answer ({exc!r}; log {peer.log})"},
                "ratio_peer": None}
    if check.status_code != 200:
        first = check.text.strip().splitlines()[0][:120] if check.text.strip() else ""
        return {"peer": {"skipped": f"peer answered {check.status_code} ({first})"},
                "ratio_peer": None}
    answer = check.json()
    actions = answer.get("extension", {}).get("systemActions", [])
    ratings = [e["valueCodeableConcept"]["coding"][0]["code"]
               for a in actions for e in a["resource"].get("extension", [])
               if e.get("url", "").endswith("/pama-rating")]
    wrk(peer.url, body_file, warm, args.connections)
    result = wrk(peer.url, body_file, args.duration, args.connections)
    result["answer"] = (f"{len(answer.get('cards', []))} cards, {len(actions)} systemActions"
                        + (f" (rating {', '.join(ratings)})" if ratings else ""))
    return {"peer": result, "ratio_peer": svc["rps"] / result["rps"] if result["rps"] else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--only", action="append", help="request kinds to run (default all)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--no-peer", action="store_true", help="do not run the Node peer")
    args = parser.parse_args(argv)
    if wrk_missing():
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="cds-bench-"))
    requests = build()
    if args.only:
        requests = {k: v for k, v in requests.items() if k in args.only}
    files = {}
    for name, (_, body) in requests.items():
        files[name] = tmp / f"{name}.json"
        files[name].write_text(json.dumps(body))

    base_env = {**os.environ, "CDS_ENV": "development", "CDS_DATA_DIR": str(tmp / "data"),
                "CDS_LOG_LEVEL": "WARNING"}
    # The peer first: its npm install (first run only) must not overlap a measurement.
    peer: node_peer.Peer | None = None
    peer_skip = "disabled with --no-peer"
    if not args.no_peer:
        try:
            peer = node_peer.start(tmp, free_port())
            print(f"peer: {peer.description}", flush=True)
        except (node_peer.PeerUnavailable, OSError) as exc:
            peer_skip = str(exc)
    if peer is None:
        print(f"peer skipped: {peer_skip}", flush=True)
    service_port, bare_port = free_port(), free_port()
    try:
        service = start("cds_service.app:app", service_port, base_env, ROOT)
        bare = start("bare:app", bare_port, base_env, HERE)
    except BaseException:
        if peer is not None:
            peer.stop()
        raise
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, (hook, _) in requests.items():
            path = f"/cds-services/lbp-imaging-{hook}"
            check = httpx.post(f"http://127.0.0.1:{service_port}{path}",
                               content=files[name].read_bytes(),
                               headers={"Content-Type": "application/json"}, timeout=10)
            if check.status_code != 200:
                raise SystemExit(f"{name}: service answered {check.status_code}: {check.text}")
            cards = len(check.json()["cards"])
            warm = min(2.0, args.duration)
            wrk(f"http://127.0.0.1:{service_port}{path}", files[name], warm, args.connections)
            mem_before = rss_mb(service.pid)
            svc = wrk(f"http://127.0.0.1:{service_port}{path}", files[name], args.duration,
                      args.connections)
            mem_after = rss_mb(service.pid)
            wrk(f"http://127.0.0.1:{bare_port}{path}", files[name], warm, args.connections)
            ref = wrk(f"http://127.0.0.1:{bare_port}{path}", files[name], args.duration,
                      args.connections)
            results[name] = {"bytes": files[name].stat().st_size, "cards": cards,
                             "service": svc, "bare": ref,
                             "ratio": svc["rps"] / ref["rps"] if ref["rps"] else 0.0,
                             "rss_before_mb": mem_before, "rss_after_mb": mem_after}
            results[name].update(measure_peer(peer, peer_skip, hook, files[name], svc, warm,
                                              args))
    finally:
        service.terminate()
        bare.terminate()
        if peer is not None:
            peer.stop()
        service.wait(10)
        bare.wait(10)

    print(f"one uvicorn worker each, one node process for the peer, {args.connections} "
          f"connections, {args.duration:.0f} s per run, wrk -t2; "
          "ratio = service req/s / bare req/s and / peer req/s")
    print(f"{'request':<14}{'KB':>6}  {'server':<8}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}"
          f"{'p99 ms':>9}{'errors':>8}{'ratio/bare':>11}{'ratio/peer':>11}")
    for name, r in results.items():
        for who in ("service", "bare", "peer"):
            x = r[who]
            head = f"{name:<14}{r['bytes'] / 1024:>6.0f}  {who:<8}"
            if "skipped" in x:
                print(f"{head}skipped: {x['skipped']}")
                continue
            ratios = ""
            if who == "service":
                vs_peer = f"{r['ratio_peer']:.2f}" if r["ratio_peer"] is not None else "-"
                ratios = f"{r['ratio']:>11.2f}{vs_peer:>11}"
            print(f"{head}{x['rps']:>9.0f}{x['p50']:>9.2f}{x['p90']:>9.2f}{x['p99']:>9.2f}"
                  f"{x['errors']:>8}{ratios}")
    print()
    for name, r in results.items():
        if "answer" in r["peer"]:
            print(f"{name}: peer answered 200 with {r['peer']['answer']}")
    for name, r in results.items():
        print(f"{name}: service worker RSS {r['rss_before_mb']:.1f} MB after warm-up, "
              f"{r['rss_after_mb']:.1f} MB after {r['service']['requests']} more requests")
    if args.json:
        for r in results.values():
            for who in ("service", "bare", "peer"):
                r[who].pop("raw", None)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
