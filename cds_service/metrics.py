"""Prometheus metrics of one application instance.

One process (``make run``, the tests): the metrics live in the application's own registry.
Several worker processes (``cds-service serve --workers N``): ``serve`` exports
``PROMETHEUS_MULTIPROC_DIR`` before the workers start, each worker writes its values to files
there, and ``/metrics`` in any worker renders the sum over all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead


def multiprocess_mode() -> bool:
    """True when prometheus_client keeps values in PROMETHEUS_MULTIPROC_DIR files.

    prometheus_client chooses this once, when it is first imported; asking it (rather than the
    environment now) keeps rendering consistent with where the values were really written.
    """
    return values.ValueClass is not values.MutexValue


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_mode()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cds_http_requests_total", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("cds_hook_latency_seconds", "Hook evaluation latency", ["hook"],
                                 buckets=(.002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                                 registry=r)
        self.cards = Counter("cds_cards_total", "Cards returned by kind and indicator",
                             ["kind", "indicator"], registry=r)
        self.ratings = Counter("cds_ratings_total", "PAMA ratings returned", ["rating"],
                               registry=r)
        self.fetches = Counter("cds_fhir_fetch_total", "FHIR fetches by outcome", ["outcome"],
                               registry=r)
        self.db_errors = Counter("cds_db_errors_total", "Database failures by operation",
                                 ["operation"], registry=r)
        self.feedback = Counter("cds_feedback_items_total", "Feedback items by outcome",
                                ["outcome"], registry=r)
        self.audit_written = Counter("cds_audit_rows_written_total",
                                     "Hook calls written to the audit", registry=r)
        self.audit_dropped = Counter("cds_audit_rows_dropped_total",
                                     "Hook calls lost to the audit, by reason (queue-full, "
                                     "invalid, shutdown)", ["reason"], registry=r)
        self.audit_fixed = Counter("cds_audit_rows_fixed_total",
                                   "Hook calls audited with a value cut to its column or "
                                   "cleaned of NUL", registry=r)
        # livesum: the rows queued in the workers still running (each worker has its own queue)
        self.audit_queue = Gauge("cds_audit_queue_rows",
                                 "Hook calls queued for the audit, not yet written",
                                 multiprocess_mode="livesum", registry=r)
        self.jwt_replay_fallback = Counter(
            "cds_jwt_replay_fallback_total", "JWT replay (jti) checks made by this process "
            "alone because the shared database was unavailable", registry=r)
        self._audit_pending: Callable[[], int] | None = None

    def watch_audit_queue(self, pending: Callable[[], int]) -> None:
        """Report ``pending()`` as ``cds_audit_queue_rows``, refreshed by
        :meth:`refresh_audit_queue` (Gauge.set_function is not seen across processes)."""
        self._audit_pending = pending
        self.refresh_audit_queue()

    def refresh_audit_queue(self) -> None:
        """Store the audit queue's length now (call it where the queue may have changed)."""
        if self._audit_pending is not None:
            self.audit_queue.set(self._audit_pending())

    def render(self) -> bytes:
        """The text exposition: this application's registry, or the sum over every worker."""
        self.refresh_audit_queue()
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)

    def close(self) -> None:
        """At worker exit: drop this process's live gauges from the shared directory."""
        if self.multiprocess:
            mark_process_dead(os.getpid())
