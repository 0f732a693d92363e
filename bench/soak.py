"""Soak: the service at its measured capacity on PostgreSQL; then one audit row per call.

    .venv/bin/python bench/soak.py [--duration 60] [--connections 8] [--json FILE]

A fresh PostgreSQL database is created for the run (CDS_BENCH_POSTGRES_URL, default the local
server's `test` database's server) and dropped after. The service runs as in production (one
uvicorn worker, PostgreSQL audit); wrk first measures its capacity for the seed chart, then keeps
it at that load (the same connections, unthrottled) for the soak. Afterwards the number of hook
calls the service answered (its own request counter) must equal the rows in its audit table.
Prints and returns requests/s, latency, errors, calls vs audit rows, and the worker's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bodies import build  # noqa: E402
from run import free_port, rss_mb, start, wrk, wrk_missing  # noqa: E402

DEFAULT_PG = "postgresql+asyncpg://root@127.0.0.1:5432/test"
HOOK_ROUTE = 'route="/cds-services/{service_id}",status="200"'


def admin_sql(url: str, sql: str) -> Any:
    import asyncpg

    async def run() -> Any:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def answered_calls(base: str) -> int:
    """Hook calls answered 200, from the service's own request counter."""
    total = 0.0
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("cds_http_requests_total{") and HOOK_ROUTE in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def audit_rows(db_url: str) -> int:
    return int(admin_sql(db_url, "SELECT count(*) FROM hook_call"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="soak seconds")
    parser.add_argument("--measure", type=float, default=10.0, help="capacity run seconds")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if wrk_missing():
        return 2
    server_url = os.environ.get("CDS_BENCH_POSTGRES_URL", DEFAULT_PG)
    name = f"cds_soak_{uuid.uuid4().hex[:10]}"
    try:
        admin_sql(server_url, f'CREATE DATABASE "{name}"')
    except OSError as exc:
        print(f"PostgreSQL is not reachable at {server_url}: {exc}. Nothing was run.",
              file=sys.stderr)
        return 2
    db_url = f"{server_url.rsplit('/', 1)[0]}/{name}"
    tmp = Path(tempfile.mkdtemp(prefix="cds-soak-"))
    hook, body = build()["a-seed-100"]
    body_file = tmp / "seed.json"
    body_file.write_text(json.dumps(body))
    env = {**os.environ, "CDS_ENV": "development", "CDS_DATA_DIR": str(tmp / "data"),
           "CDS_LOG_LEVEL": "WARNING", "CDS_DATABASE_URL": db_url}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/cds-services/lbp-imaging-{hook}"
    service = start("cds_service.app:app", port, env, ROOT)
    try:
        wrk(url, body_file, 2, args.connections)  # warm-up
        capacity = wrk(url, body_file, args.measure, args.connections)
        rss_before = rss_mb(service.pid)
        soak = wrk(url, body_file, args.duration, args.connections)
        rss_after = rss_mb(service.pid)
        calls = answered_calls(base)
        deadline = time.monotonic() + 60
        rows = audit_rows(db_url)
        while rows < calls and time.monotonic() < deadline:  # the writer drains its queue
            time.sleep(0.5)
            rows = audit_rows(db_url)
        dropped = [line for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines()
                   if line.startswith("cds_audit_rows_dropped_total{")]
    finally:
        service.terminate()
        service.wait(15)
        admin_sql(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    result = {"capacity_rps": capacity["rps"], "soak_rps": soak["rps"],
              "soak_seconds": args.duration, "soak_requests": soak["requests"],
              "p50_ms": soak["p50"], "p99_ms": soak["p99"], "errors": soak["errors"],
              "calls_answered": calls, "audit_rows": rows, "rss_before_mb": rss_before,
              "rss_after_mb": rss_after, "dropped_metric": dropped}
    print(f"capacity {capacity['rps']:.0f} req/s ({args.measure:.0f} s, {args.connections} "
          f"connections); soak {args.duration:.0f} s at {soak['rps']:.0f} req/s, "
          f"p50 {soak['p50']:.1f} ms, p99 {soak['p99']:.1f} ms, {soak['errors']} errors")
    print(f"hook calls answered {calls}, audit rows {rows}: "
          f"{'exactly one row per call' if rows == calls else 'MISMATCH'}")
    print(f"worker RSS {rss_before:.1f} MB before the soak, {rss_after:.1f} MB after")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if rows == calls and soak["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
