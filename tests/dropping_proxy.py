"""A TCP proxy in front of a database that can drop packets: in ``drop`` mode it accepts
connections and neither answers nor forwards (a blackholed network: no refusal, no reset); back in
``forward`` mode it forwards, the held connections too (the network heals, retransmits arrive)."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Self


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction of a proxied connection until it ends, then close the other side."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()

class DroppingProxy:
    def __init__(self, target: tuple[str, int] | None = None, *, dropping: bool = True):
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.accepted = 0  # connections accepted, whatever the mode
        self.dropping = dropping
        self._held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def url(self, user: str = "root", database: str = "test") -> str:
        return f"postgresql+asyncpg://{user}@127.0.0.1:{self.port}/{database}"

    def _run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]

    def __enter__(self) -> Self:
        self._thread.start()

        async def start() -> None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self._run(start())
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for _, writer in self._held:
                writer.close()
            for writer in self._writers:
                writer.close()
        self._run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)

    @property
    def held(self) -> int:
        """Connections accepted and not answered (dropped) now."""
        return len(self._held)

    def heal(self) -> None:
        """Forward from now on, the held connections too."""
        async def go() -> None:
            self.dropping = False
            held, self._held = self._held, []
            for reader, writer in held:
                asyncio.ensure_future(self._forward(reader, writer))
        self._run(go())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.dropping or self.target is None:
            self._held.append((reader, writer))  # read nothing, answer nothing
            return
        await self._forward(reader, writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.target is not None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

