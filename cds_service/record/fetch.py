"""Fetch from the EHR's FHIR server what the prefetch lacks, safely and within a time budget.

``fhirServer`` is untrusted input (SSRF): the service talks only to servers allow-listed in
``CDS_FHIR_ALLOWED_SERVERS``, never follows redirects, never to link-local or cloud-metadata
addresses (the name is resolved once per hook call, every address is checked, and connections go
to those checked addresses only: a DNS server that answers differently the second time is never
asked again; a name that does not resolve is not fetched), builds its URLs from percent-encoded
path segments and query parameters (a patient id cannot leave the base path or add parameters),
follows ``next`` links only on the same server and under the same base path (after resolving dot
segments), and sends the request's bearer token only there. The time budget covers connecting,
the headers and the body; a body above the size cap is not read. Every fault leaves that source
missing (or partial); none of them becomes an error of ours. Tokens and patient ids are never
logged.

The searches of one hook call run concurrently, each following its own ``next`` links, so the
pages of different searches are in flight together; only the pages of one search wait on each
other (each ``next`` link is in the page before). Each search asks for large pages (``_count``):
a server at 100 ms an answer that pages by 20 needs a round trip per 20 resources otherwise.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import httpcore
import httpx
import orjson

from cds_service.record.prefetch import (
    PREFETCH_TEMPLATES,
    PatientRecord,
    Source,
    SourceState,
    source_from_value,
)
from cds_service.scopes import can_read, can_search

log = logging.getLogger("cds_service.fetch")

METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}
RETRY_STATUSES = {502, 503, 504}
REFUSALS = {  # the outcome of the address check that stops a fetch, and its log line
    "timeout": "fhirServer name did not resolve within the budget; no fetch",
    "unsafe-address": "fhirServer is or resolves to a forbidden address; no fetch",
    "unresolvable": "fhirServer name does not resolve; no fetch",
}

Resolver = Callable[[str], Awaitable[Sequence[str]]]
"""The IP addresses of a host name (OSError when it has none)."""


@dataclass(frozen=True)
class FetchPolicy:
    """Where and how long the service may fetch (the defaults are the settings' defaults:
    docs/configuration.md says why each is what it is)."""

    allowed: tuple[str, ...] = ()
    require_https: bool = True
    timeout_seconds: float = 1.0
    budget_seconds: float = 2.0
    max_pages: int = 10
    max_response_bytes: int = 8 * 1024 * 1024
    # Entries asked for per page of a search (``_count``; a server may answer with fewer);
    # 0: no ``_count`` is sent and the server's own page size applies.
    page_size: int = 200
    # Fetch from an allow-listed server when the request names it but sends no token (an open
    # FHIR server, as the CDS Hooks sandbox uses): a setting, on in development.
    without_token: bool = False

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


def _has_control(value: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value)


def _segments(url: httpx.URL) -> list[str] | None:
    """The decoded path segments, or None when a server could read them as another path: a
    segment that decodes to a dot segment or holds an (encoded) slash or backslash."""
    segments = [unquote(s) for s in url.raw_path.decode("ascii").partition("?")[0].split("/")]
    if any(s in (".", "..") or "/" in s or "\\" in s for s in segments[1:]):
        return None
    return segments[1:]


def within_base(url: httpx.URL, base: str) -> bool:
    """``url`` (already normalised by httpx: dot segments resolved) is on the base's scheme,
    host and port, carries no credentials, and its path is the base path or under it."""
    root = httpx.URL(base)
    if (url.scheme, url.host, url.port) != (root.scheme, root.host, root.port) or url.userinfo:
        return False
    path, prefix = _segments(url), _segments(root)
    if path is None or prefix is None:
        return False
    if prefix == [""]:  # the base is the server's root
        prefix = []
    return path[:len(prefix)] == prefix


def link_target(url: str, base: str) -> httpx.URL | str:
    """The URL to request for a ``next`` link, or why not: ``bad-next-link`` (control
    characters, unparsable) or ``foreign-next-link`` (another server, outside the base path)."""
    if _has_control(url):
        return "bad-next-link"
    try:
        target = httpx.URL(url)  # dot segments resolved here: what is checked is what is sent
        inside = within_base(target, base)
    except (httpx.InvalidURL, ValueError, UnicodeError):
        return "bad-next-link"
    return target if inside else "foreign-next-link"


def same_server(url: str, base: str) -> bool:
    """A ``next`` link that may be followed (with the token) from the server ``base``."""
    return isinstance(link_target(url, base), httpx.URL)


def query_url(base: str, template: str, patient_id: str, count: int = 0) -> httpx.URL | None:
    """A prefetch template as a URL under ``base``: the patient id filled in as one
    percent-encoded path segment or one encoded query value, and for a search (a template with
    a query) ``_count`` when ``count`` is above 0. None when the id is no id any server can hold
    (empty, a dot segment, a slash, a control character)."""
    if (patient_id in ("", ".", "..") or "/" in patient_id or "\\" in patient_id
            or _has_control(patient_id)):
        return None
    path, _, query = template.partition("?")

    def fill(part: str) -> str:
        return part.replace("{{context.patientId}}", patient_id)

    segments = "/".join(quote(fill(s), safe="") for s in path.split("/"))
    params = [(k, fill(v)) for k, v in parse_qsl(query, keep_blank_values=True)]
    if query and count > 0:
        params.append(("_count", str(count)))
    try:
        url = httpx.URL(f"{base}/{segments}", params=params or None)
    except (httpx.InvalidURL, ValueError, UnicodeError):
        return None
    return url if within_base(url, base) else None


def _forbidden_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved
            or str(ip) in {"169.254.169.254", "fd00:ec2::254", "100.100.100.200"})


async def system_resolver(host: str) -> list[str]:
    """The addresses of ``host`` from the event loop's getaddrinfo."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value.strip("[]").split("%")[0])
    except ValueError:
        return None


