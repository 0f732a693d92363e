"""Command line: ``cds-service serve``, ``evaluate FILE``, ``db``, ``report``, ``native``."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from cds_service.errors import validation_issues


def _now(value: str | None) -> datetime:
    if not value:
        return datetime.now(UTC)
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def shared_metrics_dir(workers: int) -> Iterator[Path | None]:
    """prometheus_client's multiprocess directory while ``serve`` runs, or None (one process).

    Used when PROMETHEUS_MULTIPROC_DIR is set (its stale ``*.db`` files, a previous run's
    counts, are removed first) or with several workers (then a fresh directory under the temp
    dir, removed at exit). The variable is exported before any worker starts because a worker
    chooses where its values live when it first imports prometheus_client.
    """
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        yield path
    elif workers > 1:
        with tempfile.TemporaryDirectory(prefix="cds-metrics-",
                                         ignore_cleanup_errors=True) as made:
            os.environ[MULTIPROC_ENV] = made
            try:
                yield Path(made)
            finally:
                del os.environ[MULTIPROC_ENV]
    else:
        yield None


def cmd_serve(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        try:
            stack.enter_context(shared_metrics_dir(args.workers))
        except OSError as exc:
            print(f"cds-service: cannot start: {MULTIPROC_ENV}: {exc}", file=sys.stderr)
            return 2
        return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cds_service.engine import Engine
    from cds_service.errors import StartupError
    from cds_service.knowledge import load_knowledge
    from cds_service.render import load_templates
    from cds_service.services import audit_hash_key, build_verifier, check_production
    from cds_service.settings import get_settings

    settings = get_settings()
    try:  # refuse to start, saying why, before any worker is spawned
        check_production(settings)
        audit_hash_key(settings)
        build_verifier(settings)
        # the engine loads the questions and checks the value sets the rules read
        Engine(load_knowledge(settings.knowledge_dir), load_templates(settings.cards_dir),
               settings)
    except StartupError as exc:
        print(f"cds-service: cannot start: {exc}", file=sys.stderr)
        return 2

    from cds_service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_json)  # uvicorn's loggers too
    uvicorn.run("cds_service.app:app", host=args.host, port=args.port, workers=args.workers,
                proxy_headers=True, access_log=False, log_level="warning", log_config=None,
                limit_concurrency=settings.limit_concurrency)
    return 0


def summarize(body: dict[str, Any]) -> str:
    """The cards of a response as a few readable lines."""
    lines = []
    for card in body.get("cards", []):
        lines.append(f"[{card['indicator'].upper()}] {card['summary']}")
        for s in card.get("suggestions", []):
            star = " (recommended)" if s.get("isRecommended") else ""
            lines.append(f"    suggestion: {s['label']}{star}")
    for action in body.get("systemActions", []):
        res = action.get("resource", {})
        rating = "?"
        for ext in res.get("extension", []):
            if ext.get("url", "").endswith("/pama-rating"):
                codes = [c.get("code") for c in ext["valueCodeableConcept"]["coding"]]
                rating = " / ".join(str(c) for c in codes)
        text = (res.get("code") or {}).get("text") or res.get("id")
        lines.append(f"rating: {text}: {rating}")
    return "\n".join(lines) or "no cards, no ratings"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cds_service.engine import Engine
    from cds_service.knowledge import load_knowledge
    from cds_service.protocol import HookRequest
    from cds_service.record import record_from_prefetch
    from cds_service.render import load_templates
    from cds_service.settings import get_settings

    settings = get_settings()
    try:
        data = orjson.loads(Path(args.file).read_bytes())
        request = HookRequest.model_validate(data)
    except OSError as exc:
        print(f"cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    except orjson.JSONDecodeError as exc:
        print(f"{args.file} is not JSON: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        for item in validation_issues(exc):
            print(f"invalid request: {item['diagnostics']}", file=sys.stderr)
        return 2
    engine = Engine(load_knowledge(settings.knowledge_dir), load_templates(settings.cards_dir),
                    settings)
    record = record_from_prefetch(request.prefetch, request.context.patientId)
    body = engine.answer(engine.rate(request, record, _now(args.now))).body()
    if not args.json:
        print(summarize(body))
        print()
    print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    return 0


def _store() -> Any:
    from cds_service.services import audit_hash_key
    from cds_service.settings import get_settings
    from cds_service.store import Store

    settings = get_settings()
    return Store(settings.database, audit_hash_key(settings))


def cmd_db(args: argparse.Namespace) -> int:
    import asyncio

    from cds_service.store import StoreUnavailable

    async def run() -> None:
        store = _store()
        try:
            await store.upgrade()
        finally:
            await store.dispose()

    try:
        asyncio.run(run())
    except StoreUnavailable as exc:
        print(f"database upgrade failed: {exc}", file=sys.stderr)
        return 1
    print("database is at the latest schema")
    return 0


def _override_reasons() -> Any:
    """What the cards' override reasons mean (their categories), from the card templates."""
    from cds_service.override_reasons import OverrideReasons
    from cds_service.render import load_templates
    from cds_service.services import override_systems
    from cds_service.settings import get_settings

    settings = get_settings()
    templates = load_templates(settings.cards_dir)
    return OverrideReasons.of(templates, override_systems(settings, templates.override_system))


