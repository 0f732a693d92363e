"""JWKS by URL: one shared client, back-off after failures, https only outside development.

The JWKS is served by a real HTTPS server on loopback (its certificate is signed by a CA made
here and trusted through SSL_CERT_FILE) that counts requests and connections.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cds_service.app import ConfigurationError, create_app
from cds_service.security import AuthError, JwtVerifier, TrustedIssuer
from cds_service.services import check_production
from cds_service.settings import Settings
from tests.builders import hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient
from tests.loopback import LoopbackServer
from tests.test_auth_api import BASE, ISS, KID, production_settings

KEY = ec.generate_private_key(ec.SECP384R1())
ATTACKER = ec.generate_private_key(ec.SECP384R1())
PUBLIC = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key())),
          "kid": KID, "alg": "ES384", "use": "sig"}
JWKS = {"keys": [PUBLIC]}


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwks test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=True, content_commitment=False, key_encipherment=False,
              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
              encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_file, cert_file, key_file


class JwksServer(LoopbackServer):
    """An HTTPS JWKS endpoint on loopback; ``mode`` says how it answers."""

    def __init__(self, folder: Path, mode: str = "ok", delay: float = 0.0):
        self.mode = mode
        self.delay = delay
        self.hits = 0
        self.connections = 0
        ca, cert, key = _certificates(folder)
        self.ca_file = ca
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse can be seen

            def setup(self) -> None:
                outer.connections += 1
                super().setup()

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                outer.hits += 1
                if outer.delay:
                    time.sleep(outer.delay)
                status, body, headers = outer.answer()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self._serve(self.httpd)
        self.url = f"https://127.0.0.1:{self.port}/jwks.json"
        self.thread.start()

    def answer(self) -> tuple[int, bytes, dict[str, str]]:
        json_type = {"Content-Type": "application/json"}
        return {
            "ok": (200, json.dumps(JWKS).encode(), json_type),
            "fail": (503, b"down", {}),
            "list": (200, json.dumps([PUBLIC]).encode(), json_type),
            "keys-not-list": (200, b'{"keys": 5}', json_type),
            "bad-keys": (200, json.dumps({"keys": [
                5, "x", {"kid": 1, "kty": "EC"}, {"kid": KID, "kty": "EC", "crv": "P-999"},
                {"kid": KID, "kty": "RSA", "n": "AQAB"}, {"kid": KID}]}).encode(), json_type),
            "not-json": (200, b"<html>", {"Content-Type": "text/html"}),
            "redirect": (302, b"", {"Location": "https://attacker.example/jwks"}),
        }[self.mode]

    def close(self) -> None:
        self.__exit__()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[JwksServer]:
    srv = JwksServer(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(srv.ca_file))  # httpx trusts our CA
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    yield srv
    srv.close()


def token(key: Any = KEY, kid: str = KID) -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISS, "aud": BASE + SELECT, "iat": now, "exp": now + 300,
                       "jti": str(uuid.uuid4())}, key, algorithm="ES384", headers={"kid": kid})


def call(client: ValidatingClient, bearer: str) -> int:
    body = hook_request(order(), prefetch=seed_prefetch(FIXTURE_NOW))
    return client.post(SELECT, json=body,
                       headers={"Authorization": f"Bearer {bearer}"}).status_code


def app_for(tmp_path: Path, server: JwksServer, **settings: Any) -> Any:
    return create_app(production_settings(
        tmp_path, [{"iss": ISS, "jwks_url": server.url}], **settings),
        clock=lambda: FIXTURE_NOW)


def test_forged_tokens_do_not_hammer_a_failing_jwks(tmp_path: Path, server: JwksServer) -> None:
    server.mode = "fail"
    with ValidatingClient(app_for(tmp_path, server), raise_server_exceptions=False) as client:
        started = time.monotonic()
        statuses = [call(client, token(ATTACKER, kid=f"k{i % 3}")) for i in range(200)]
        elapsed = time.monotonic() - started
    assert statuses == [401] * 200
    # 1 s, then 2 s, 4 s... between attempts: at most one fetch per doubling of the time spent
    assert server.hits <= 2 + int(elapsed).bit_length(), (server.hits, elapsed)


def test_fetching_resumes_after_the_back_off(tmp_path: Path, server: JwksServer) -> None:
    server.mode = "fail"
    app = app_for(tmp_path, server, jwks_retry_min_seconds=0.2)
    with ValidatingClient(app) as client:
        assert call(client, token()) == 401
        assert server.hits == 1
        server.mode = "ok"
        assert call(client, token()) == 401  # still backing off: no fetch yet
        assert server.hits == 1
        time.sleep(0.25)
        assert call(client, token()) == 200
        assert server.hits == 2
        assert call(client, token()) == 200  # cached
        assert server.hits == 2


def test_one_client_shared_by_every_fetch_and_closed_at_shutdown(
        tmp_path: Path, server: JwksServer) -> None:
    app = app_for(tmp_path, server, jwks_cache_seconds=0)  # every call refetches
    with ValidatingClient(app) as client:
        assert [call(client, token()) for _ in range(5)] == [200] * 5
        http = app.state.verifier.http
        assert http is not None and not http.is_closed
    assert server.hits == 5
    assert server.connections == 1  # one client, one kept-alive connection
    assert http.is_closed


@pytest.mark.parametrize("mode", ["list", "keys-not-list", "bad-keys", "not-json", "redirect",
                                  "fail"])
def test_malformed_or_failing_jwks_is_401(tmp_path: Path, server: JwksServer,
                                          mode: str) -> None:
    server.mode = mode
    with ValidatingClient(app_for(tmp_path, server), raise_server_exceptions=False) as client:
        assert [call(client, token()) for _ in range(3)] == [401] * 3
    assert server.hits == 1  # a bad document counts as a failure: backed off


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_concurrent_calls_share_one_fetch(server: JwksServer) -> None:
    server.mode, server.delay = "fail", 0.3
    verifier = JwtVerifier([TrustedIssuer(ISS, jwks_url=server.url)],
                           Settings(env="production"))

    async def many() -> list[BaseException | dict[str, Any]]:
        try:
            return await asyncio.gather(*(verifier.verify(token(ATTACKER), BASE + SELECT)
                                          for _ in range(20)), return_exceptions=True)
        finally:
            await verifier.aclose()

    results = asyncio.run(many())
    assert all(isinstance(r, AuthError) for r in results)
    assert server.hits == 1


def test_held_keys_serve_while_a_stale_jwks_is_refetched(server: JwksServer) -> None:
    clock = FakeClock()
    verifier = JwtVerifier([TrustedIssuer(ISS, jwks_url=server.url)],
                           Settings(env="production", jwks_cache_seconds=60), clock=clock)

    async def scenario() -> None:
        await verifier.verify(token(), BASE + SELECT)
        clock.now += 61  # stale: the next call refetches, slowly
        server.delay = 0.5
        refresh = asyncio.create_task(verifier.verify(token(), BASE + SELECT))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await verifier.verify(token(), BASE + SELECT)  # does not queue behind the refresh
        assert time.monotonic() - started < 0.3
        await refresh
        await verifier.aclose()

    asyncio.run(scenario())
    assert server.hits == 2


def test_verifier_survives_a_new_event_loop(server: JwksServer) -> None:
    """A TestClient without ``with`` runs each request on a new loop: the client is remade."""
    verifier = JwtVerifier([TrustedIssuer(ISS, jwks_url=server.url)],
                           Settings(env="production", jwks_cache_seconds=0))
    for _ in range(3):
        assert asyncio.run(verifier.verify(token(), BASE + SELECT))["iss"] == ISS
    assert server.hits == 3

    async def closed_then_used() -> None:  # an application stopped and started again
        await verifier.verify(token(), BASE + SELECT)
        await verifier.aclose()
        await verifier.verify(token(), BASE + SELECT)
        await verifier.aclose()

    asyncio.run(closed_then_used())
    assert server.hits == 5


def test_back_off_doubles_up_to_the_cap_and_success_resets_it(server: JwksServer) -> None:
    server.mode = "fail"
    clock = FakeClock()
    verifier = JwtVerifier([TrustedIssuer(ISS, jwks_url=server.url)],
                           Settings(env="production", jwks_retry_min_seconds=1,
                                    jwks_retry_max_seconds=8, jwks_cache_seconds=20),
                           clock=clock)

    async def attempt(at: float, key: Any = ATTACKER) -> bool:
        clock.now = 1000.0 + at
        try:
            await verifier.verify(token(key), BASE + SELECT)
            return True
        except AuthError:
            return False

    async def scenario() -> list[int]:
        hits = []
        # failed fetches at 0, 1, 3, 7, 15, 23: 1 s doubling, capped at 8 s
        for at in (0, 0.5, 0.99, 1.0, 2.9, 3.0, 6.9, 7.0, 14.9, 15.0, 22.9, 23.0):
            await attempt(at)
            hits.append(server.hits)
        server.mode = "ok"
        assert await attempt(31.0, KEY)  # the next fetch succeeds and resets the back-off
        hits.append(server.hits)
        server.mode = "fail"
        assert await attempt(52.0, KEY)  # stale: refetch fails, the keys we had still work
        await attempt(52.5)
        await attempt(53.0)  # 1 s again after the success
        hits.append(server.hits)
        await verifier.aclose()
        return hits

    assert asyncio.run(scenario()) == [1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7, 9]


def test_http_jwks_url_refused_outside_development(tmp_path: Path) -> None:
    issuers = [{"iss": ISS, "jwks": JWKS},
               {"iss": "https://plain.example", "jwks_url": "http://plain.example/jwks"}]
    for env in ("production", "test"):
        settings = production_settings(tmp_path, issuers, env=env)
        with pytest.raises(ConfigurationError, match="https://plain.example"):
            check_production(settings)
        with pytest.raises(ConfigurationError, match="https://plain.example"):
            create_app(settings)
    create_app(production_settings(tmp_path, issuers, env="development"))  # allowed there
