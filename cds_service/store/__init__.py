"""Persistence of hook calls, cards and feedback (SQLAlchemy 2 async; SQLite or PostgreSQL).

Migrations are Alembic scripts under ``migrations/``; :meth:`Store.upgrade` applies them (at
start-up, or with ``cds-service db upgrade``). Patient ids are stored only as an HMAC-SHA256 of
the id under ``CDS_AUDIT_HASH_KEY``.

Two kinds of failure are kept apart everywhere: :class:`StoreUnavailable` (the database cannot be
reached or written now; retrying later can help) and :class:`InvalidValue` (a value no database
row can hold; retrying cannot help). Audit rows never fail for their values: every string is
fitted to its column (NUL replaced, cut to the column's length) before it is written.

The modules, by job: ``database`` (engine, hashes, schema, writability), ``values`` (what a
column holds), ``audit`` (hook calls and the :class:`AuditWriter`), ``feedback`` (feedback
items and the report's reads), ``app_sessions`` (the SMART app) and ``replay`` (JWT ids).
"""

from __future__ import annotations

from cds_service.errors import StoreUnavailable
from cds_service.store.app_sessions import AppSessionRows
from cds_service.store.audit import (
    AuditEvent,
    AuditResult,
    AuditWriter,
    CallAudit,
    CallRows,
    CardAudit,
)
from cds_service.store.database import MIGRATIONS
from cds_service.store.feedback import FEEDBACK_BATCH, FeedbackRecord, FeedbackRows
from cds_service.store.replay import DatabaseReplayCache
from cds_service.store.values import (
    FEEDBACK_COLUMNS,
    InvalidValue,
    column_length,
    fit_text,
    storable_instant,
)

__all__ = ["FEEDBACK_BATCH", "FEEDBACK_COLUMNS", "MIGRATIONS", "AuditEvent", "AuditResult",
           "AuditWriter", "CallAudit", "CardAudit", "DatabaseReplayCache", "FeedbackRecord",
           "InvalidValue", "Store", "StoreUnavailable", "column_length", "fit_text",
           "storable_instant"]


class Store(CallRows, FeedbackRows, AppSessionRows):
    """The service's database: the audit of hook calls, feedback and the report's reads, and
    the SMART app's sessions (one engine, see :class:`~cds_service.store.database.Database`)."""
