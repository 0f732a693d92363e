"""Values as a row can hold them: the string and JSON columns of each table, fitting an audit
value to its column, checking an instant, and telling a refused value from an unavailable
database."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import JSON, String, Table
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError

from cds_service.store.models import CardShown, FeedbackItem, HookCall


class InvalidValue(ValueError):
    """A value the database can never hold (too long, NUL, out of range); retrying cannot help.

    ``field`` names the attribute of the record (e.g. ``card``), ``index`` its position in the
    list written, when known.
    """

    def __init__(self, message: str, field: str | None = None, index: int | None = None):
        super().__init__(message)
        self.field = field
        self.index = index


class Columns:
    """The string and JSON columns of a table, with their lengths, read from the model."""

    def __init__(self, table: Table):
        self.strings = {c.name: c.type.length for c in table.columns
                        if isinstance(c.type, String)}
        self.json = [c.name for c in table.columns if isinstance(c.type, JSON)]


HOOK_CALL_COLUMNS = Columns(HookCall.__table__)  # type: ignore[arg-type]
CARD_COLUMNS = Columns(CardShown.__table__)  # type: ignore[arg-type]
FEEDBACK_TABLE_COLUMNS = Columns(FeedbackItem.__table__)  # type: ignore[arg-type]

# FeedbackRecord attribute -> feedback column
FEEDBACK_COLUMNS = {"card": "card_uuid", "override_system": "override_system",
                    "override_code": "override_code", "override_display": "override_display",
                    "user_comment": "user_comment"}


def column_length(column: str, table: str = "feedback") -> int | None:
    """The length of a string column (None for unbounded text), from the models."""
    return {"feedback": FEEDBACK_TABLE_COLUMNS, "hook_call": HOOK_CALL_COLUMNS,
            "card": CARD_COLUMNS}[table].strings[column]


def fit_text(value: str, limit: int | None = None) -> str:
    """``value`` as any database can store it: NUL replaced, UTF-8-encodable, at most ``limit``."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    if limit is not None and len(value) > limit:
        value = value[:limit]
    return value


def text_fits(value: str, limit: int | None) -> bool:
    if "\x00" in value or (limit is not None and len(value) > limit):
        return False
    return value.isascii() or fit_text(value) == value


def _json_fits(value: Any) -> bool:
    """Every key text and every text storable. Checked first in one pass of orjson, which
    refuses what cannot be encoded (a lone surrogate, a key that is not text) and writes a
    NUL as an escape; only a value that fails that is walked."""
    try:
        if b"\\u0000" not in orjson.dumps(value):
            return True
    except TypeError:
        pass
    return _walk_fits(value)


def _walk_fits(value: Any) -> bool:
    if isinstance(value, str):
        return text_fits(value, None)
    if isinstance(value, list):
        return all(_walk_fits(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and text_fits(k, None) and _walk_fits(v)
                   for k, v in value.items())
    return True


def _fit_json(value: Any) -> Any:
    if isinstance(value, str):
        return fit_text(value)
    if isinstance(value, list):
        return [_fit_json(v) for v in value]
    if isinstance(value, dict):
        return {fit_text(str(k)): _fit_json(v) for k, v in value.items()}
    return value


def fit_row(columns: Columns, row: dict[str, Any]) -> bool:
    """Fit every string of ``row`` to its column in place; True when something changed."""
    changed = False
    for name, limit in columns.strings.items():
        value = row.get(name)
        if isinstance(value, str) and not text_fits(value, limit):
            row[name] = fit_text(value, limit)
            changed = True
    for name in columns.json:
        value = row.get(name)
        if value is not None and not _json_fits(value):
            row[name] = _fit_json(value)
            changed = True
    return changed


def storable_instant(value: datetime) -> datetime:
    """``value`` in UTC; ValueError when it has no offset or its UTC time is out of range."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("the time must have a UTC offset")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the instant is outside the range that can be stored "
                         "(years 1 to 9999 in UTC)") from None


def is_data_error(exc: BaseException) -> bool:
    """Did the database refuse the values themselves (not the connection or the transaction)?"""
    if isinstance(exc, DataError | IntegrityError):
        return True
    if isinstance(exc, StatementError) and not isinstance(exc, DBAPIError):
        return True  # the driver or a type could not convert a value before sending it
    code = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    return code[:2] in ("22", "23")  # PostgreSQL: data exception, integrity violation


def is_read_only(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) == "25006":  # read_only_sql_transaction
        return True
    return getattr(orig, "sqlite_errorname", "") == "SQLITE_READONLY" or "readonly" in str(orig)


def chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
