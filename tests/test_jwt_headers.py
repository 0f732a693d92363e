"""Odd JWT headers and key/algorithm mismatches through the HTTP API (production mode).

None of these tokens needs a credential to forge: each must be answered 401, never 5xx.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import get_default_algorithms

from cds_service.app import create_app
from tests.builders import hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient
from tests.test_auth_api import BASE, ISS, METRICS, production_settings

OTHER_ISS = "https://other-ehr.example.org"
EC384 = ec.generate_private_key(ec.SECP384R1())
EC256 = ec.generate_private_key(ec.SECP256R1())
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER = ec.generate_private_key(ec.SECP384R1())
# the attacker's own keys (nothing trusted)
ATT_EC256 = ec.generate_private_key(ec.SECP256R1())
ATT_EC384 = ec.generate_private_key(ec.SECP384R1())
ATT_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    algorithm = jwt.algorithms.ECAlgorithm if isinstance(key, ec.EllipticCurvePrivateKey) \
        else jwt.algorithms.RSAAlgorithm
    data: dict[str, Any] = json.loads(algorithm.to_jwk(key.public_key()))
    data.update(kid=kid, use="sig")
    if alg:
        data["alg"] = alg
    return data


ISSUERS = [
    {"iss": ISS, "jwks": {"keys": [
        public_jwk(EC384, "ec384", "ES384"),  # declares its algorithm
        public_jwk(EC256, "ec256"),  # does not: the curve says ES256
        public_jwk(RSA, "rsa-alg", "RS384"),
        public_jwk(RSA, "rsa-noalg"),  # any RSA algorithm (RS*, PS*)
    ]}},
    {"iss": OTHER_ISS, "jwks": {"keys": [public_jwk(OTHER, "other-1", "ES384")]}},
]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    payload = {"iss": ISS, "aud": BASE + SELECT, "iat": now, "exp": now + 300,
               "jti": str(uuid.uuid4())}
    payload.update(changes)
    return payload


def signed(key: Any, alg: str, kid: Any = None, **changes: Any) -> str:
    """A token signed by ``key`` with ``alg``; ``kid`` may be anything (even not a string)."""
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return forged(header, claims(**changes), key)


def forged(header: Any, payload: Any, key: Any = None) -> str:
    """A token built by hand (PyJWT refuses to encode most of these)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b""
    alg = header.get("alg") if isinstance(header, dict) else None
    if key is not None and isinstance(alg, str):
        signature = get_default_algorithms()[alg].sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def hs256_keyed_with(secret: bytes, kid: str) -> str:
    """The classic confusion: an HMAC keyed with the RSA public key's published bytes."""
    signing_input = (f"{b64(json.dumps({'alg': 'HS256', 'kid': kid}).encode())}."
                     f"{b64(json.dumps(claims()).encode())}")
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


RSA_PEM = RSA.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)

