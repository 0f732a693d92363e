"""The FastAPI application, wired from its parts: the services (:mod:`cds_service.services`), the
routes (:mod:`cds_service.api`), the error answers and the middlewares.

``create_app()`` is the factory (tests pass their own settings and clock); ``app`` is created on
first access so that ``uvicorn cds_service.app:app`` works and importing the module does not.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.telemetry import TelemetryConfig
from starlette.datastructures import State
from starlette.middleware import Middleware
from starlette.types import ASGIApp

from cds_service.api import HOT_ROUTES, router
from cds_service.api.error_handlers import install_error_handlers, unexpected_error
from cds_service.api.hooks import SERVICES
from cds_service.api.middleware import Edge
from cds_service.errors import StoreUnavailable
from cds_service.openapi import build_openapi
from cds_service.services import ConfigurationError, Services, audit_hash_key, build_services
from cds_service.settings import Settings, get_settings
from cds_service.smart import SmartApp
from cds_service.smart import router as smart_router

__all__ = ["ConfigurationError", "create_app", "lifespan"]

log = logging.getLogger("cds_service.app")

# FastAPI's own OpenTelemetry hooks stay off: it would export validation failures and exception
# messages (which can quote a chart) wherever a global provider points, and it checks for a
# provider on every request. The service's metrics are its Prometheus counters.
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False,
                                 "operation_spans": False}


def create_app(settings: Settings | None = None, *,
               clock: Callable[[], datetime] | None = None) -> FastAPI:
    """Build the application; raise ConfigurationError if it must not start."""
    settings = settings or get_settings()
    services = build_services(settings, clock or (lambda: datetime.now(UTC)))
    show_openapi = settings.env != "production" or settings.openapi_public
    app = CdsApi(title="Lumbar imaging appropriateness CDS service", version="0.1.0",
                  docs_url=None, redoc_url=None, lifespan=lifespan,  # no CDN pages
                  openapi_url="/openapi.json" if show_openapi else None,
                  telemetry=NO_TELEMETRY)
    app.openapi = openapi_once(app)  # type: ignore[method-assign]
    app.state = AppState({"services": services})
    install_error_handlers(app)
    app.router.routes[0:0] = HOT_ROUTES  # the hook call and feedback: matched first
    app.include_router(router)
    if settings.smart_app_enabled:  # off: no /app/ routes (and no card links)
        app.state.smart = SmartApp(settings, services.engine, services.store, services.clock,
                                   audit_hash_key(settings))
        app.include_router(smart_router)
    app.outer_middleware = [
        # outermost, so that every answer (a 413, a 500) carries the CORS headers
        Middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                   allow_methods=["GET", "POST", "OPTIONS"],
                   allow_headers=["Content-Type", "Authorization"], max_age=600),
        Middleware(Edge, metrics=services.metrics, limit=settings.max_body_bytes,
                   read_timeout=settings.body_read_timeout_seconds,
                   page_rules=page_headers(app), unexpected=unexpected_error),
    ]
    return app


class CdsApi(FastAPI):
    """FastAPI with ``outer_middleware``: layers outside the framework's own stack (its error,
    telemetry and exception layers, and the router), so that a request they answer (the hook
    call, served by :class:`Edge`) passes through nothing else."""

    outer_middleware: Sequence[Middleware] = ()

    def build_middleware_stack(self) -> ASGIApp:
        app = super().build_middleware_stack()
        for cls, args, kwargs in reversed(self.outer_middleware):
            app = cls(app, *args, **kwargs)
        return app


# The report page: its own inline style, nothing else loaded, never framed, never cached
REPORT_CSP = ("default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
              "form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer"}


def page_headers(app: FastAPI) -> list[tuple[str, dict[str, str]]]:
    """The headers of the pages (the SMART app's, framed only by the allow-listed EHRs; the
    report), on their errors too."""
    rules = [("/admin/report", {**PAGE_HEADERS, "Content-Security-Policy": REPORT_CSP})]
    smart: SmartApp | None = getattr(app.state, "smart", None)
    if smart is not None:
        rules.append(("/app/", {**PAGE_HEADERS, "Content-Security-Policy":
                                f"default-src 'none'; frame-ancestors {smart.frame_ancestors}"}))
    return rules


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start: migrate the database (when asked), start the audit writer. Stop: write what the
    audit queue holds, then close the clients, the database and the metrics."""
    s: Services = app.state.services
    if s.settings.migrate_on_start:
        try:
            await s.store.upgrade()
        except StoreUnavailable as exc:
            s.metrics.db_errors.labels("migrate").inc()
            log.error("database migration failed; hooks still answer",
                      extra={"error": str(exc)})
    s.audits.start()
    # The FHIR models and knowledge are a large, permanent heap: keep them out of the
    # cyclic garbage collector's full passes (which otherwise stall requests for ~50 ms).
    gc.collect()
    gc.freeze()
    # A hook call's parsed chart is thousands of short-lived dicts and lists: collect the young
    # generation every 20,000 allocations rather than 700 (a few MB, and 2 % less CPU per call).
    gc.set_threshold(20_000, 10, 10)
    yield
    await s.audits.stop()
    await s.fetcher.aclose()
    if s.verifier is not None:
        await s.verifier.aclose()
    await s.store.dispose()
    s.metrics.close()


def openapi_once(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """``app.openapi``: the document (:mod:`cds_service.openapi`), built on first request."""
    document: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not document:
            document.update(build_openapi(
                app, SERVICES, {sid: d.hook for sid, d in SERVICES.items()}))
        return document

    return openapi


class AppState(State):
    """``app.state``: the :class:`Services` (``app.state.services``), whose parts tests and tools
    may also read by name (``app.state.store`` is ``app.state.services.store``)."""

    _parts = frozenset(f.name for f in fields(Services))

    def __getattr__(self, key: Any) -> Any:
        try:
            return self._state[key]
        except KeyError:
            if key in self._parts and "services" in self._state:
                return getattr(self._state["services"], key)
        return super().__getattr__(key)


def __getattr__(name: str) -> Any:
    """``cds_service.app:app`` builds the application from the environment on first use."""
    if name == "app":
        from cds_service.logs import configure_logging

        settings = get_settings()
        configure_logging(settings.log_level, settings.log_json)
        application = create_app(settings)
        globals()["app"] = application
        return application
    raise AttributeError(name)
