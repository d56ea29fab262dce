"""A loopback TCP proxy that breaks the path between the daemon and a server (Kafka broker or S3) on command:
reset every connection (RST, as a crashed middlebox or a dropped NAT entry does), stall them (bytes stop
flowing both ways, as on a congested or black-holed link), or go down (connection refused) and come back on
the same port. Toxiproxy does this as a separate Go binary; an asyncio proxy in the test's own loop needs no
download and no ports beyond the one it listens on.

Everything binds 127.0.0.1; connections are capped (`max_connections`), and `close()` ends every task.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator

_CHUNK = 64 * 1024
_HOST = "127.0.0.1"


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    # SO_LINGER 0: close() sends RST instead of FIN, so the peer sees ECONNRESET.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`upstream_port`, with faults injected on command."""

    def __init__(self, upstream_port: int, *, port: int = 0, max_connections: int = 256) -> None:
        self.upstream_port = upstream_port
        self.port = port
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._unstall: asyncio.TimerHandle | None = None
        self.connections = 0
        """Client connections accepted so far."""
        self.resets = 0
        """Connections reset by `reset_all()` or `down()`."""

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT, for an S3 endpoint behind the proxy."""
        return f"http://{_HOST}:{self.port}"

    @property
    def address(self) -> str:
        """127.0.0.1:PORT, for a Kafka bootstrap address behind the proxy."""
        return f"{_HOST}:{self.port}"

    @property
    def open_connections(self) -> int:
        """Client connections being forwarded now."""
        return len(self._links)

    async def start(self) -> TcpProxy:
        """Listen (again) on `port` (a free one the first time if 0)."""
        if self._server is not None:
            return self
        self._server = await asyncio.start_server(self._accept, _HOST, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        await self.down()
        if self._unstall is not None:
            self._unstall.cancel()
        self._flowing.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TcpProxy]:
        """Listening for the duration of the block, closed after it."""
        await self.start()
        try:
            yield self
        finally:
            await self.close()

    # ---- faults ----------------------------------------------------------------------------------

    def reset_all(self) -> int:
        """Reset every open connection (both sides get RST); new connections are accepted. Returns how many."""
        links = list(self._links)
        for link in links:
            link.reset()
        self._links.difference_update(links)
        self.resets += len(links)
        return len(links)

    def stall(self, seconds: float) -> None:
        """Stop forwarding bytes on every connection, open or new, for `seconds`; then resume."""
        self._flowing.clear()
        if self._unstall is not None:
            self._unstall.cancel()
        self._unstall = asyncio.get_running_loop().call_later(seconds, self._flowing.set)

    @property
    def stalled(self) -> bool:
        """Whether a stall is in progress."""
        return not self._flowing.is_set()

    async def down(self) -> int:
        """Stop listening (new connections are refused) and reset every open one. Returns how many were reset."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        reset = self.reset_all()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)
        return reset

    async def up(self) -> None:
        """Listen again on the same port after `down()`."""
        await self.start()

    # ---- forwarding ------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None or len(self._links) >= self.max_connections:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(_HOST, self.upstream_port), 5)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        self.connections += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, link), name="tcpproxy up"),
            asyncio.create_task(self._pump(up_reader, writer, link), name="tcpproxy down"),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            for w in (writer, up_writer):
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await self._flowing.wait()  # a stall that began while this read waited holds the bytes back
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side finished or broke: end the other direction too, as a real connection would.
            for task in link.tasks:
                if task is not asyncio.current_task():
                    task.cancel()