REFUSED: dict[str, Any] = {
    # a key of one type named by a token of another: PyJWT raised TypeError (500)
    "ES256 with the kid of an RSA key that declares RS384": lambda: signed(
        ATT_EC256, "ES256", "rsa-alg"),
    "ES256 with the kid of an RSA key without alg": lambda: signed(
        ATT_EC256, "ES256", "rsa-noalg"),
    "ES384 with the kid of an RSA key": lambda: signed(ATT_EC384, "ES384", "rsa-noalg"),
    "RS256 with the kid of an EC key": lambda: signed(ATT_RSA, "RS256", "ec384"),
    "PS256 with the kid of an EC key without alg": lambda: signed(ATT_RSA, "PS256", "ec256"),
    "RS384 with the kid of an EC key": lambda: signed(ATT_RSA, "RS384", "ec256"),
    # right key type, wrong curve
    "ES256 with the kid of a P-384 key": lambda: signed(ATT_EC256, "ES256", "ec384"),
    "ES384 with the kid of a P-256 key": lambda: signed(ATT_EC384, "ES384", "ec256"),
    # unsigned and symmetric
    "alg none": lambda: forged({"alg": "none", "kid": "ec384"}, claims()),
    "alg None": lambda: forged({"alg": "None", "kid": "ec384"}, claims()),
    "HS256 keyed with the RSA public key PEM": lambda: hs256_keyed_with(RSA_PEM, "rsa-alg"),
    "HS256 keyed with the RSA public key PEM, kid without alg": lambda: hs256_keyed_with(
        RSA_PEM, "rsa-noalg"),
    # kid problems
    "missing kid": lambda: signed(ATT_EC384, "ES384", None),
    "kid of another trusted issuer": lambda: signed(OTHER, "ES384", "other-1"),
    "kid unknown": lambda: signed(ATT_EC384, "ES384", "rotated"),
    "kid empty": lambda: signed(ATT_EC384, "ES384", ""),
    "kid a number": lambda: signed(ATT_EC384, "ES384", 5),
    "kid a list": lambda: signed(ATT_EC384, "ES384", ["ec384"]),
    "kid an object": lambda: signed(ATT_EC384, "ES384", {"kid": "ec384"}),
    "kid true": lambda: signed(ATT_EC384, "ES384", True),
    # odd algorithm values
    "alg a list": lambda: forged({"alg": ["ES384"], "kid": "ec384"}, claims()),
    "alg a number": lambda: forged({"alg": 256, "kid": "ec384"}, claims()),
    "alg missing": lambda: forged({"kid": "ec384"}, claims()),
    "alg not accepted (ES512)": lambda: signed(
        ec.generate_private_key(ec.SECP521R1()), "ES512", "ec384"),
    # odd issuers (an unhashable iss raised TypeError)
    "iss a list": lambda: signed(ATT_EC384, "ES384", "ec384", iss=[ISS]),
    "iss an object": lambda: signed(ATT_EC384, "ES384", "ec384", iss={"iss": ISS}),
    "iss a number": lambda: signed(ATT_EC384, "ES384", "ec384", iss=7),
    # keys offered by the token itself are never used
    "embedded jwk": lambda: forged(
        {"alg": "ES384", "kid": "ec384", "jwk": public_jwk(ATT_EC384, "ec384")}, claims(),
        ATT_EC384),
    "jku of the attacker": lambda: forged(
        {"alg": "ES384", "kid": "ec384", "jku": "https://attacker.example/jwks"}, claims(),
        ATT_EC384),
    # malformed structure
    "unknown critical extension": lambda: forged(
        {"alg": "ES384", "kid": "ec384", "crit": ["x-never"], "x-never": 1}, claims(), EC384),
    "header a JSON list": lambda: forged(["ES384"], claims()),
    "payload a JSON list": lambda: forged({"alg": "ES384", "kid": "ec384"}, [claims()],
                                          EC384),
    "payload a string": lambda: forged({"alg": "ES384", "kid": "ec384"}, "x", EC384),
    "two segments": lambda: "e30.e30",
    "not base64": lambda: "%%%.%%%.%%%",
}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValidatingClient]:
    tmp = tmp_path_factory.mktemp("headers")
    app = create_app(production_settings(tmp, ISSUERS), clock=lambda: FIXTURE_NOW)
    with ValidatingClient(app, raise_server_exceptions=False) as client:
        yield client


def call(api: ValidatingClient, token: str) -> Any:
    body = hook_request(order(), prefetch=seed_prefetch(FIXTURE_NOW))
    return api.post(SELECT, json=body, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_odd_token_is_401_never_5xx(api: ValidatingClient, case: str) -> None:
    response = call(api, REFUSED[case]())
    assert response.status_code == 401, (case, response.text)
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["issue"][0]["diagnostics"] == "authentication failed"


def test_odd_tokens_on_discovery_and_feedback(api: ValidatingClient) -> None:
    for case in ("ES256 with the kid of an RSA key without alg", "iss a list"):
        assert api.get("/cds-services", headers={
            "Authorization": f"Bearer {REFUSED[case]()}"}).status_code == 401
        feedback = {"feedback": [{"card": "c", "outcome": "overridden",
                                  "outcomeTimestamp": "2026-11-01T00:00:00Z"}]}
        assert api.post(SELECT + "/feedback", json=feedback, headers={
            "Authorization": f"Bearer {REFUSED[case]()}"}).status_code == 401


@pytest.mark.parametrize(("key", "alg", "kid"), [
    (EC384, "ES384", "ec384"),
    (EC256, "ES256", "ec256"),  # no alg in the JWK: the curve decides
    (RSA, "RS384", "rsa-alg"),
    (RSA, "RS256", "rsa-noalg"),  # no alg in the JWK: any RSA algorithm
    (RSA, "PS512", "rsa-noalg"),
])
def test_genuine_tokens_are_accepted(api: ValidatingClient, key: Any, alg: str,
                                     kid: str) -> None:
    assert call(api, signed(key, alg, kid)).status_code == 200


def test_genuine_key_with_another_algorithm_than_its_jwk_declares(
        api: ValidatingClient) -> None:
    """The JWK says RS384: an RS256 or PS384 signature by the same key is refused."""
    assert call(api, signed(RSA, "RS256", "rsa-alg")).status_code == 401
    assert call(api, signed(RSA, "PS384", "rsa-alg")).status_code == 401
    assert call(api, signed(EC384, "ES384", "ec384", iss=OTHER_ISS)).status_code == 401


def test_no_odd_token_causes_a_5xx(api: ValidatingClient) -> None:
    for case in sorted(REFUSED):
        call(api, REFUSED[case]())
    metrics = api.get("/metrics", headers=METRICS)
    assert metrics.status_code == 200
    assert 'status="401"' in metrics.text
    assert 'status="5' not in metrics.text
