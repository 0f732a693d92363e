"""In-process micro-benchmark of the clinical engine alone (pytest-benchmark; not in make test)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bodies import build  # noqa: E402

from cds_service.engine import Engine  # noqa: E402
from cds_service.knowledge import load_knowledge  # noqa: E402
from cds_service.protocol import HookRequest  # noqa: E402
from cds_service.record import record_from_prefetch  # noqa: E402
from cds_service.render import load_templates  # noqa: E402
from cds_service.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINE = Engine(load_knowledge(), load_templates(ROOT / "cards"), Settings(env="development"))
BODIES = build()


@pytest.mark.parametrize("name", list(BODIES))
def test_engine(benchmark: Any, name: str) -> None:
    request = HookRequest.model_validate(BODIES[name][1])
    now = datetime.now(UTC)

    def run() -> int:
        record = record_from_prefetch(request.prefetch, request.context.patientId)
        cards, actions = ENGINE.evaluate(request, record, now)
        return len(cards) + len(actions)

    assert benchmark(run) > 0