async def checked_addresses(host: str,
                            resolve: Resolver = system_resolver) -> tuple[str, ...] | str:
    """The addresses to connect to for ``host``, every one checked (an IP literal is its own,
    without a lookup), or why not: ``unsafe-address`` (a metadata name, or any address
    link-local, metadata, multicast, reserved or unspecified) or ``unresolvable``."""
    if not host or host.lower() in METADATA_HOSTS:
        return "unsafe-address"
    literal = _address(host)
    if literal is not None:
        return "unsafe-address" if _forbidden_ip(literal) else (str(literal),)
    try:
        answers = await resolve(host)
    except (OSError, UnicodeError):
        return "unresolvable"
    addresses = [_address(a) for a in answers]
    if not addresses:
        return "unresolvable"
    if any(a is None or _forbidden_ip(a) for a in addresses):
        return "unsafe-address"
    return tuple(dict.fromkeys(str(a) for a in addresses))


def connect_host(base: str) -> str:
    """The base's host as the connection pool names it (IDNA-encoded, IPv6 without brackets)."""
    try:
        return httpx.URL(base).raw_host.decode("ascii")
    except (httpx.InvalidURL, ValueError, UnicodeError):
        return ""


_PINS: ContextVar[dict[str, tuple[str, ...]] | None] = ContextVar("fhir_pins", default=None)


