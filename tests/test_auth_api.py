"""JWT checks through the HTTP API (production mode, a trusted issuer with a static JWKS)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cds_service.app import create_app
from cds_service.settings import Settings
from tests.builders import hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient

ISS = "https://ehr.example.org"
KID = "ehr-key-1"
BASE = "https://cds.example.org"
METRICS = {"Authorization": "Bearer metrics-token"}  # /metrics needs a token in production


def production_settings(tmp_path: Path, issuers: list[dict[str, Any]],
                        **overrides: Any) -> Settings:
    """Production settings trusting ``issuers`` (written to a trusted-issuer file)."""
    path = tmp_path / "issuers.json"
    path.write_text(json.dumps(issuers))
    values: dict[str, Any] = {"env": "production", "trusted_issuers_file": path,
                              "public_base_url": BASE, "audit_hash_key": "k" * 32,
                              "data_dir": tmp_path, "metrics_token": "metrics-token"}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def api(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> Iterator[ValidatingClient]:
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    public.update(kid=KID, use="sig", alg="ES384")
    settings = production_settings(tmp_path, [{"iss": ISS, "jwks": {"keys": [public]}}])
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
        yield c


def token(key: ec.EllipticCurvePrivateKey, path: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISS, "aud": f"https://cds.example.org{path}", "iat": now,
               "exp": now + 300, "jti": str(uuid.uuid4()), **claims}
    return jwt.encode(payload, key, algorithm="ES384", headers={"kid": KID})


def test_missing_token_is_401_without_detail(api: ValidatingClient) -> None:
    r = api.post(SELECT, json=hook_request(order(), prefetch=seed_prefetch(FIXTURE_NOW)))
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["issue"][0]["diagnostics"] == "authentication failed"


def test_valid_token_is_accepted_and_replay_refused(api: ValidatingClient,
                                                   key: ec.EllipticCurvePrivateKey) -> None:
    t = token(key, SELECT)
    body = hook_request(order(), prefetch=seed_prefetch(FIXTURE_NOW))
    r = api.post(SELECT, json=body, headers={"Authorization": f"Bearer {t}"})
    assert r.status_code == 200 and r.json()["cards"]
    again = api.post(SELECT, json=body, headers={"Authorization": f"Bearer {t}"})
    assert again.status_code == 401


def test_audience_is_the_exact_url_called(api: ValidatingClient,
                                          key: ec.EllipticCurvePrivateKey) -> None:
    t = token(key, "/cds-services/lbp-imaging-order-sign")  # another service's URL
    r = api.post(SELECT, json=hook_request(order()), headers={"Authorization": f"Bearer {t}"})
    assert r.status_code == 401


def test_discovery_and_feedback_need_a_token_too(api: ValidatingClient,
                                                 key: ec.EllipticCurvePrivateKey) -> None:
    assert api.get("/cds-services").status_code == 401
    ok = api.get("/cds-services",
                 headers={"Authorization": f"Bearer {token(key, '/cds-services')}"})
    assert ok.status_code == 200
    fb = {"feedback": [{"card": "c", "outcome": "overridden",
                        "outcomeTimestamp": "2026-11-01T00:00:00Z"}]}
    assert api.post(SELECT + "/feedback", json=fb).status_code == 401
    t = token(key, SELECT + "/feedback")
    assert api.post(SELECT + "/feedback", json=fb,
                    headers={"Authorization": f"Bearer {t}"}).status_code == 200


def test_malformed_authorization_header(api: ValidatingClient) -> None:
    for header in ("Basic abc", "Bearer", "Bearer not.a.jwt"):
        r = api.post(SELECT, json=hook_request(order()), headers={"Authorization": header})
        assert r.status_code == 401, header


def test_health_needs_no_token(api: ValidatingClient) -> None:
    assert api.get("/healthz").status_code == 200


def test_replay_is_refused_by_another_replica(tmp_path: Path,
                                              key: ec.EllipticCurvePrivateKey) -> None:
    """Two instances sharing one database: a token used on one is refused by the other."""
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    public.update(kid=KID, use="sig", alg="ES384")
    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps([{"iss": ISS, "jwks": {"keys": [public]}}]))
    shared = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"

    def replica() -> ValidatingClient:
        return ValidatingClient(create_app(Settings(
            env="production", trusted_issuers_file=issuers, audit_hash_key="k" * 32,
            public_base_url="https://cds.example.org", database_url=shared, data_dir=tmp_path),
            clock=lambda: FIXTURE_NOW))

    t = token(key, SELECT)
    body = hook_request(order(), prefetch=seed_prefetch(FIXTURE_NOW))
    with replica() as a, replica() as b:
        assert a.post(SELECT, json=body, headers={"Authorization": f"Bearer {t}"}
                      ).status_code == 200
        assert b.post(SELECT, json=body, headers={"Authorization": f"Bearer {t}"}
                      ).status_code == 401
