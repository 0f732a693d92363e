"""Command line: ``cds-service serve`` and ``cds-service evaluate FILE``."""

from __future__ import annotations

import argparse
import sys
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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("cds_service.app:app", host=args.host, port=args.port, workers=args.workers,
                proxy_headers=True, access_log=False, log_level="warning")
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
    from cds_service.protocol import HookRequest, ServiceResponse
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
    cards, actions = engine.evaluate(request, record, _now(args.now))
    response = ServiceResponse(cards=cards)
    if actions:
        response.systemActions = actions
        response.extension = {"systemActions": [a.model_dump(mode="json", exclude_none=True)
                                                for a in actions]}
    body = response.to_json()
    if not args.json:
        print(summarize(body))
        print()
    print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cds-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the CDS Hooks API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(func=cmd_serve)
    evaluate = sub.add_parser("evaluate", help="evaluate a hook request file, no server")
    evaluate.add_argument("file")
    evaluate.add_argument("--now", help="evaluation time (ISO 8601), default: now")
    evaluate.add_argument("--json", action="store_true", help="print only the response JSON")
    evaluate.set_defaults(func=cmd_evaluate)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
