"""The app's calls to the EHR, under the FHIR fetch's SSRF guard (cds_service.record.fetch).

FHIR reads go through :class:`FhirFetcher` (allow-listed servers only). The other calls (the
SMART configuration, the token endpoint, the QuestionnaireResponse written) go through
:meth:`Outbound.send`: http(s) only (https outside development), no credentials in the URL, the
host's addresses checked (no link-local, metadata, multicast or reserved address) and the
connection pinned to them, no redirects followed, no content coding, a small body cap. Faults
come back as short labels, never as exceptions; nothing here logs a URL, a body or a token.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx

from cds_service.record.fetch import (
    TRANSPORT_FAULTS,
    FetchPolicy,
    FhirFetcher,
    Resolver,
    checked_addresses,
    fault_outcome,
    pinned,
    system_resolver,
)

MAX_REPLY_BYTES = 1024 * 1024  # a SMART configuration, a token or a write outcome is small


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: httpx.Headers


class Outbound:
    """One request's clients (used as ``async with``; closed at the end of the request)."""

    def __init__(self, policy: FetchPolicy, resolver: Resolver = system_resolver,
                 byte_budget: int | None = None):
        self.policy = policy
        # one budget of bytes for everything this request reads, every source and page
        self.fhir = FhirFetcher(policy, resolver=resolver, byte_budget=byte_budget)
        self._resolve = resolver

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.fhir.aclose()

    def target(self, url: str) -> httpx.URL | None:
        """``url`` as it may be called (scheme, no credentials, no control characters)."""
        if not isinstance(url, str) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            return None
        try:
            parsed = httpx.URL(url)
            parsed.raw_host.decode("ascii")
        except (httpx.InvalidURL, ValueError, UnicodeError):
            return None
        schemes = ("https",) if self.policy.require_https else ("https", "http")
        if parsed.scheme not in schemes or not parsed.host or parsed.userinfo:
            return None
        return parsed

    async def send(self, method: str, url: str, **kwargs: Any) -> Reply | str:
        """One request (``headers``, ``content`` or ``data`` as httpx takes them): the reply,
        or a fault label: bad-url, unsafe-address, unresolvable, timeout, connection-error,
        too-large, over-budget, bad-encoding."""
        target = self.target(url)
        if target is None:
            return "bad-url"
        host = target.raw_host.decode("ascii")
        seconds = self.policy.timeout_seconds
        try:
            async with asyncio.timeout(seconds):
                addresses = await checked_addresses(host, self._resolve)
            if isinstance(addresses, str):
                return addresses
            async with asyncio.timeout(seconds):
                with pinned(host, addresses):
                    return await self._exchange(method, target, **kwargs)
        except TRANSPORT_FAULTS as exc:
            return fault_outcome(exc)

    async def _exchange(self, method: str, url: httpx.URL, **kwargs: Any) -> Reply | str:
        headers = {"Accept-Encoding": "identity", **kwargs.pop("headers", {})}
        async with self.fhir.client.stream(method, url, headers=headers, **kwargs) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > MAX_REPLY_BYTES:
                return "too-large"
            if declared.isdigit() and not self.fhir.within_budget(int(declared)):
                return "over-budget"
            coding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
            if coding != "identity":
                return "bad-encoding"
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > MAX_REPLY_BYTES:
                    return "too-large"
                if not self.fhir.spend(len(chunk)):
                    return "over-budget"
        return Reply(response.status_code, bytes(body), response.headers)