def cmd_report(args: argparse.Namespace) -> int:
    import asyncio

    from cds_service.report import build_report, parse_day, render_html

    reasons = _override_reasons()

    async def run() -> dict[str, Any]:
        store = _store()
        try:
            start, end = parse_day(args.start), parse_day(args.end)
            cards, feedback, latest = await store.rows(start, end, args.service)
            return build_report(cards, feedback, start, end, args.service, latest,
                                reasons.category)
        finally:
            await store.dispose()

    report = asyncio.run(run())
    if args.html:
        Path(args.html).write_text(render_html(report), encoding="utf-8")
        print(f"wrote {args.html}")
    elif args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        t = report["totals"]
        print(f"cards shown {t['shown']}: accepted {t['accepted']}, overridden "
              f"{t['overridden']}, ignored {t['ignored']}")
        for title, key in (("by card kind", "kind"), ("by rating", "rating"),
                           ("by week", "week")):
            print(f"\n{title}:")
            for r in report["by_" + key if key != "week" else "weekly"]:
                print(f"  {r[key]:<32} shown {r['shown']:>5}  accepted {r['accepted']:>5}  "
                      f"overridden {r['overridden']:>5}  ignored {r['ignored']:>5}")
        print("\noverride reasons:")
        for r in report["override_reasons"]:
            print(f"  {r['count']:>5}  {r['display']} ({r['code']})")
        print("\noverrides by category (HL7 Non-Adherence Reason):")
        for r in report["override_categories"]:
            print(f"  {r['count']:>5}  {r['display']}" + (f" ({r['code']})" if r["code"] else ""))
    return 0


def cmd_native(args: argparse.Namespace) -> int:
    from cds_service import native

    if args.action == "build":
        return native.build()
    print(native.STATE)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cds-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the CDS Hooks API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=int(os.environ.get("CDS_WORKERS", "1")),
                       help="worker processes (default: CDS_WORKERS or 1)")
    serve.set_defaults(func=cmd_serve)
    evaluate = sub.add_parser("evaluate", help="evaluate a hook request file, no server")
    evaluate.add_argument("file")
    evaluate.add_argument("--now", help="evaluation time (ISO 8601), default: now")
    evaluate.add_argument("--json", action="store_true", help="print only the response JSON")
    evaluate.set_defaults(func=cmd_evaluate)
    db = sub.add_parser("db", help="database schema")
    db.add_argument("action", choices=["upgrade"])
    db.set_defaults(func=cmd_db)
    report = sub.add_parser("report", help="the card feedback report")
    report.add_argument("--start", help="from this day (YYYY-MM-DD)")
    report.add_argument("--end", help="until this day, exclusive")
    report.add_argument("--service", help="one service id")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument("--html", metavar="FILE", help="write the HTML page to FILE")
    report.set_defaults(func=cmd_report)
    compiled = sub.add_parser("native", help="the compiled hot path (mypyc): build, or status")
    compiled.add_argument("action", choices=["build", "status"])
    compiled.set_defaults(func=cmd_native)
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a reader that went away shows here, not at the interpreter's exit
    except BrokenPipeError:
        return closed_stdout()
    return code


def closed_stdout() -> int:
    """The reader of our output went away (``cds-service evaluate FILE | head -1``): stop
    quietly, as Python's documentation advises ("Note on SIGPIPE"): what is still buffered goes
    to the null device, so that no traceback follows at exit; the exit status is 1."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
