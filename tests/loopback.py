"""A test server on a loopback port, served from a daemon thread, used as a context manager."""

from __future__ import annotations

import socketserver
import threading
from typing import Any, Self


class LoopbackServer:
    """Base of the tests' own servers: call :meth:`_serve` with the bound server in __init__."""

    server: socketserver.BaseServer

    def _serve(self, server: socketserver.BaseServer) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)

    @property
    def port(self) -> int:
        address: Any = self.server.server_address
        return int(address[1])

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
