"""DNS rebinding: the FHIR server's name is resolved once, every address is checked, and the
connection goes to an address that was checked, never to what a second lookup answers.

Real sockets on loopback: server A listens on 127.0.0.1, server B on 127.0.0.2 at the same port,
so a connection made after a second lookup (which the stub answers with B) would reach B. Every
lookup, the fetcher's or any library's (the event loop's getaddrinfo is patched too), goes to
the stub and is counted. No address outside loopback is ever connected to.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import socket
import ssl
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cds_service.app import create_app
from cds_service.record import record_from_prefetch
from cds_service.record.fetch import FetchPolicy, FhirFetcher, PinnedBackend, pinned
from tests.builders import PATIENT, hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient, dev_settings
from tests.fhir_server import TYPES
from tests.loopback import LoopbackServer

NAME = "fhir.rebind.test"  # .test: no real DNS server answers it
TOKEN = "rebind-token-" + "7" * 12
SEED = seed_prefetch(FIXTURE_NOW)
KEYS = list(SEED)
SERVED = {**TYPES, "QuestionnaireResponse": "questionnaireresponses"}  # resource type -> key


class Recorder(LoopbackServer):
    """A FHIR server on ``address`` serving the seed patient's resources; it records each
    request's path and Host header and, over TLS, the name the client sent in SNI."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.hits: list[tuple[str, str | None]] = []
        self.sni: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                outer.hits.append((self.path, self.headers.get("Host")))
                kind = urlsplit(self.path).path.split("/")[2]
                body = json.dumps(SEED["patient"] if kind == "Patient"
                                  else SEED[SERVED[kind]]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        httpd = ThreadingHTTPServer((address, port), Handler)
        httpd.daemon_threads = True
        if tls is not None:
            tls.sni_callback = self._record_sni
            httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
        self._serve(httpd)

    def _record_sni(self, _sock: Any, name: str | None, _ctx: Any) -> None:
        self.sni.append(name)


class Dns:
    """A DNS stub: answers ``answers[0]`` to the first lookup, ``answers[1]`` to the second, and
    so on (the last one ever after); ``None`` fails as an unknown name does. Counts lookups."""

    def __init__(self, *answers: Sequence[str] | None) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def __call__(self, host: str) -> Sequence[str]:
        self.lookups.append(host)
        answer = self.answers[min(len(self.lookups), len(self.answers)) - 1]
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answer


def route_system_lookups(monkeypatch: pytest.MonkeyPatch, dns: Dns) -> None:
    """Any other lookup (httpx or anyio resolving the name again) goes to the stub too."""

    async def getaddrinfo(_loop: Any, host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        answers = await dns(host.decode() if isinstance(host, bytes) else str(host))
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port or 0)) for a in answers]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)


@pytest.fixture
def servers() -> Iterator[tuple[Recorder, Recorder]]:
    """A on 127.0.0.1 and B on 127.0.0.2, on the same port."""
    with Recorder() as a, Recorder("127.0.0.2", a.port) as b:
        yield a, b


def fetch(base: str, dns: Dns, calls: int = 1) -> list[Any]:
    """The reports of ``calls`` hook calls (one fetcher, one pool), every source missing."""
    policy = FetchPolicy(allowed=(base,), require_https=base.startswith("https:"),
                         timeout_seconds=2.0, budget_seconds=3.0)

    async def go() -> list[Any]:
        fetcher = FhirFetcher(policy, resolver=dns)
        try:
            return [await fetcher.complete(record_from_prefetch(None, PATIENT), base, TOKEN)
                    for _ in range(calls)]
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


# ------------------------------------------------------------------ one lookup, pinned


