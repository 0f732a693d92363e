"""Prometheus metrics of one application instance (its own registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
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
        self.audit_queue = Gauge("cds_audit_queue_rows",
                                 "Hook calls queued for the audit, not yet written", registry=r)
        self.jwt_replay_fallback = Counter(
            "cds_jwt_replay_fallback_total", "JWT replay (jti) checks made by this process "
            "alone because the shared database was unavailable", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
