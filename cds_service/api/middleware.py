"""The ASGI middlewares of the application: the request body limit (413, 408) and the request
counts by route template and status."""

from __future__ import annotations

import asyncio

from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cds_service.api import HOT_ROUTES, router
from cds_service.errors import issue, outcome_response
from cds_service.metrics import Metrics


class BodyLimit:
    """Reject request bodies above the limit with 413 before they are read whole, and bodies
    that do not arrive within the read timeout with 408 (a slow client holds no worker)."""

    def __init__(self, app: ASGIApp, limit: int, read_timeout: float = 10.0):
        self.app = app
        self.limit = limit
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(scope, receive, send)
                    return
        seen = 0
        deadline: float | None = None

        async def limited() -> Message:
            nonlocal seen, deadline
            if deadline is None:  # (asyncio's timeout: a quarter of anyio's cost per call)
                deadline = asyncio.get_running_loop().time() + self.read_timeout
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _TooSlow() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)
        except _TooSlow:
            response = outcome_response(408, [issue(
                "timeout", f"request body not received within {self.read_timeout:g} s")],
                headers={"Connection": "close"})
            await response(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = outcome_response(413, [issue(
            "too-long", f"request body larger than {self.limit} bytes")])
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class CountRequests:
    """Count requests by route template and status (no ids in labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics
        # plain Starlette routes name their endpoint, not themselves, in the scope
        self.templates = {r.endpoint: r.path for r in [*HOT_ROUTES, *router.routes]
                          if isinstance(r, Route)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = getattr(scope.get("route"), "path", None) or self.templates.get(
                scope.get("endpoint"), "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.refresh_audit_queue()  # a hook call queues its audit row


class PageHeaders:
    """Headers every response under a path prefix carries unless it sets them itself (a page's
    CSP, nosniff, no-store): the pages' own, and their errors (404, 405, 413) alike."""

    def __init__(self, app: ASGIApp, rules: list[tuple[str, dict[str, str]]]):
        self.app = app
        self.rules = [(prefix, [(k.lower().encode(), v.encode()) for k, v in headers.items()])
                      for prefix, headers in rules]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        added = next((h for prefix, h in self.rules if path.startswith(prefix)), None)
        if added is None:
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *((k, v) for k, v in added if k not in have)]
            await send(message)

        await self.app(scope, receive, with_headers)
