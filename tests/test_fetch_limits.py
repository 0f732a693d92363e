"""The FHIR fetch keeps its time budget and size cap against hostile servers on loopback.

The budget covers connecting, the status line and headers, and the body; the size cap is enforced
while the body streams in (and at once on a Content-Length above it), so neither a server that
trickles a byte at a time nor one that sends hundreds of megabytes holds a hook or the memory.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest

from cds_service.app import create_app
from cds_service.record import SourceState, record_from_prefetch
from cds_service.record.fetch import FetchPolicy, FhirFetcher
from cds_service.settings import Settings
from tests.builders import PATIENT, hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient, dev_settings
from tests.fhir_server import ScriptedServer

TOKEN = "limits-token-" + "5" * 12
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
CAP = 1024 * 1024
CHUNK = 64 * 1024  # the most one read of the socket returns (httpcore reads 64 KiB)
Send = Callable[[bytes], None]


def trickle_body(server: ScriptedServer, send: Send) -> None:
    """Headers at once, then one byte of the body every 0.2 s (for at most 6 s)."""
    send(HEAD + b"Content-Length: 100000\r\n\r\n{")
    for _ in range(30):
        if server.stop.wait(0.2):
            return
        send(b" ")


def trickle_head(server: ScriptedServer, send: Send) -> None:
    """The status line and headers one byte every 0.2 s (for at most 6 s)."""
    for byte in (HEAD + b"Content-Length: 2\r\n\r\n{}")[:30]:
        if server.stop.wait(0.2):
            return
        send(bytes([byte]))


def endless(framing: str, total: int = 32 * 1024 * 1024) -> Any:
    """A 200 answer of ``total`` bytes of JSON whitespace, framed by Content-Length, chunked
    transfer encoding or the closing of the connection."""

    def script(server: ScriptedServer, send: Send) -> None:
        head = {"content-length": f"Content-Length: {total}\r\n".encode(),
                "chunked": b"Transfer-Encoding: chunked\r\n", "close": b"Connection: close\r\n"}
        send(HEAD + head[framing] + b"\r\n")
        block = b" " * CHUNK
        for _ in range(total // CHUNK):
            if server.stop.is_set():
                return
            send(b"%x\r\n%s\r\n" % (len(block), block) if framing == "chunked" else block)
        if framing == "chunked":
            send(b"0\r\n\r\n")

    return script


def gzip_bomb(total: int = 64 * 1024 * 1024) -> Any:
    """A small gzip body that decodes to ``total`` bytes."""
    body = gzip.compress(b" " * total, compresslevel=9)

    def script(server: ScriptedServer, send: Send) -> None:
        send(HEAD + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    return script


class _Counted(httpx.AsyncByteStream):
    def __init__(self, inner: Any, sizes: list[int]):
        self.inner, self.sizes = inner, sizes

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.sizes.append(len(chunk))
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class CountingTransport(httpx.AsyncHTTPTransport):
    """The ordinary transport, counting the body bytes the client took off the socket."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        response.stream = _Counted(response.stream, self.sizes)
        return response


def policy(base: str, **kw: Any) -> FetchPolicy:
    values: dict[str, Any] = {"allowed": (base,), "require_https": False,
                              "timeout_seconds": 0.25, "budget_seconds": 0.4, "max_pages": 3}
    values.update(kw)
    return FetchPolicy(**values)


def fetch_all(base: str, pol: FetchPolicy, prefetch: dict[str, Any] | None = None,
              client: httpx.AsyncClient | None = None) -> tuple[Any, Any, float]:
    """(record, report, seconds) of one fetch of every missing key; the seconds are those of
    the fetch itself (not the client's set-up: loading the CA bundle is no part of a call)."""
    record = record_from_prefetch(prefetch, PATIENT)

    async def go() -> tuple[Any, float]:
        fetcher = FhirFetcher(pol, client)
        try:
            started = time.monotonic()
            report = await fetcher.complete(record, base, TOKEN)
            return report, time.monotonic() - started
        finally:
            await fetcher.aclose()

    report, seconds = asyncio.run(go())
    return record, report, seconds


