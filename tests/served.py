"""A real service process on a loopback port, for tests that need a socket."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import ROOT
from tests.test_socket import free_port


@contextmanager
def served(data: Path, **env: str) -> Iterator[str]:
    """`cds-service serve` in development mode with extra CDS_* settings; yields its base URL.

    ``{base}`` in a setting's value is replaced by that URL.
    """
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v.replace("{base}", base) for k, v in env.items()}  # settings naming the address
    full = {**os.environ, "CDS_ENV": "development", "CDS_DATA_DIR": str(data), **env}
    proc = subprocess.Popen([sys.executable, "-m", "cds_service", "serve", "--port", str(port)],
                            cwd=ROOT, env=full, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)
