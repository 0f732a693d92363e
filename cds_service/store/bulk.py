"""Many rows into one SQLite table as a few multi-row INSERT statements.

SQLite's driver runs in a thread of its own (aiosqlite), and Python's ``sqlite3`` lets go of the
interpreter lock around every statement step, so an ``executemany`` of a thousand audit calls
(a call row and a card row each) was two thousand hand-overs of the lock between that thread and
the event loop. While the event loop is busy with hook calls each hand-over waits at least the
interpreter's switch interval (5 ms): at full load the writer stored about 230 rows/s against
1,575 calls/s answered, its queue filled, and rows were dropped (bench/RESULTS.md, sixth try).
One statement of many rows is one step: the rows are bound while the thread holds the lock (a
millisecond), and SQLite writes them with the lock let go.

The statement is SQLAlchemy's own INSERT compiled for the dialect (its ON CONFLICT clause and
all), repeated over as many rows as SQLite accepts parameters, and every value goes through the
bind processor SQLAlchemy itself applies to its column (the UTC conversion, SQLite's date text,
the JSON serializer): the rows stored are the same as SQLAlchemy's ``executemany`` stores.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert

MAX_ROWS = 1000  # per statement, whatever SQLite would take


def sqlite_max_parameters() -> int:
    """The parameters one statement may bind in the SQLite library Python uses."""
    probe = sqlite3.connect(":memory:")
    try:
        return int(probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    finally:
        probe.close()


class MultiRowInsert:
    """One INSERT (every column of its table bound), written over many rows per statement."""

    def __init__(self, statement: Insert, dialect: Dialect, max_parameters: int):
        table = statement.table
        if not isinstance(table, Table):
            raise TypeError("MultiRowInsert inserts into a Table")
        compiled = statement.compile(dialect=dialect)
        names: Sequence[str] | None = compiled.positiontup
        if not names or dialect.paramstyle != "qmark":
            raise ValueError(f"{dialect.name}: SQLite's positional '?' parameters are needed")
        missing = {c.key for c in table.columns} - set(names)
        if missing:  # a row must name every column: none is left to a default
            raise ValueError(f"columns not bound by the statement: {sorted(missing)}")
        sql = str(compiled)
        group = "(" + ", ".join("?" * len(names)) + ")"
        if sql.count(group) != 1:
            raise ValueError(f"cannot find the one VALUES group in: {sql}")
        self._head, self._tail = sql.split(group)
        self._group = group
        self._sql: dict[int, str] = {}
        self.names = tuple(names)
        self.rows_per_statement = max(1, min(MAX_ROWS, max_parameters // len(names)))
        self.processors: list[tuple[int, Callable[[Any], Any]]] = []
        for i, name in enumerate(self.names):
            processor = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.processors.append((i, processor))

    def sql(self, rows: int) -> str:
        """The statement for this many rows."""
        text = self._sql.get(rows)
        if text is None:
            text = self._head + ", ".join([self._group] * rows) + self._tail
            if len(self._sql) > 32:  # a batch's sizes: full statements and one remainder
                self._sql.clear()
            self._sql[rows] = text
        return text

    def parameters(self, rows: Sequence[dict[str, Any]]) -> list[Any]:
        """The rows' values, one after the other, as the driver binds them (a row lacking a
        column raises KeyError). A value its type cannot bind raises
        :class:`~sqlalchemy.exc.StatementError`, as SQLAlchemy's own execution does."""
        flat: list[Any] = []
        names, processors = self.names, self.processors
        for row in rows:
            values = [row[name] for name in names]
            for i, processor in processors:
                if values[i] is not None:
                    try:
                        values[i] = processor(values[i])
                    except Exception as exc:
                        raise StatementError(
                            f"({type(exc).__module__}.{type(exc).__name__}) {exc}",
                            self._head, None, exc, hide_parameters=True) from exc
            flat.extend(values)
        return flat

    async def run(self, conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> int:
        """Insert the rows in the connection's transaction; the statements it took."""
        step = self.rows_per_statement
        statements = 0
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            await conn.exec_driver_sql(self.sql(len(chunk)), tuple(self.parameters(chunk)))
            statements += 1
        return statements