@contextmanager
def pinned(host: str, addresses: tuple[str, ...]) -> Iterator[None]:
    """Inside the block (and the tasks it starts) new connections to ``host`` go to
    ``addresses`` only; any other host has none (the pins of an outer block are not kept)."""
    token = _PINS.set({host: addresses})
    try:
        yield
    finally:
        _PINS.reset(token)


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects to the addresses pinned for the host, in order, and never looks the name up
    again (a rebinding DNS server could answer a forbidden address then). TLS (SNI, certificate
    check) and the Host header still use the name: httpcore takes them from the URL."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int,
                          timeout: float | None = None,  # noqa: ASYNC109 - httpcore's API
                          local_address: str | None = None,
                          socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        addresses = (_PINS.get() or {}).get(host)
        if not addresses:
            raise httpcore.ConnectError("no checked address for this host")

        async def connect(address: str) -> httpcore.AsyncNetworkStream:
            return await self._inner.connect_tcp(address, port, timeout=timeout,
                                                 local_address=local_address,
                                                 socket_options=socket_options)

        for address in addresses[:-1]:  # e.g. an IPv6 address first, not reachable from here
            try:
                return await connect(address)
            except httpcore.ConnectError:
                continue
        return await connect(addresses[-1])

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport, its connections made by :class:`PinnedBackend`. httpx 0.28 takes no
    network backend, so the pool it builds is replaced by an equal one that has it. No proxy
    (one would look the name up itself), not even from the environment."""

    def __init__(self, limits: httpx.Limits) -> None:
        super().__init__(limits=limits)
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            # a newer httpx would otherwise keep its own pool, which looks names up again
            raise RuntimeError("httpx.AsyncHTTPTransport has no _pool to replace")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=PinnedBackend())


# What can go wrong on the way to a server (not its answer), and the outcome each is counted as
TRANSPORT_FAULTS = (TimeoutError, httpx.HTTPError, httpx.InvalidURL, ValueError, UnicodeError)


def fault_outcome(exc: BaseException) -> str:
    """The outcome of a transport fault: timeout, connection-error or bad-url."""
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.HTTPError):
        return "connection-error"
    return "bad-url"


class FhirFetcher:
    """Fills missing prefetch keys from the FHIR server (one shared connection pool).

    ``resolver`` looks host names up (the event loop's getaddrinfo by default; tests stub it).
    A ``client`` given here connects as it likes: only the default one is pinned to the
    addresses checked."""

    def __init__(self, policy: FetchPolicy, client: httpx.AsyncClient | None = None,
                 resolver: Resolver = system_resolver, byte_budget: int | None = None) -> None:
        self.policy = policy
        self._resolve = resolver
        # bytes every answer together may take (None: no budget beyond each answer's cap): a
        # fetcher made for one SMART page view bounds what that view holds in memory
        self.bytes_left = byte_budget
        self._refused: set[str] = set()  # hosts already reported as not allow-listed
        self.client = client or httpx.AsyncClient(
            follow_redirects=False, timeout=policy.timeout_seconds,
            transport=PinnedTransport(
                httpx.Limits(max_connections=100, max_keepalive_connections=20)),
            headers={"Accept": "application/fhir+json"})

    async def aclose(self) -> None:
        await self.client.aclose()

    def within_budget(self, size: int) -> bool:
        return self.bytes_left is None or size <= self.bytes_left

    def spend(self, size: int) -> bool:
        """Take ``size`` bytes from the budget: False (and nothing taken) past it."""
        if self.bytes_left is None:
            return True
        if size > self.bytes_left:
            self.bytes_left = 0  # what is read now is dropped: nothing more for the others
            return False
        self.bytes_left -= size
        return True

    async def complete(self, record: PatientRecord, server: str | None,
                       token: str | None, keys: Iterable[str] | None = None,
                       scope: str | None = None) -> FetchReport:
        # (a None token: no Authorization header is sent; only when the policy allows it)
        """Fetch every missing or partial source (of ``keys`` only, when given); update
        ``record`` in place. ``scope``: the token's SMART scopes (v1 or v2), when the EHR says
        them; a source they do not let the token read is not asked for (``not-granted``)."""
        report = FetchReport()
        only = None if keys is None else set(keys)
        wanted = {k: s for k, s in record.sources().items()
                  if s.state is not SourceState.COMPLETE and (only is None or k in only)}
        if scope and token:
            refused = [k for k in wanted if not scope_allows(scope, k)]
            report.outcomes = {k: "not-granted" for k in refused}
            wanted = {k: s for k, s in wanted.items() if k not in refused}
        if not wanted:
            return report
        if not server:
            report.outcomes |= {k: "no-server" for k in wanted}
            return report
        if not token and not self.policy.without_token:
            report.outcomes |= {k: "no-token" for k in wanted}
            return report
        if not server_allowed(server, self.policy):
            report.outcomes |= {k: "not-allowed" for k in wanted}
            _warn_once(self._refused, urlsplit(server).hostname or "?",
                       "fhirServer not allow-listed; no fetch (said once per host; the "
                       "metric cds_fhir_fetch_total{outcome=\"not-allowed\"} counts them)")
            return report
        base = normalize_base(server)
        deadline = time.monotonic() + self.policy.budget_seconds
        host = connect_host(base)
        addresses = await self._check(host)
        if isinstance(addresses, str):
            report.outcomes |= {k: addresses for k in wanted}
            return report
        keys = list(wanted)
        with pinned(host, addresses):
            results = await asyncio.gather(*(
                self._fetch_source(k, wanted[k], record.patient_id, base, token, deadline)
                for k in keys))
        for key, (source, outcome) in zip(keys, results, strict=True):
            report.outcomes[key] = outcome
            if source is not None:
                record.replace_source(key, source)
        log.info("fhir fetch", extra={"outcomes": report.outcomes})
        return report

    async def read(self, server: str, token: str | None, rtype: str, rid: str) -> Any:
        """One resource (``{rtype}/{rid}``) from an allow-listed server, under the same guard
        as :meth:`complete`: its parsed JSON, or a short fault label (a str)."""
        if not server_allowed(server, self.policy):
            return "not-allowed"
        base = normalize_base(server)
        url = query_url(base, rtype + "/{{context.patientId}}", rid)  # rid: one encoded segment
        if url is None:
            return "bad-id"
        host = connect_host(base)
        addresses = await self._check(host)
        if isinstance(addresses, str):
            return addresses
        with pinned(host, addresses):
            return await self._get(url, base, token,
                                   time.monotonic() + self.policy.budget_seconds)

    async def _check(self, host: str) -> tuple[str, ...] | str:
        """The checked addresses of ``host``, or the outcome that stops the fetch (logged)."""
        try:
            async with asyncio.timeout(self.policy.budget_seconds):  # DNS is in the budget too
                checked = await checked_addresses(host, self._resolve)
        except TimeoutError:
            checked = "timeout"
        if isinstance(checked, str):
            log.warning(REFUSALS[checked])
        return checked

    async def _fetch_source(self, key: str, current: Source, patient_id: str, base: str,
                            token: str | None, deadline: float) -> tuple[Source | None, str]:
        rtype, template = PREFETCH_TEMPLATES[key]
        url: str | None
        if current.state is SourceState.PARTIAL and current.next_url:
            resources, url, pages = list(current.resources), current.next_url, 0
        else:
            start = query_url(base, template, patient_id, self.policy.page_size)
            if start is None:
                return None, "bad-patient-id"
            first = await self._get(start, base, token, deadline)
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
            target = link_target(url, base)
            if isinstance(target, str):
                return Source(SourceState.PARTIAL, resources, note="next link not followed"), \
                    target
            page = await self._get(target, base, token, deadline)
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

    async def _get(self, url: httpx.URL, base: str, token: str | None, deadline: float) -> Any:
        """The parsed JSON body, or a short fault label. Each attempt, from connecting to the
        last byte of the body, gets the per-request timeout, never more than the budget left."""
        if not within_base(url, base):  # the token goes nowhere else, whoever built the URL
            return "foreign-next-link"
        for attempt in (1, 2):
            remaining = deadline - time.monotonic()
            if remaining <= 0.01:
                return "budget-exhausted"
            limit = min(self.policy.timeout_seconds, remaining)
            try:
                async with asyncio.timeout(limit):
                    answer = await self._read(url, token, limit)
            except TRANSPORT_FAULTS as exc:
                return fault_outcome(exc)
            if isinstance(answer, str):
                return answer
            status, body = answer
            if status in RETRY_STATUSES and attempt == 1:
                continue
            if status != 200:
                return f"http-{status}"
            try:
                return orjson.loads(body)
            except orjson.JSONDecodeError:
                return "malformed-json"
        return "retry-failed"

    async def _read(self, url: httpx.URL, token: str | None,
                    seconds: float) -> tuple[int, bytes] | str:
        """(status, body) of one GET; the body of a 200 only, streamed up to the size cap
        ("too-large" past it, or at once on a Content-Length above it). The cap is on the
        decoded body: gzip is inflated 1 KiB at a time (one 64 KiB read of the socket could
        inflate to 64 MiB), and no other content coding is asked for or accepted."""
        cap = self.policy.max_response_bytes
        headers = {"Accept-Encoding": "gzip"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self.client.stream("GET", url, headers=headers, timeout=seconds) as response:
            if response.status_code != 200:
                return response.status_code, b""  # the body is not read; the stream is closed
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > cap:
                return "too-large"
            if declared.isdigit() and not self.within_budget(int(declared)):
                return "over-budget"
            coding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
            if coding not in ("identity", "gzip"):
                return "bad-encoding"
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if coding == "gzip" else None
            body: list[bytes] = []
            size = 0
            try:
                async for raw in response.aiter_raw(1024 if inflate else None):
                    chunk = inflate.decompress(raw) if inflate else raw
                    size += len(chunk)
                    if size > cap:
                        return "too-large"
                    if not self.spend(len(chunk)):
                        return "over-budget"
                    body.append(chunk)
                tail = inflate.flush() if inflate else b""
                if size + len(tail) > cap:
                    return "too-large"
                if not self.spend(len(tail)):
                    return "over-budget"
                body.append(tail)
            except zlib.error:
                return "bad-encoding"
        return 200, b"".join(body)


def scope_allows(scope: str, key: str) -> bool:
    """Whether SMART scopes let a token make a prefetch key's query: a read by id for the
    patient, a search for the others."""
    rtype, template = PREFETCH_TEMPLATES[key]
    return can_search(scope, rtype) if "?" in template else can_read(scope, rtype)


def _warn_once(seen: set[str], key: str, message: str) -> None:
    """A configuration problem is logged once per key (a bounded set), not on every call."""
    if key in seen:
        return
    if len(seen) < 256:
        seen.add(key)
    log.warning(message, extra={"host_seen": len(seen)})
