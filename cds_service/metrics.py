"""Prometheus metrics of one application instance (its own registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


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

    def render(self) -> bytes:
        return generate_latest(self.registry)
