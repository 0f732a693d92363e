"""Cost in the size of the record and the number of drafts (issue 25, item 2): the engine in
process, order-sign, D lumbar MRI drafts against the seed chart plus N bone-metastasis conditions
(each a finding the rules read), rating and cards timed separately.

    .venv/bin/python bench/record_cost.py [--grid 1x5000,20x1500,200x300,200x1500]

Linear work means: ten times the drafts costs about ten times an order's own work (facts, card),
never ten times the reading of the record; twice the record costs about twice.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cds_service.app import create_app  # noqa: E402
from cds_service.protocol import HookRequest  # noqa: E402
from cds_service.record import record_from_prefetch  # noqa: E402
from tests.builders import PATIENT, condition, day, hook_request, order, seed_prefetch  # noqa: E402
from tests.conftest import FIXTURE_NOW, dev_settings  # noqa: E402


def body(drafts: int, findings: int) -> dict:
    prefetch = seed_prefetch(FIXTURE_NOW)
    for i in range(findings):
        prefetch["conditions"]["entry"].append(
            {"resource": condition(f"met-{i}", "C79.51", day(FIXTURE_NOW, 10 + i % 30))})
    return hook_request(*[order(f"o{i}", cpt="72148") for i in range(drafts)],
                        hook="order-sign", prefetch=prefetch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="1x5000,20x1500,200x300,200x1500")
    args = parser.parse_args(argv)
    engine = create_app(dev_settings(), clock=lambda: FIXTURE_NOW).state.services.engine
    print(f"{'drafts':>7}{'conditions':>12}{'rate s':>9}{'cards s':>9}{'cards':>7}")
    for cell in args.grid.split(","):
        drafts, findings = (int(x) for x in cell.split("x"))
        request = HookRequest.model_validate(body(drafts, findings))
        record = record_from_prefetch(request.prefetch, PATIENT)
        started = time.perf_counter()
        rated = engine.rate(request, record, FIXTURE_NOW)
        rated_at = time.perf_counter()
        answer = engine.answer(rated)
        done = time.perf_counter()
        print(f"{drafts:>7}{findings:>12}{rated_at - started:>9.3f}{done - rated_at:>9.3f}"
              f"{len(answer.cards):>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
