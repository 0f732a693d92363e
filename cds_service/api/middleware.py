"""The application's outer layer (:class:`Edge`): the request body limit (413, 408), the
headers of the pages, the request counts by route template and status, and the hook call served
directly, without the framework's inner layers.

One layer rather than one per job: each ASGI layer is a coroutine and a ``send`` wrapper on every
request, and the hook call is nearly all of the traffic. ``create_app`` puts it outside the
framework's own stack (:class:`cds_service.app.CdsApi`), behind the CORS layer only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cds_service.api import HOT_ROUTES, router
from cds_service.errors import ProtocolError, error_response
from cds_service.metrics import Metrics

Endpoint = Callable[[Request], Awaitable[Response]]


class Edge:
    """Every HTTP request passes here once:

    - a body declared (Content-Length) or found larger than ``limit`` is answered 413 before it
      is read whole, one that does not arrive within ``read_timeout`` 408 (a slow client holds
      no worker); a body found too large while read is raised as a ProtocolError, which the
      routes answer as any client error;
    - a response under a path prefix of ``page_rules`` carries that rule's headers unless it
      sets them itself (a page's CSP, nosniff, no-store), on its errors too;
    - each request is counted by route template and status (no ids in labels);
    - a POST matching one of ``routes`` (the hook call and its feedback) is served here, as the
      router would serve it: ProtocolError as its OperationOutcome, any other error as the
      application's 500 (then raised on to the server, which logs it).
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, limit: int, read_timeout: float,
                 page_rules: Sequence[tuple[str, dict[str, str]]] = (),
                 routes: Sequence[Route] = HOT_ROUTES,
                 unexpected: Callable[[Request, Exception], Awaitable[Response]]):
        self.app = app
        self.metrics = metrics
        self.limit = limit
        self.read_timeout = read_timeout
        self.page_rules = [(prefix, [(k.lower().encode(), v.encode()) for k, v in h.items()])
                           for prefix, h in page_rules]
        self.routes = list(routes)
        self.unexpected = unexpected
        # plain Starlette routes name their endpoint, not themselves, in the scope
        self.templates = {r.endpoint: r.path for r in [*HOT_ROUTES, *router.routes]
                          if isinstance(r, Route)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        added = next((h for prefix, h in self.page_rules if scope["path"].startswith(prefix)),
                     None)

        async def respond(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if added is not None:
                    have = {name.lower() for name, _ in message.get("headers", [])}
                    message["headers"] = [*message.get("headers", []),
                                          *((k, v) for k, v in added if k not in have)]
            await send(message)

        try:
            if self._declared_too_large(scope):
                await error_response(self._too_large())(scope, receive, respond)
                return
            await self._dispatch(scope, self._limited(receive), respond)
        finally:
            route = getattr(scope.get("route"), "path", None) or self.templates.get(
                scope.get("endpoint"), "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.refresh_audit_queue()  # a hook call queues its audit row

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "POST":
            for route in self.routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope["route"] = route
                    scope.update(child)
                    await self._serve(route.endpoint, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(self, endpoint: Endpoint, scope: Scope, receive: Receive,
                     send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except ProtocolError as exc:
            response = error_response(exc)
        except Exception as exc:
            await (await self.unexpected(request, exc))(scope, receive, send)
            raise
        await response(scope, receive, send)

    def _declared_too_large(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    return int(value) > self.limit
                except ValueError:
                    return False
        return False

    def _too_large(self) -> ProtocolError:
        return ProtocolError(413, "too-long", f"request body larger than {self.limit} bytes")

    def _limited(self, receive: Receive) -> Receive:
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
                raise ProtocolError(
                    408, "timeout", f"request body not received within {self.read_timeout:g} s",
                    headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large()
            return message

        return limited

