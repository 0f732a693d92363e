"""Many rows into one table through the driver's ``executemany``, bound as SQLAlchemy binds them.

SQLAlchemy's own ``executemany`` rebuilds every row's parameters through its compiled
statement: a dict per row, each bind looked up and processed. For the audit, written under
load a few hundred rows at a time, that was about half of the writer's cost. Here the
statement is compiled once per dialect, each column's bind processor (the same one SQLAlchemy
applies: the UTC conversion, SQLite's date text, the JSON serializer) is taken once, and a row
becomes a tuple in the statement's parameter order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert


class DriverInsert:
    """One INSERT statement (every column of its table bound), compiled for a dialect."""

    def __init__(self, statement: Insert, dialect: Dialect):
        table = statement.table
        if not isinstance(table, Table):
            raise TypeError("DriverInsert inserts into a Table")
        compiled = statement.compile(dialect=dialect)
        names: Sequence[str] | None = compiled.positiontup
        if not names:
            raise ValueError(f"{dialect.name}: a positional parameter style is needed")
        missing = {c.key for c in table.columns} - set(names)
        if missing:  # a row must name every column: none is left to a default
            raise ValueError(f"columns not bound by the statement: {sorted(missing)}")
        self.sql = str(compiled)
        self.names = tuple(names)
        self.processors: list[tuple[int, Callable[[Any], Any]]] = []
        for i, name in enumerate(self.names):
            processor = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.processors.append((i, processor))

    def parameters(self, rows: Sequence[dict[str, Any]],
                   instants: dict[tuple[Any, datetime], Any] | None = None
                   ) -> list[tuple[Any, ...]]:
        """Each row as the driver's parameters (a row lacking a column raises KeyError).

        ``instants`` keeps each bound instant, for the rows of a batch that share one (a call
        and its cards). A value its type cannot bind raises
        :class:`~sqlalchemy.exc.StatementError`, as SQLAlchemy's own execution does (a data
        error: the values, not the database).
        """
        names, processors = self.names, self.processors
        instants = {} if instants is None else instants
        out = []
        for row in rows:
            values = [row[name] for name in names]
            for i, processor in processors:
                value = values[i]
                if value is None:
                    continue
                key = (processor, value) if type(value) is datetime else None
                if key is not None and key in instants:
                    values[i] = instants[key]
                    continue
                try:
                    values[i] = processor(value)
                except Exception as exc:
                    raise StatementError(
                        f"({type(exc).__module__}.{type(exc).__name__}) {exc}",
                        self.sql, None, exc, hide_parameters=True) from exc
                if key is not None:
                    instants[key] = values[i]
            out.append(tuple(values))
        return out

    async def run(self, conn: AsyncConnection, rows: Sequence[dict[str, Any]],
                  instants: dict[tuple[Any, datetime], Any] | None = None) -> None:
        """Insert the rows in the connection's transaction (one driver ``executemany``)."""
        if rows:
            await conn.exec_driver_sql(self.sql, self.parameters(rows, instants))
