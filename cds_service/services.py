"""What the service is made of, built once per application, and the checks it starts with.

:func:`build_services` loads the knowledge and card templates, refuses a configuration that
must not run (:func:`check_production`), and builds the parts the routes use: the engine, the
store and its audit writer, the JWT verifier, the FHIR fetcher and the metrics. ``cds-service
serve`` runs the same checks before it spawns any worker.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from cds_service import native
from cds_service.codesystems import LEGACY_OVERRIDE_SYSTEM, SystemUrls
from cds_service.engine import Engine
from cds_service.errors import StartupError
from cds_service.knowledge import load_knowledge
from cds_service.limits import Limits
from cds_service.metrics import Metrics
from cds_service.override_reasons import OverrideReasons
from cds_service.record.fetch import FetchPolicy, FhirFetcher
from cds_service.render import load_templates
from cds_service.replay import FallbackReplayStore, SharedReplayStore
from cds_service.security import JwtVerifier, load_trusted_issuers, public_base_url_problem
from cds_service.settings import Settings
from cds_service.store import AuditWriter, DatabaseReplayCache, Store

log = logging.getLogger("cds_service.app")  # the application's logger, as the logs have it


class ConfigurationError(StartupError, RuntimeError):
    """The service cannot start with this configuration."""


@dataclass(frozen=True)
class Services:
    """What the routes use, built once per application (kept on ``app.state.services``)."""

    settings: Settings
    engine: Engine
    store: Store
    audits: AuditWriter
    verifier: JwtVerifier | None
    fetcher: FhirFetcher
    metrics: Metrics
    clock: Callable[[], datetime]
    limits: Limits
    # what an override reason in feedback means: its display (feedback may name one by code
    # alone) and its Non-Adherence Reason category (the report)
    reasons: OverrideReasons = field(default_factory=OverrideReasons)


def build_services(settings: Settings, clock: Callable[[], datetime]) -> Services:
    """Build every part: the knowledge, card templates and engine first, then the start-up
    checks; raise ConfigurationError (or another StartupError) if the service must not start."""
    knowledge = load_knowledge(settings.knowledge_dir)
    templates = load_templates(settings.cards_dir)
    engine = Engine(knowledge, templates, settings)
    check_production(settings)
    store = Store(settings.database, audit_hash_key(settings))
    metrics = Metrics()
    verifier = build_verifier(settings, DatabaseReplayCache(store), metrics)
    fetcher = build_fetcher(settings)
    if verifier is None:
        log.warning("DEVELOPMENT MODE: calls without a JWT are accepted and tokens are not "
                    "verified. Never expose this instance to a network.")
    audits = build_audit_writer(settings, store, metrics)
    if not native.STATE.startswith("compiled"):  # same answers, about 1.4x the CPU per call
        log.warning("clinical core not compiled (cds-service native build)",
                    extra={"native": native.STATE})
    return Services(
        settings=settings, engine=engine, store=store, audits=audits, verifier=verifier,
        fetcher=fetcher, metrics=metrics, clock=clock, limits=request_limits(settings),
        reasons=OverrideReasons.of(templates,
                                   override_systems(settings, templates.override_system)))


def check_production(settings: Settings) -> None:
    """Outside development mode, name every secret setting that is missing, then refuse a
    trusted-issuer file that cannot be used (or has an http JWKS URL), a missing or
    non-https CDS_PUBLIC_BASE_URL (the JWT audience is built from it, never from Host), and a
    CDS_SMART_SESSION_SECRET too short to sign with."""
    if settings.is_development:
        return
    missing = [name for name, value in (("CDS_TRUSTED_ISSUERS_FILE",
                                         settings.trusted_issuers_file),
                                        ("CDS_AUDIT_HASH_KEY", settings.audit_hash_key))
               if not value]
    if missing:
        raise ConfigurationError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required outside "
            "development mode (CDS_ENV=development accepts calls without a token)")
    build_verifier(settings)  # the trusted-issuer file: readable, JWKS URLs https
    problem = public_base_url_problem(settings.public_base_url)
    if problem:
        raise ConfigurationError(
            f"CDS_PUBLIC_BASE_URL {problem} outside development mode: it is the base URL the "
            "EHR calls (e.g. https://cds.example.org), and every JWT audience (aud) is checked "
            "against it, never against the request's Host header")
    secret = settings.smart_session_secret
    if settings.smart_app_enabled and secret is not None and len(secret) < 32:
        raise ConfigurationError(
            "CDS_SMART_SESSION_SECRET must be at least 32 characters: it signs the SMART app's "
            "session cookies and encrypts the EHR's access tokens it keeps (unset, a secret is "
            "derived from CDS_AUDIT_HASH_KEY)")


def build_verifier(settings: Settings, replay: SharedReplayStore | None = None,
                   metrics: Metrics | None = None) -> JwtVerifier | None:
    """The JWT verifier, or None in development mode without trusted issuers.

    ``replay`` is the shared (database) replay store; while it is unavailable this process's
    own store decides, counted in ``cds_jwt_replay_fallback_total``. Outside development a JWKS
    URL must be https. The caller closes the verifier (``aclose``) at shutdown.
    """
    if settings.trusted_issuers_file is None:
        if settings.is_development:
            return None
        raise ConfigurationError("CDS_TRUSTED_ISSUERS_FILE is required outside development mode")
    try:
        issuers = load_trusted_issuers(settings.trusted_issuers_file,
                                       require_https=not settings.is_development)
    except ValueError as exc:
        raise ConfigurationError(f"CDS_TRUSTED_ISSUERS_FILE: {exc}") from exc
    if replay is not None:
        def fell_back(failed: bool) -> None:
            if metrics is not None:
                metrics.jwt_replay_fallback.inc()
                if failed:  # the database was asked (not skipped while it recovers)
                    metrics.db_errors.labels("jwt-replay").inc()

        return JwtVerifier(issuers, settings, replay=FallbackReplayStore(
            replay, on_fallback=fell_back,
            deadline_seconds=settings.jwt_replay_timeout_seconds))
    return JwtVerifier(issuers, settings)


def audit_hash_key(settings: Settings) -> str:
    """CDS_AUDIT_HASH_KEY; in development a random key kept in the data directory."""
    if settings.audit_hash_key:
        return settings.audit_hash_key
    if not settings.is_development:
        raise ConfigurationError("CDS_AUDIT_HASH_KEY is required outside development mode "
                                 "(the secret that hashes patient ids in the audit)")
    path = settings.data_dir / "audit-hash.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def build_fetcher(settings: Settings) -> FhirFetcher:
    """The client that completes a record from the EHR's FHIR server, under the settings' guard
    (allow-list, https outside development, time and size budgets)."""
    return FhirFetcher(FetchPolicy(
        allowed=FetchPolicy.parse_allowed(settings.fhir_allowed_servers),
        require_https=not settings.is_development,
        timeout_seconds=settings.fhir_timeout_seconds,
        budget_seconds=settings.fhir_budget_seconds, max_pages=settings.fhir_max_pages,
        page_size=settings.fhir_page_size, max_response_bytes=settings.fhir_max_response_bytes,
        without_token=(settings.is_development if settings.fhir_fetch_without_token is None
                       else settings.fhir_fetch_without_token)))


def request_limits(settings: Settings) -> Limits:
    """What one hook request may cost (draft orders, nesting, codings, code length)."""
    return Limits(max_depth=settings.max_json_depth, max_drafts=settings.max_draft_orders,
                  max_codings=settings.max_codings_per_concept,
                  max_code_length=settings.max_code_length)


def override_systems(settings: Settings, site_system: str | None = None) -> frozenset[str]:
    """The override-reason systems feedback may name: today's (a site's own, when
    cards/common.yaml names one), and those our cards carried under former canonical bases
    (CDS_CANONICAL_BASE_PREVIOUS) or before the systems resolved."""
    today = SystemUrls.under(settings.canonical_root, site_system).override_reason
    former = [SystemUrls.under(root).override_reason
              for root in settings.previous_canonical_roots]
    return frozenset([today, LEGACY_OVERRIDE_SYSTEM, *former])


def build_audit_writer(settings: Settings, store: Store, metrics: Metrics) -> AuditWriter:
    """The writer of the hook-call audit, its events counted in the metrics and logged."""

    def audit_event(kind: str, rows: int, detail: str) -> None:
        """Audit writer events: at most one per batch written or tried, never one per row."""
        metrics.refresh_audit_queue()
        if kind == "written":
            metrics.audit_written.inc(rows)
        elif kind == "dropped":
            metrics.audit_dropped.labels(detail).inc(rows)
            log.error("audit rows dropped", extra={"rows": rows, "reason": detail})
        elif kind == "retrying":
            metrics.db_errors.labels("audit").inc()
            failures = audits.failures
            if failures & (failures - 1) == 0:  # the 1st, 2nd, 4th, 8th... failure in a row
                log.warning("audit rows held: database not writable, retrying", extra={
                    "rows": rows, "error": detail, "attempt": failures})
        elif kind == "resumed":
            log.info("audit writes resumed", extra={"rows": rows})
        elif kind == "fixed":
            metrics.audit_fixed.inc(rows)
            log.info("audit values cut to their column or cleaned of NUL",
                     extra={"rows": rows})

    audits = AuditWriter(store, audit_event, interval=settings.audit_flush_seconds,
                         batch=settings.audit_batch_rows, max_queue=settings.audit_queue_rows,
                         retry_max=settings.audit_retry_max_seconds)
    metrics.watch_audit_queue(audits.pending)
    return audits
