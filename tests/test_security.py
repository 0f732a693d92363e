"""JWT verification: accepted and refused tokens, JWKS by URL over a real loopback server."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cds_service.security import (
    AuthError,
    JwtVerifier,
    TrustedIssuer,
    bearer_token,
    load_trusted_issuers,
)
from cds_service.settings import Settings
from tests.loopback import LoopbackServer

ISS = "https://ehr.example.org"
AUD = "https://cds.example.org/cds-services/lbp-imaging-order-select"
EC_KEY = ec.generate_private_key(ec.SECP384R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_EC = ec.generate_private_key(ec.SECP384R1())


def jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    else:
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    data.update(kid=kid, alg=alg, use="sig")
    return data


JWKS = {"keys": [jwk(EC_KEY, "ec1", "ES384"), jwk(RSA_KEY, "rsa1", "RS384")]}


def make(key: Any = EC_KEY, alg: str = "ES384", kid: str | None = "ec1",
         headers: dict[str, Any] | None = None, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    hdr = dict(headers or {})
    if kid is not None:
        hdr["kid"] = kid
    return jwt.encode(payload, key, algorithm=alg, headers=hdr)


def verifier(issuers: list[TrustedIssuer] | None = None, **settings: Any) -> JwtVerifier:
    return JwtVerifier(issuers or [TrustedIssuer(ISS, jwks=JWKS)],
                       Settings(env="production", **settings))


def verify(v: JwtVerifier, token: str, audience: str = AUD) -> dict[str, Any]:
    return asyncio.run(v.verify(token, audience))


def refused(v: JwtVerifier, token: str, audience: str = AUD) -> str:
    with pytest.raises(AuthError) as err:
        verify(v, token, audience)
    return str(err.value)


def test_es384_and_rs384_are_accepted() -> None:
    v = verifier()
    assert verify(v, make())["iss"] == ISS
    assert verify(v, make(RSA_KEY, "RS384", "rsa1"))["iss"] == ISS


def test_hs256_is_refused_even_with_a_published_secret() -> None:
    secret = b"s" * 32
    oct_key = {"kty": "oct", "kid": "hs", "k": base64.urlsafe_b64encode(secret).decode()}
    v = verifier([TrustedIssuer(ISS, jwks={"keys": [*JWKS["keys"], oct_key]})],
                 jwt_algorithms="HS256,ES384")
    assert "algorithm" in refused(v, make(secret, "HS256", "hs"))


def test_alg_none_is_refused() -> None:
    header = base64.urlsafe_b64encode(json.dumps(
        {"alg": "none", "kid": "ec1", "typ": "JWT"}).encode()).rstrip(b"=")
    now = int(time.time())
    body = base64.urlsafe_b64encode(json.dumps(
        {"iss": ISS, "aud": AUD, "iat": now, "exp": now + 60, "jti": "x"}).encode()).rstrip(b"=")
    assert "algorithm" in refused(verifier(), f"{header.decode()}.{body.decode()}.")


@pytest.mark.parametrize(("claims", "reason"), [
    ({"aud": "https://cds.example.org/cds-services/other"}, "InvalidAudience"),
    ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 3900}, "Expired"),
    ({"iat": int(time.time()) + 900, "exp": int(time.time()) + 1000}, ""),
    ({"exp": int(time.time()) + 7200}, "lifetime"),
    ({"jti": None}, "MissingRequiredClaim"),
    ({"exp": None}, "MissingRequiredClaim"),
    ({"iss": "https://attacker.example"}, "issuer not trusted"),
])
def test_bad_claims_are_refused(claims: dict[str, Any], reason: str) -> None:
    assert reason in refused(verifier(), make(**claims))


def test_replayed_jti_is_refused() -> None:
    v = verifier()
    token = make()
    verify(v, token)
    assert "replayed" in refused(v, token)


def test_unknown_or_missing_kid_is_refused() -> None:
    assert "unknown kid" in refused(verifier(), make(kid="nope"))
    assert "no kid" in refused(verifier(), make(kid=None))


@pytest.mark.parametrize(("key", "alg", "kid"), [
    (ec.generate_private_key(ec.SECP256R1()), "ES256", "rsa1"),  # was a TypeError (500)
    (OTHER_EC, "ES384", "rsa1"),
    (RSA_KEY, "RS256", "ec1"),
    (RSA_KEY, "PS384", "ec1"),
    (RSA_KEY, "RS256", "rsa1"),  # the JWK declares RS384
    (ec.generate_private_key(ec.SECP256R1()), "ES256", "ec1"),  # a P-384 key
])
def test_key_that_does_not_fit_the_algorithm_is_refused(key: Any, alg: str, kid: str) -> None:
    assert refused(verifier(jwt_algorithms="ES256,ES384,RS256,RS384,PS384"), make(key, alg, kid))


def test_jwks_without_usable_keys_is_empty() -> None:
    v = verifier([TrustedIssuer(ISS, jwks={"keys": [
        5, {"kid": 7, **jwk(EC_KEY, "x", "ES384")}, {**jwk(EC_KEY, "enc", "ES384"), "use": "enc"},
        {**jwk(EC_KEY, "hs", "ES384"), "alg": "HS256"}, {"kid": "bad", "kty": "EC", "crv": "P-9"},
    ]})])
    for kid in ("7", "enc", "hs", "bad"):
        assert "unknown kid" in refused(v, make(kid=kid))


def test_signature_by_another_key_with_the_same_kid_is_refused() -> None:
    assert "InvalidSignature" in refused(verifier(), make(OTHER_EC, "ES384", "ec1"))


def test_tenant_must_be_listed() -> None:
    v = verifier([TrustedIssuer(ISS, jwks=JWKS, tenants=["t-1"])])
    assert verify(v, make(tenant="t-1"))["tenant"] == "t-1"
    assert "tenant" in refused(v, make(tenant="t-2"))
    assert "tenant" in refused(v, make())


class JwksServer(LoopbackServer):
    """A real HTTP server on loopback serving a JWKS and counting requests."""

    def __init__(self, jwks: dict[str, Any]):
        self.jwks = jwks
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                outer.hits += 1
                raw = json.dumps(outer.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._serve(self.httpd)
        self.url = f"http://127.0.0.1:{self.port}/jwks.json"
        self.thread.start()

    def close(self) -> None:
        self.__exit__()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer(JWKS)
    yield server
    server.close()


def test_jwks_url_is_fetched_once_and_cached(jwks_server: JwksServer) -> None:
    v = verifier([TrustedIssuer(ISS, jwks_url=jwks_server.url)])

    async def twice() -> None:
        await v.verify(make(), AUD)
        await v.verify(make(RSA_KEY, "RS384", "rsa1"), AUD)

    asyncio.run(twice())
    assert jwks_server.hits == 1


def test_unknown_kid_refetch_is_rate_limited(jwks_server: JwksServer) -> None:
    v = verifier([TrustedIssuer(ISS, jwks_url=jwks_server.url)])

    async def run() -> list[str]:
        await v.verify(make(), AUD)
        errors = []
        for _ in range(5):
            try:
                await v.verify(make(kid="rotated"), AUD)
            except AuthError as exc:
                errors.append(str(exc))
        return errors

    assert asyncio.run(run()) == ["unknown kid"] * 5
    assert jwks_server.hits == 1  # the first fetch is under 30 s old: no refetch storm


def test_jku_header_is_never_fetched(jwks_server: JwksServer) -> None:
    attacker = JwksServer({"keys": [jwk(OTHER_EC, "evil", "ES384")]})
    try:
        v = verifier([TrustedIssuer(ISS, jwks_url=jwks_server.url)])
        token = make(OTHER_EC, "ES384", "evil", headers={"jku": attacker.url})
        assert "unknown kid" in refused(v, token)
        assert attacker.hits == 0
    finally:
        attacker.close()


def test_trusted_issuer_file(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"iss": ISS, "jwks": JWKS, "tenants": ["a"]},
                                {"iss": "https://b.example", "jwks_url": "https://b.example/k"}]))
    issuers = load_trusted_issuers(good)
    assert [i.iss for i in issuers] == [ISS, "https://b.example"]
    assert issuers[0].tenants == ["a"]
    cases = {
        "missing.json": None,
        "notjson.json": "{",
        "object.json": json.dumps({"iss": ISS}),
        "noiss.json": json.dumps([{"jwks": JWKS}]),
        "nokeys.json": json.dumps([{"iss": ISS}]),
        "badurl.json": json.dumps([{"iss": ISS, "jwks_url": "ftp://x"}]),
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ValueError):
            load_trusted_issuers(path)


def test_bearer_header_parsing() -> None:
    assert bearer_token(None) is None
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token("bearer   abc") == "abc"
    for bad in ("Basic abc", "Bearer", "Bearer ", "abc"):
        with pytest.raises(AuthError):
            bearer_token(bad)
