"""Random damage to real requests never produces a 5xx (the rule: bad input gets a clear 4xx)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.app import create_app
from tests.conftest import FIXTURE_NOW, FIXTURES, SELECT, ValidatingClient, dev_settings

SEED = json.loads((FIXTURES / "requests" / "v3-seed-mri-w.json").read_text())
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from paths(v, (*prefix, i))


ALL_PATHS = [p for p in paths(SEED) if p]


@pytest.fixture(scope="module")
def client() -> Iterator[ValidatingClient]:
    with ValidatingClient(create_app(dev_settings(), clock=lambda: FIXTURE_NOW)) as c:
        yield c


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), JSON), min_size=1, max_size=4))
def test_damaged_requests_never_fail_with_5xx(client: ValidatingClient,
                                              damage: list[tuple[tuple[Any, ...], Any]]) -> None:
    body = copy.deepcopy(SEED)
    for path, value in damage:
        target = body
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    r = client.post(SELECT, json=body)
    assert r.status_code < 500, r.text
    assert r.status_code in (200, 400, 412), r.text


ITEM = {"card": "c-1", "outcome": "overridden", "outcomeTimestamp": "2026-11-01T12:00:00Z",
        "overrideReason": {"reason": {"system": "urn:x", "code": "a"}, "userComment": "x"}}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(list(paths(ITEM))), JSON)
def test_damaged_feedback_is_200_or_400(client: ValidatingClient, path: tuple[Any, ...],
                                        value: Any) -> None:
    item: Any = copy.deepcopy(ITEM)
    if path:
        target = item
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    else:
        item = value
    r = client.post(SELECT + "/feedback", json={"feedback": [item]})
    assert r.status_code in (200, 400), r.text
