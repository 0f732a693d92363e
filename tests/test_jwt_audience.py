"""The JWT audience comes from CDS_PUBLIC_BASE_URL outside development, never the Host header."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cds_service.app import ConfigurationError, create_app
from cds_service.services import check_production
from tests.builders import hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, SELECT, ValidatingClient
from tests.test_auth_api import BASE, ISS, KID, production_settings

KEY = ec.generate_private_key(ec.SECP384R1())
PUBLIC = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key())),
          "kid": KID, "alg": "ES384", "use": "sig"}
ISSUERS = [{"iss": ISS, "jwks": {"keys": [PUBLIC]}}]
FORGED_HOST = "attacker.example"


def token(aud: str) -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISS, "aud": aud, "iat": now, "exp": now + 300,
                       "jti": str(uuid.uuid4())}, KEY, algorithm="ES384", headers={"kid": KID})


def call(client: ValidatingClient, aud: str, host: str = FORGED_HOST) -> Any:
    body = hook_request(order(), prefetch=seed_prefetch(FIXTURE_NOW))
    return client.post(SELECT, json=body, headers={
        "Authorization": f"Bearer {token(aud)}", "Host": host})


@pytest.mark.parametrize("env", ["production", "test"])
def test_refuses_to_start_without_public_base_url(tmp_path: Path, env: str) -> None:
    settings = production_settings(tmp_path, ISSUERS, env=env, public_base_url=None)
    with pytest.raises(ConfigurationError, match="CDS_PUBLIC_BASE_URL"):
        check_production(settings)  # what `cds-service serve` runs before any worker
    with pytest.raises(ConfigurationError, match="CDS_PUBLIC_BASE_URL"):
        create_app(settings)


@pytest.mark.parametrize("url", ["http://cds.example.org", "cds.example.org",
                                 "https://", "https://cds.example.org/?x=1",
                                 "https://cds.example.org/#top"])
def test_public_base_url_must_be_a_plain_https_url(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigurationError, match="CDS_PUBLIC_BASE_URL"):
        check_production(production_settings(tmp_path, ISSUERS, public_base_url=url))


def test_token_for_a_forged_host_is_refused(tmp_path: Path) -> None:
    app = create_app(production_settings(tmp_path, ISSUERS), clock=lambda: FIXTURE_NOW)
    with ValidatingClient(app) as client:
        for scheme in ("http", "https"):
            assert call(client, f"{scheme}://{FORGED_HOST}{SELECT}").status_code == 401
        assert call(client, f"http://testserver{SELECT}", "testserver").status_code == 401
        # the configured URL is the audience whatever Host says
        assert call(client, BASE + SELECT).status_code == 200
        assert call(client, BASE + SELECT, "cds.example.org").status_code == 200


def test_audience_never_comes_from_the_host_header_outside_development(
        tmp_path: Path) -> None:
    """Even if the base URL went missing after start-up, Host does not become the audience."""
    settings = production_settings(tmp_path, ISSUERS)
    app = create_app(settings, clock=lambda: FIXTURE_NOW)
    settings.public_base_url = None
    with ValidatingClient(app) as client:
        assert call(client, f"http://{FORGED_HOST}{SELECT}").status_code == 401
        assert call(client, BASE + SELECT).status_code == 401


def test_development_mode_checks_the_url_called(tmp_path: Path) -> None:
    settings = production_settings(tmp_path, ISSUERS, env="development", public_base_url=None)
    app = create_app(settings, clock=lambda: FIXTURE_NOW)
    with ValidatingClient(app) as client:
        assert call(client, f"http://localhost:8080{SELECT}", "localhost:8080").status_code == 200
        assert call(client, BASE + SELECT, "localhost:8080").status_code == 401