def only_conditions_missing() -> dict[str, Any]:
    prefetch = seed_prefetch(FIXTURE_NOW)
    del prefetch["conditions"]
    return prefetch


# ------------------------------------------------------------------ the time budget


@pytest.mark.parametrize("script", [trickle_body, trickle_head])
@pytest.mark.parametrize("timeout", [0.25, 5.0])  # per request below, and above, the budget
def test_a_trickling_server_is_cut_off_at_the_budget(script: Any, timeout: float) -> None:
    with ScriptedServer(script) as server:
        pol = policy(server.base, timeout_seconds=timeout)
        record, report, seconds = fetch_all(server.base, pol)
    assert seconds < pol.budget_seconds + 0.25, seconds
    assert set(report.outcomes.values()) == {"timeout"}
    # every source, the optional answers and allergies too (never "missing": they only add)
    assert record.missing_keys() + ["questionnaireresponses", "allergies"] == list(
        report.outcomes)
    assert len(server.requests) == 7  # one per source, no retry of a timeout


def test_a_trickled_next_page_leaves_the_source_partial_within_the_budget() -> None:
    with ScriptedServer(trickle_body) as server:
        prefetch = seed_prefetch(FIXTURE_NOW)
        prefetch["conditions"]["link"] = [
            {"relation": "next", "url": f"{server.base}/Condition?patient={PATIENT}&page=2"}]
        pol = policy(server.base, timeout_seconds=5.0)
        record, report, seconds = fetch_all(server.base, pol, prefetch)
    assert seconds < pol.budget_seconds + 0.25, seconds
    assert report.outcomes == {"conditions": "timeout"}
    assert record.conditions.state is SourceState.PARTIAL
    assert [r["id"] for r in record.conditions.resources] == ["c-lbp", "c-htn"]


def test_the_hook_answers_within_the_budget_when_the_server_trickles() -> None:
    with ScriptedServer(trickle_body) as server:
        settings = dev_settings(fhir_allowed_servers=server.base)  # default budget, 0.4 s
        body = hook_request(order(cpt="72148"))
        body["fhirServer"] = server.base
        body["fhirAuthorization"] = {"access_token": TOKEN, "token_type": "Bearer",
                                     "expires_in": 300, "scope": "patient/*.read",
                                     "subject": "cds-service"}
        with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
            c.post(SELECT, json=hook_request(order(cpt="72149")))  # warm up
            started = time.monotonic()
            r = c.post(SELECT, json=body)
            seconds = time.monotonic() - started
    assert r.status_code == 412
    assert seconds < settings.fhir_budget_seconds + 0.3, seconds


# ------------------------------------------------------------------ the size cap


def test_the_cap_defaults_to_8_mib() -> None:
    assert FetchPolicy().max_response_bytes == 8 * 1024 * 1024
    assert Settings.model_fields["fhir_max_response_bytes"].default == 8 * 1024 * 1024


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close"])
def test_an_answer_above_the_cap_is_not_read(framing: str) -> None:
    with ScriptedServer(endless(framing)) as server:
        pol = policy(server.base, max_response_bytes=CAP, timeout_seconds=5.0,
                     budget_seconds=5.0)
        transport = CountingTransport()
        client = httpx.AsyncClient(transport=transport, follow_redirects=False, timeout=5.0)
        tracemalloc.start()
        try:
            record, report, seconds = fetch_all(server.base, pol, only_conditions_missing(),
                                                client)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert report.outcomes == {"conditions": "too-large"}
    assert record.conditions.state is SourceState.MISSING
    read = sum(transport.sizes)
    assert read <= CAP + CHUNK, read
    if framing == "content-length":
        assert read == 0  # refused on the header, before the body
    assert peak < 3 * CAP, peak
    assert seconds < 2.0, seconds