def test_the_connection_goes_to_the_address_checked_not_a_second_answer(
        servers: tuple[Recorder, Recorder], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = servers
    dns = Dns(["127.0.0.1"], ["127.0.0.2"])  # a rebinding server: another answer next time
    route_system_lookups(monkeypatch, dns)
    [report] = fetch(f"http://{NAME}:{a.port}/fhir", dns)
    assert report.outcomes == {k: "fetched" for k in KEYS}
    assert len(a.hits) == len(KEYS)  # one connection a source (the server closes each), all A
    assert b.hits == []
    assert dns.lookups == [NAME]
    assert {host for _, host in a.hits} == {f"{NAME}:{a.port}"}  # the name, not the address


def test_each_call_checks_again_and_its_new_connections_use_its_own_answer(
        servers: tuple[Recorder, Recorder], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = servers
    dns = Dns(["127.0.0.1"], ["127.0.0.2"])
    route_system_lookups(monkeypatch, dns)
    first, second = fetch(f"http://{NAME}:{a.port}/fhir", dns, calls=2)
    assert first.outcomes == second.outcomes == {k: "fetched" for k in KEYS}
    assert (len(a.hits), len(b.hits)) == (len(KEYS), len(KEYS))
    assert dns.lookups == [NAME, NAME]


def test_the_checked_addresses_are_tried_in_order(servers: tuple[Recorder, Recorder],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = servers
    dns = Dns(["127.0.0.3", "127.0.0.1"])  # nothing listens on 127.0.0.3
    route_system_lookups(monkeypatch, dns)
    [report] = fetch(f"http://{NAME}:{a.port}/fhir", dns)
    assert report.outcomes == {k: "fetched" for k in KEYS}
    assert len(a.hits) == len(KEYS) and dns.lookups == [NAME]


def test_an_ip_literal_is_checked_without_a_lookup(servers: tuple[Recorder, Recorder],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = servers
    dns = Dns(None)
    route_system_lookups(monkeypatch, dns)
    [report] = fetch(f"http://127.0.0.1:{a.port}/fhir", dns)
    assert report.outcomes == {k: "fetched" for k in KEYS}
    assert dns.lookups == []


def test_a_pin_is_for_its_host_and_its_call_only(servers: tuple[Recorder, Recorder]) -> None:
    a, _ = servers

    async def go() -> None:
        backend = PinnedBackend()
        with pinned(NAME, ("127.0.0.1",)):
            stream = await backend.connect_tcp(NAME, a.port, timeout=2.0)
            await stream.aclose()
            with pytest.raises(httpcore.ConnectError):
                await backend.connect_tcp("other.rebind.test", a.port, timeout=2.0)
        with pytest.raises(httpcore.ConnectError):  # outside the call that checked it
            await backend.connect_tcp(NAME, a.port, timeout=2.0)

    asyncio.run(go())


# ------------------------------------------------------------------ refused at check time


@pytest.mark.parametrize("first", [
    ["169.254.169.254"],
    ["127.0.0.1", "169.254.169.254"],  # every address is checked, not only the first
    ["::ffff:169.254.169.254"],
    ["fd00:ec2::254"],
    ["fe80::1%eth0"],
    ["224.0.0.1"],
    ["0.0.0.0"],
])
def test_a_forbidden_first_answer_means_no_fetch(servers: tuple[Recorder, Recorder],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 first: list[str]) -> None:
    a, b = servers
    dns = Dns(first, ["127.0.0.1"])
    route_system_lookups(monkeypatch, dns)
    [report] = fetch(f"http://{NAME}:{a.port}/fhir", dns)
    assert set(report.outcomes.values()) == {"unsafe-address"}
    assert a.hits == b.hits == []
    assert dns.lookups == [NAME]


@pytest.mark.parametrize("answer", [None, []])
def test_a_name_that_does_not_resolve_is_not_fetched(servers: tuple[Recorder, Recorder],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture,
                                                     answer: list[str] | None) -> None:
    a, b = servers
    dns = Dns(answer, ["127.0.0.1"])
    route_system_lookups(monkeypatch, dns)
    logging.getLogger("cds_service").propagate = True
    with caplog.at_level("INFO", logger="cds_service"):
        [report] = fetch(f"http://{NAME}:{a.port}/fhir", dns)
    assert set(report.outcomes.values()) == {"unresolvable"}
    assert a.hits == b.hits == []
    assert dns.lookups == [NAME]
    assert [r.getMessage() for r in caplog.records] == [
        "fhirServer name does not resolve; no fetch"]
    assert not any(PATIENT in str(r.__dict__) or TOKEN in str(r.__dict__)
                   for r in caplog.records)


def test_an_unresolvable_name_is_counted_and_answered_with_412(
        servers: tuple[Recorder, Recorder], monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = servers
    base = f"http://{NAME}:{a.port}/fhir"
    body = hook_request(order(cpt="72148"))
    body["fhirServer"] = base
    body["fhirAuthorization"] = {"access_token": TOKEN, "token_type": "Bearer",
                                 "expires_in": 300, "scope": "patient/*.read",
                                 "subject": "cds-service"}
    route_system_lookups(monkeypatch, Dns(None))  # the app's fetcher uses the loop's lookup
    app = create_app(dev_settings(fhir_allowed_servers=base), clock=lambda: FIXTURE_NOW)
    with ValidatingClient(app) as c:
        assert c.post(SELECT, json=body).status_code == 412
        metrics = c.get("/metrics").text
    assert f'cds_fhir_fetch_total{{outcome="unresolvable"}} {len(KEYS)}.0' in metrics
    assert a.hits == []


# ------------------------------------------------------------------ TLS uses the name


def tls_context(folder: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context whose certificate names only ``NAME`` (no IP address), and the file
    of the CA that signed it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rebinding test CA")])

    def certificate(subject: x509.Name, public: Any, ca: bool) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                .public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False))

    ca = (certificate(ca_name, ca_key.public_key(), True)
          .add_extension(x509.KeyUsage(
              digital_signature=True, content_commitment=False, key_encipherment=False,
              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
              encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)]),
                        key.public_key(), False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (folder / "key.pem").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "leaf.pem", folder / "key.pem")
    return context, folder / "ca.pem"


def test_tls_sni_certificate_and_host_use_the_name(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    context, ca_file = tls_context(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the fetcher's client trusts our CA
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    dns = Dns(["127.0.0.1"], ["127.0.0.2"])
    route_system_lookups(monkeypatch, dns)
    with Recorder(tls=context) as server:
        [report] = fetch(f"https://{NAME}:{server.port}/fhir", dns)
    # the certificate names no IP address: it was verified against the name
    assert report.outcomes == {k: "fetched" for k in KEYS}
    assert set(server.sni) == {NAME} and len(server.sni) == len(KEYS)
    assert {host for _, host in server.hits} == {f"{NAME}:{server.port}"}
    assert dns.lookups == [NAME]
