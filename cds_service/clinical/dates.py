"""FHIR date and dateTime values as UTC intervals (a partial date covers a span)."""

from __future__ import annotations

import calendar
import functools
import re
from datetime import UTC, datetime, timedelta
from typing import Any

_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
# Dates outside these years are placeholders ("0001-01-01", "9999-12-31") or typos, never clinical
# facts; reading them as unreadable keeps every later date computation within what Python holds.
FIRST_YEAR, LAST_YEAR = 1800, 2200


def parse_span(value: Any) -> tuple[datetime, datetime] | None:
    """(earliest, latest) instant a FHIR date/dateTime can mean, or None if unreadable.

    A year outside FIRST_YEAR..LAST_YEAR is unreadable (a placeholder): the fact becomes unknown.
    """
    if not isinstance(value, str) or not value or len(value) > 64:
        return None
    return _parse_text(value)


@functools.lru_cache(maxsize=8192)  # a chart repeats its dates; the answer is immutable
def _parse_text(value: str) -> tuple[datetime, datetime] | None:
    m = _DATE.match(value)
    if m:
        year = int(m.group(1))
        if not FIRST_YEAR <= year <= LAST_YEAR:
            return None
        month = int(m.group(2)) if m.group(2) else None
        day = int(m.group(3)) if m.group(3) else None
        try:
            if month is None:
                start = datetime(year, 1, 1, tzinfo=UTC)
                end = datetime(year + 1, 1, 1, tzinfo=UTC)
            elif day is None:
                start = datetime(year, month, 1, tzinfo=UTC)
                end = start + timedelta(days=calendar.monthrange(year, month)[1])
            else:
                start = datetime(year, month, day, tzinfo=UTC)
                end = start + timedelta(days=1)
        except ValueError:
            return None
        return start, end - timedelta(microseconds=1)
    try:
        instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if instant.tzinfo is None:
            instant = instant.replace(tzinfo=UTC)
        instant = instant.astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    if not FIRST_YEAR <= instant.year <= LAST_YEAR:
        return None
    return instant, instant


def period_start(period: Any) -> tuple[datetime, datetime] | None:
    """The span of a Period's start (falls back to its end as an upper bound)."""
    if not isinstance(period, dict):
        return None
    span = parse_span(period.get("start"))
    if span:
        return span
    end = parse_span(period.get("end"))
    if end:
        return datetime.min.replace(tzinfo=UTC), end[1]
    return None


def add_age(birth: tuple[datetime, datetime], age: Any) -> tuple[datetime, datetime] | None:
    """Span of the instant a patient born in ``birth`` reached a FHIR Age (years, months...)."""
    if not isinstance(age, dict) or not isinstance(age.get("value"), int | float):
        return None
    unit = age.get("code") or age.get("unit") or "a"
    days_per = {"a": 365.25, "mo": 30.44, "wk": 7, "d": 1, "year": 365.25, "years": 365.25}
    if unit not in days_per:
        return None
    try:
        delta = timedelta(days=float(age["value"]) * days_per[unit])
        slack = timedelta(days=days_per[unit])  # an age in whole units covers a unit of time
        start, end = birth[0] + delta, birth[1] + delta + slack
    except (OverflowError, ValueError):  # an age no one reaches: unreadable
        return None
    if not (FIRST_YEAR <= start.year and end.year <= LAST_YEAR):
        return None
    return start, end


def age_years(birth: tuple[datetime, datetime], now: datetime) -> tuple[int, int]:
    """(lowest, highest) whole-year age at ``now`` for a birth span."""
    def years(born: datetime) -> int:
        n = now.year - born.year
        if (now.month, now.day) < (born.month, born.day):
            n -= 1
        return n
    return years(birth[1]), years(birth[0])
