"""Load benchmark: the service against the bare FastAPI stack and the Node peer, same bodies.

    .venv/bin/python bench/run.py [--duration 10] [--rounds 3] [--connections 8]
                                  [--only a-seed-100] [--no-peer]

Needs wrk (Debian: apt-get install wrk); installs nothing into the system and says what is missing.
The peer is the CDS Hooks project's own `pama-imaging` sample service (Node.js, bench/peer.py),
started by this script with its npm dependencies cached under the system temp dir; it is skipped
with a message (not an error) when Node.js/npm is missing or the peer cannot be installed, and
for a request kind it does not answer with 200 (it serves order-select only).
Service and peer take turns (``--rounds``, who goes first alternating), so that a machine whose
speed drifts during the run moves both: each round's service/peer ratio is measured back to back
and the median is reported, with every round's. Prints requests/s, p50/p90/p99 latency, errors
and the server's CPU time per request (all its threads, from /proc) per request kind and server,
the ratios service/bare and service/peer, and the service worker's memory before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
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


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, url: str, body_file: Path, duration: float,
             connections: int) -> dict[str, Any]:
    """One wrk run, with the server's CPU time per answered request (microseconds)."""
    before = cpu_seconds(pid)
    result = wrk(url, body_file, duration, connections)
    used = cpu_seconds(pid) - before
    result["cpu_us"] = used * 1e6 / result["requests"] if result["requests"] else float("nan")
    return result


def peer_check(peer: node_peer.Peer | None, skip: str, hook: str,
               body_file: Path) -> tuple[str | None, str]:
    """(None, what it answered) when the peer answers this request kind with 200; otherwise
    (why it is skipped for it, "")."""
    if peer is None:
        return skip, ""
    if hook != node_peer.HOOK:
        return f"pama-imaging serves {node_peer.HOOK} only, not {hook}", ""
    try:
        check = httpx.post(peer.url, content=body_file.read_bytes(),
                           headers={"Content-Type": "application/json"}, timeout=10)
    except httpx.HTTPError as exc:
        return f"peer did not answer ({exc!r}; log {peer.log})", ""
    if check.status_code != 200:
        first = check.text.strip().splitlines()[0][:120] if check.text.strip() else ""
        return f"peer answered {check.status_code} ({first})", ""
    answer = check.json()
    actions = answer.get("extension", {}).get("systemActions", [])
    ratings = [e["valueCodeableConcept"]["coding"][0]["code"]
               for a in actions for e in a["resource"].get("extension", [])
               if e.get("url", "").endswith("/pama-rating")]
    return None, (f"{len(answer.get('cards', []))} cards, {len(actions)} systemActions"
                  + (f" (rating {', '.join(ratings)})" if ratings else ""))


def _list(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" for v in values)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A server's rounds as one result: the median round's figures (by req/s), the median CPU
    per request, the total requests and errors."""
    by_rps = sorted(runs, key=lambda r: r["rps"])
    out = dict(by_rps[len(by_rps) // 2])
    out["rps"] = statistics.median([r["rps"] for r in runs])
    out["cpu_us"] = statistics.median([r["cpu_us"] for r in runs])
    out["requests"] = sum(r["requests"] for r in runs)
    out["errors"] = sum(r["errors"] for r in runs)
    out["rounds_rps"] = [r["rps"] for r in runs]
    return out


def measure_kind(name: str, hook: str, body_file: Path, service: subprocess.Popen[bytes],
                 urls: dict[str, str], bare: subprocess.Popen[bytes],
                 peer: node_peer.Peer | None, peer_skip: str,
                 args: argparse.Namespace) -> dict[str, Any]:
    """One request kind: service and peer in alternating rounds (each round's ratio measured
    back to back, who goes first alternating), the bare stack once."""
    warm = min(2.0, args.duration)
    skipped, peer_answer = peer_check(peer, peer_skip, hook, body_file)
    servers = {"service": (service.pid, urls["service"])}
    if skipped is None and peer is not None:
        servers["peer"] = (peer.proc.pid, peer.url)
    for _, url in servers.values():
        wrk(url, body_file, warm, args.connections)
    mem_before = rss_mb(service.pid)
    rounds: list[dict[str, Any]] = []
    for i in range(args.rounds):
        order = list(servers) if i % 2 == 0 else list(reversed(servers))
        this = {who: measured(*servers[who], body_file, args.duration, args.connections)
                for who in order}
        if "peer" in this:
            this["ratio_peer"] = (this["service"]["rps"] / this["peer"]["rps"]
                                  if this["peer"]["rps"] else 0.0)
        rounds.append(this)
    mem_after = rss_mb(service.pid)
    wrk(urls["bare"], body_file, warm, args.connections)
    ref = measured(bare.pid, urls["bare"], body_file, args.duration, args.connections)
    svc = summary([r["service"] for r in rounds])
    result: dict[str, Any] = {
        "bytes": body_file.stat().st_size, "service": svc, "bare": ref,
        "ratio": svc["rps"] / ref["rps"] if ref["rps"] else 0.0,
        "rss_before_mb": mem_before, "rss_after_mb": mem_after}
    if "peer" in servers:
        result["peer"] = summary([r["peer"] for r in rounds])
        result["peer"]["answer"] = peer_answer
        ratios = [r["ratio_peer"] for r in rounds]
        result["ratio_peer"] = statistics.median(ratios)
        result["ratio_peer_rounds"] = ratios
        result["cpu_ratio_peer"] = (result["peer"]["cpu_us"] / svc["cpu_us"]
                                    if svc["cpu_us"] else 0.0)
    else:
        result["peer"] = {"skipped": skipped}
        result["ratio_peer"] = None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating service/peer rounds per request kind (median kept)")
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
            urls = {"service": f"http://127.0.0.1:{service_port}{path}",
                    "bare": f"http://127.0.0.1:{bare_port}{path}"}
            check = httpx.post(urls["service"], content=files[name].read_bytes(),
                               headers={"Content-Type": "application/json"}, timeout=10)
            if check.status_code != 200:
                raise SystemExit(f"{name}: service answered {check.status_code}: {check.text}")
            results[name] = measure_kind(name, hook, files[name], service, urls, bare, peer,
                                         peer_skip, args)
            results[name]["cards"] = len(check.json()["cards"])
    finally:
        service.terminate()
        bare.terminate()
        if peer is not None:
            peer.stop()
        service.wait(10)
        bare.wait(10)

    print(f"one uvicorn worker each, one node process for the peer, {args.connections} "
          f"connections, wrk -t2; {args.rounds} alternating rounds of {args.duration:.0f} s for "
          "service and peer (median), the bare stack once")
    print("ratio = service req/s / bare req/s and / peer req/s (the median of the rounds' "
          "ratios, each measured back to back); CPU = the server's CPU time per request")
    print(f"{'request':<14}{'KB':>6}  {'server':<8}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}"
          f"{'p99 ms':>9}{'errors':>8}{'CPU us':>8}{'ratio/bare':>11}{'ratio/peer':>11}")
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
                  f"{x['errors']:>8}{x['cpu_us']:>8.0f}{ratios}")
    print()
    for name, r in results.items():
        if r["ratio_peer"] is not None:
            rounds = ", ".join(f"{x:.2f}" for x in r["ratio_peer_rounds"])
            print(f"{name}: service/peer by round {rounds} (median {r['ratio_peer']:.2f}); "
                  f"service req/s {_list(r['service']['rounds_rps'])}, peer "
                  f"{_list(r['peer']['rounds_rps'])}; CPU per request: peer/service "
                  f"{r['cpu_ratio_peer']:.2f}")
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
