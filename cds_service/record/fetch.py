"""Fetch from the EHR's FHIR server what the prefetch lacks, safely and within a time budget.

``fhirServer`` is untrusted input (SSRF): the service talks only to servers allow-listed in
``CDS_FHIR_ALLOWED_SERVERS``, never follows redirects, never to link-local or cloud-metadata
addresses (checked after DNS resolution), follows ``next`` links only on the same server, and
sends the request's bearer token only there. Every fault leaves that source missing; none of them
becomes an error of ours. Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from cds_service.record.prefetch import (
    PREFETCH_TEMPLATES,
    SOURCE_ATTRS,
    PatientRecord,
    Source,
    SourceState,
    source_from_value,
)

log = logging.getLogger("cds_service.fetch")

METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}
RETRY_STATUSES = {502, 503, 504}


@dataclass(frozen=True)
class FetchPolicy:
    """Where and how long the service may fetch."""

    allowed: tuple[str, ...] = ()
    require_https: bool = True
    timeout_seconds: float = 0.25
    budget_seconds: float = 0.4
    max_pages: int = 5

    @classmethod
    def parse_allowed(cls, value: str) -> tuple[str, ...]:
        return tuple(normalize_base(v) for v in value.split(",") if v.strip())


@dataclass
class FetchReport:
    """What happened to each source (for logs and metrics; no URLs with PHI, no tokens)."""

    outcomes: dict[str, str] = field(default_factory=dict)


def normalize_base(url: str) -> str:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port in (None, default) else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        netloc = f"[{host}]" if port in (None, default) else f"[{host}]:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def server_allowed(server: str, policy: FetchPolicy) -> bool:
    """The request's fhirServer is one of the allow-listed bases (exactly)."""
    try:
        base = normalize_base(server)
    except ValueError:
        return False
    if policy.require_https and not base.startswith("https://"):
        return False
    return base in policy.allowed


def same_server(url: str, base: str) -> bool:
    try:
        target = normalize_base(url)
    except ValueError:
        return False
    return target == base or target.startswith(base + "/")


def _forbidden_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved
            or str(ip) in {"169.254.169.254", "fd00:ec2::254", "100.100.100.200"})


async def host_is_safe(host: str) -> bool:
    """False when the host is, or resolves to, a link-local or metadata address."""
    if not host or host.lower() in METADATA_HOSTS:
        return False
    try:
        return not _forbidden_ip(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                             type=socket.SOCK_STREAM)
    except OSError:
        return True  # unresolvable: the connection will fail anyway; nothing forbidden known
    return not any(
        _forbidden_ip(ipaddress.ip_address(info[4][0].split("%")[0])) for info in infos)


class FhirFetcher:
    """Fills missing prefetch keys from the FHIR server (one shared connection pool)."""

    def __init__(self, policy: FetchPolicy, client: httpx.AsyncClient | None = None):
        self.policy = policy
        self.client = client or httpx.AsyncClient(
            follow_redirects=False, timeout=policy.timeout_seconds,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            headers={"Accept": "application/fhir+json"})

    async def aclose(self) -> None:
        await self.client.aclose()

    async def complete(self, record: PatientRecord, server: str | None,
                       token: str | None) -> FetchReport:
        """Fetch every missing or partial source; update ``record`` in place."""
        report = FetchReport()
        wanted = {k: s for k, s in record.sources().items()
                  if s.state is not SourceState.COMPLETE}
        if not wanted:
            return report
        if not server or not token:
            report.outcomes = {k: "no-server" for k in wanted}
            return report
        if not server_allowed(server, self.policy):
            report.outcomes = {k: "not-allowed" for k in wanted}
            log.warning("fhirServer not allow-listed; no fetch")
            return report
        base = normalize_base(server)
        if not await host_is_safe(urlsplit(base).hostname or ""):
            report.outcomes = {k: "unsafe-address" for k in wanted}
            log.warning("fhirServer resolves to a forbidden address; no fetch")
            return report
        deadline = time.monotonic() + self.policy.budget_seconds
        keys = list(wanted)
        results = await asyncio.gather(*(
            self._fetch_source(k, wanted[k], record.patient_id, base, token, deadline)
            for k in keys))
        for key, (source, outcome) in zip(keys, results, strict=True):
            report.outcomes[key] = outcome
            if source is not None:
                _set_source(record, key, source)
        log.info("fhir fetch", extra={"outcomes": report.outcomes})
        return report

    async def _fetch_source(self, key: str, current: Source, patient_id: str, base: str,
                            token: str, deadline: float) -> tuple[Source | None, str]:
        rtype, template = PREFETCH_TEMPLATES[key]
        if current.state is SourceState.PARTIAL and current.next_url:
            resources, url, pages = list(current.resources), current.next_url, 0
        else:
            query = template.replace("{{context.patientId}}", patient_id)
            resources, url, pages = [], f"{base}/{query}", 0
            first = await self._get(url, token, deadline)
            if isinstance(first, str):
                return None, first
            source = source_from_value(first, rtype, patient_id, present=True)
            if source.state is SourceState.MISSING:
                return None, "wrong-content"
            if rtype == "Patient" or source.state is SourceState.COMPLETE:
                return source, "fetched"
            resources, url, pages = source.resources, source.next_url, 1
        while url:
            if pages >= self.policy.max_pages:
                return Source(SourceState.PARTIAL, resources, note="page cap reached",
                              next_url=url), "page-cap"
            if not same_server(url, base):
                return Source(SourceState.PARTIAL, resources, note="next link elsewhere"), \
                    "foreign-next-link"
            page = await self._get(url, token, deadline)
            if isinstance(page, str):
                return Source(SourceState.PARTIAL, resources, note=page, next_url=url), page
            more = source_from_value(page, rtype, patient_id, present=True)
            if more.state is SourceState.MISSING:
                return Source(SourceState.PARTIAL, resources, note="bad page",
                              next_url=url), "wrong-content"
            resources = resources + more.resources
            url = more.next_url
            pages += 1
        return Source(SourceState.COMPLETE, resources), "fetched"

    async def _get(self, url: str, token: str, deadline: float) -> Any:
        """The parsed JSON body, or a short fault label."""
        for attempt in (1, 2):
            remaining = deadline - time.monotonic()
            if remaining <= 0.01:
                return "budget-exhausted"
            try:
                response = await self.client.get(
                    url, headers={"Authorization": f"Bearer {token}"},
                    timeout=min(self.policy.timeout_seconds, remaining))
            except httpx.TimeoutException:
                return "timeout"
            except httpx.HTTPError:
                return "connection-error"
            if response.status_code in RETRY_STATUSES and attempt == 1:
                continue
            if response.status_code != 200:
                return f"http-{response.status_code}"
            try:
                return orjson.loads(response.content)
            except orjson.JSONDecodeError:
                return "malformed-json"
        return "retry-failed"


def _set_source(record: PatientRecord, key: str, source: Source) -> None:
    setattr(record, SOURCE_ATTRS[key], source)
