"""FHIR fetch latency: hook calls whose record the service must fetch from a slow FHIR server.

    .venv/bin/python bench/fetch_latency.py [--calls 200] [--clients 1] [--latency 0.1]
        [--page-size 20]
        [--record seed-100 --record few-380] [--server hapi --server fixed]
        [--ref e1aecb8] [--env CDS_FHIR_BUDGET_SECONDS=0.4 ...] [--json out.json]

The FHIR server is the tests' own (tests/fhir_server.py) on loopback: every answer waits
``--latency`` seconds, and its pages hold ``--page-size`` entries. ``hapi`` honours ``_count`` up
to 200 (HAPI's default and maximum page sizes are 20 and 200), ``fixed`` ignores it (a server
that always answers pages of ``--page-size``: the worst case). The service runs in uvicorn (one
worker, development mode, the FHIR server allow-listed); each call is an order-select for a
lumbar MRI that sends no prefetch but ``fhirServer`` and a token, so that the service fetches the
patient and the five searches (the test server has no QuestionnaireResponse endpoint: that
optional search gets a 404 and changes nothing). Calls are made one after another (or by
``--clients`` clients side by side); each call's wall time is measured at the client (the fetch
is nearly all of it). "overlap" is the most requests in the FHIR server at once, "next" the
most ``next`` pages at once (with one client: within one call). Each answer is compared
with the service's answer when the prefetch holds the whole record ("diff": 200s that differ).

``--ref`` runs the service as it was at a git commit (``git archive`` into a temp dir, run from
there), to measure "before" with the code of then. ``--env`` adds settings to the service's
environment. Not part of ``make test``; the results are in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

from run import free_port, start  # noqa: E402

from tests.builders import hook_request, large_record, order  # noqa: E402
from tests.fhir_server import FhirTestServer, peak_overlap  # noqa: E402
from tests.test_fhir_integration import comparable as answer_without_ids  # noqa: E402

TOKEN = "bench-token-" + "5" * 20
RECORDS = {  # name -> (conditions, procedures, service requests) of the seed patient
    "seed-100": (40, 60, 4),  # as the load benchmark's a-seed-100
    "few-380": (160, 180, 40),  # several pages of 20 per search, each search under the cap
}
SERVERS = {"hapi": 200, "fixed": None}  # name -> the largest _count honoured (None: ignored)
PATH = "/cds-services/lbp-imaging-order-select"


def record_body(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hook body with its full prefetch, the record the FHIR server serves): an order of a
    lumbar MRI without contrast for the seed patient (low back pain for 16 weeks, 8 weeks of
    physical therapy), whose record is grown with unrelated resources and served with the
    patient's own resources last (tests/builders.py ``large_record``, as the tests use it). A
    real server's order is its own; this is the order in which a fetch cut short shows."""
    now = datetime.now(UTC)
    prefetch = large_record(now, *RECORDS[name])
    body = hook_request(order(cpt="72148"), prefetch=prefetch)
    return body, copy.deepcopy(prefetch)


def comparable(answer: dict[str, Any]) -> str:
    """The answer without its per-call identifiers (card and action uuids, urn:uuid values)."""
    return json.dumps(answer_without_ids(answer), sort_keys=True)