def test_a_compressed_answer_is_capped_on_its_decoded_size() -> None:
    """64 MiB of gzip in 64 KiB: inflating a whole read of the socket at once would cost 64 MiB."""
    with ScriptedServer(gzip_bomb()) as server:
        pol = policy(server.base, max_response_bytes=CAP, timeout_seconds=5.0,
                     budget_seconds=5.0)
        tracemalloc.start()
        try:
            record, report, _ = fetch_all(server.base, pol, only_conditions_missing())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert report.outcomes == {"conditions": "too-large"}
    assert record.conditions.state is SourceState.MISSING
    assert peak < CAP + 4 * 1024 * 1024, peak  # the cap, and ~1 MiB inflated from 1 KiB a step


def answer(body: bytes, *headers: bytes) -> Any:
    def script(server: ScriptedServer, send: Send) -> None:
        send(HEAD + b"".join(h + b"\r\n" for h in headers)
             + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    return script


def test_a_compressed_answer_is_read_and_only_gzip_is_asked_for() -> None:
    bundle = seed_prefetch(FIXTURE_NOW)["conditions"]
    with ScriptedServer(answer(gzip.compress(orjson.dumps(bundle)),
                               b"Content-Encoding: gzip")) as server:
        record, report, _ = fetch_all(server.base, policy(server.base, timeout_seconds=2.0,
                                                          budget_seconds=2.0),
                                      only_conditions_missing())
    assert report.outcomes == {"conditions": "fetched"}
    assert [r["id"] for r in record.conditions.resources] == ["c-lbp", "c-htn"]
    assert server.headers[0]["accept-encoding"] == "gzip"


@pytest.mark.parametrize(("body", "coding"), [(b"{}", b"br"), (b"\x1f\x8bnot gzip", b"gzip")])
def test_a_coding_not_asked_for_or_broken_leaves_the_source_missing(body: bytes,
                                                                     coding: bytes) -> None:
    with ScriptedServer(answer(body, b"Content-Encoding: " + coding)) as server:
        record, report, _ = fetch_all(server.base, policy(server.base, timeout_seconds=2.0,
                                                          budget_seconds=2.0),
                                      only_conditions_missing())
    assert report.outcomes == {"conditions": "bad-encoding"}
    assert record.conditions.state is SourceState.MISSING


@pytest.mark.parametrize("coding", [b"identity", b"gzip"])
def test_an_answer_at_the_cap_is_read(coding: bytes) -> None:
    body = b'{"resourceType": "Bundle", "type": "searchset", "entry": []}'
    padded = body[:-1] + b" " * (CAP - len(body)) + b"}"
    if coding == b"gzip":
        padded = gzip.compress(padded)

    with ScriptedServer(answer(padded, b"Content-Encoding: " + coding)) as server:
        pol = policy(server.base, max_response_bytes=CAP, timeout_seconds=5.0,
                     budget_seconds=5.0)
        record, report, _ = fetch_all(server.base, pol, only_conditions_missing())
    assert report.outcomes == {"conditions": "fetched"}
    assert record.conditions.state is SourceState.COMPLETE


def test_a_slow_name_lookup_counts_against_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stub resolver (a DNS server cannot be staged on loopback): 5 s for any name."""

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(5)
        return []

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", slow)
    base = "http://fhir.slow-dns.test/fhir"
    record, report, seconds = fetch_all(base, policy(base))
    assert seconds < 0.4 + 0.25, seconds
    assert set(report.outcomes.values()) == {"timeout"}


def test_the_cap_is_the_setting() -> None:
    from cds_service.app import create_app
    from tests.conftest import dev_settings

    app = create_app(dev_settings(fhir_max_response_bytes=12345))
    assert app.state.fetcher.policy.max_response_bytes == 12345