def service_tree(ref: str | None) -> Path:
    """The folder to run the service from: this checkout, or ``ref`` exported."""
    if ref is None:
        return ROOT
    tree = Path(tempfile.mkdtemp(prefix="cds-fetch-bench-ref-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def run_calls(port: int, body: dict[str, Any], calls: int, expected: str,
              clients: int = 1) -> dict[str, Any]:
    """``calls`` hook calls, ``clients`` at a time (each client one call after another):
    status counts, latency percentiles (ms), and the 200s whose answer differs from
    ``expected`` (the answer with the full prefetch)."""
    raw = json.dumps(body).encode()

    def one_client(n: int) -> list[tuple[float, int, bool]]:
        rows = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for _ in range(n):
                started = time.perf_counter()
                r = client.post(PATH, content=raw, headers={"Content-Type": "application/json"})
                seconds = time.perf_counter() - started
                rows.append((seconds, r.status_code,
                             r.status_code == 200 and comparable(r.json()) != expected))
        return rows

    shares = [calls // clients + (i < calls % clients) for i in range(clients)]
    with ThreadPoolExecutor(clients) as pool:
        rows = [row for part in pool.map(one_client, shares) for row in part]
    ms = [seconds * 1000 for seconds, _, _ in rows]
    statuses = Counter(status for _, status, _ in rows)
    return {"calls": calls, "statuses": dict(statuses), "different": sum(d for *_, d in rows),
            "p50_ms": round(statistics.median(ms), 1), "p95_ms": round(percentile(ms, 0.95), 1),
            "max_ms": round(max(ms), 1), "412": statuses.get(412, 0)}


def answer_with_prefetch(port: int, body: dict[str, Any]) -> str:
    """The service's answer when the prefetch holds the whole record (no fetch)."""
    r = httpx.post(f"http://127.0.0.1:{port}{PATH}", json=body, timeout=30)
    if r.status_code != 200:
        raise SystemExit(f"the service answered {r.status_code} with the full prefetch: {r.text}")
    return comparable(r.json())


def measure(args: argparse.Namespace, tree: Path, record: str, server_kind: str) -> dict[str, Any]:
    full, prefetch = record_body(record)
    body = {k: v for k, v in full.items() if k != "prefetch"}
    with FhirTestServer(args.page_size, latency=args.latency,
                        max_count=SERVERS[server_kind]) as fhir:
        fhir.data[body["context"]["patientId"]] = prefetch
        body["fhirServer"] = fhir.base
        body["fhirAuthorization"] = {"access_token": TOKEN, "token_type": "Bearer",
                                     "expires_in": 300, "scope": "patient/*.read",
                                     "subject": "cds-service"}
        env = {**os.environ, "CDS_ENV": "development", "CDS_LOG_LEVEL": "WARNING",
               "CDS_DATA_DIR": tempfile.mkdtemp(prefix="cds-fetch-bench-"),
               "CDS_FHIR_ALLOWED_SERVERS": fhir.base, "PYTHONPATH": str(tree)}
        env.update(dict(e.split("=", 1) for e in args.env))
        port = free_port()
        service = start("cds_service.app:app", port, env, tree)
        try:
            expected = answer_with_prefetch(port, full)
            run_calls(port, body, min(10, args.calls), expected, args.clients)  # warm-up
            fhir.requests.clear()
            fhir.served.clear()
            result = run_calls(port, body, args.calls, expected, args.clients)
        finally:
            service.terminate()
            service.wait(10)
        result["requests_per_call"] = round(len(fhir.served) / args.calls, 1)
        result["peak_overlap"] = peak_overlap(fhir.served)
        # next pages of different searches in the server at once (0: no next page was asked)
        result["next_overlap"] = peak_overlap([s for s in fhir.served if "page=" in s.path])
    entries = {k: len(prefetch[k]["entry"]) for k in ("conditions", "procedures",
                                                       "servicerequests")}
    return {"record": record, "resources": sum(entries.values()) + 1, "server": server_kind,
            **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--clients", type=int, default=1, help="calls at a time")
    parser.add_argument("--latency", type=float, default=0.1, help="seconds per FHIR answer")
    parser.add_argument("--page-size", type=int, default=20, help="entries per page")
    parser.add_argument("--record", action="append", choices=sorted(RECORDS))
    parser.add_argument("--server", action="append", choices=sorted(SERVERS))
    parser.add_argument("--ref", help="git commit to run the service from (default: this tree)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    tree = service_tree(args.ref)
    code = args.ref or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                      capture_output=True, text=True).stdout.strip() + "+tree"
    print(f"service from {code} ({tree}); FHIR server: {args.latency * 1000:g} ms per answer, "
          f"pages of {args.page_size}; {args.calls} calls each, {args.clients} at a time; "
          f"settings {args.env or 'default'}", flush=True)
    print(f"{'record':9} {'res':>4} {'server':6} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} "
          f"{'412':>4} {'diff':>4} {'req/call':>8} {'overlap':>7} {'next':>4}  statuses")
    results = []
    for record in args.record or list(RECORDS):
        for server_kind in args.server or list(SERVERS):
            r = measure(args, tree, record, server_kind)
            results.append(r)
            print(f"{record:9} {r['resources']:>4} {server_kind:6} {r['p50_ms']:>7} "
                  f"{r['p95_ms']:>7} {r['max_ms']:>7} {r['412']:>4} {r['different']:>4} "
                  f"{r['requests_per_call']:>8} {r['peak_overlap']:>7} {r['next_overlap']:>4}  "
                  f"{r['statuses']}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"code": code, "settings": args.env,
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
