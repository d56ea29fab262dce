"""One small HTTP server for /metrics, /healthz and /readyz. No framework: three GET routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


class HealthServer:
    """Serves probes and metrics on host:port; `port` is the bound one after start (0 picks a free port)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, live: Check, ready: Check) -> None:
        self.host = host
        self.port = port
        self._registry = registry
        self._live = live
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics and health on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            parts = request_line.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            status, ctype, body = self._route(method, path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass  # slow, vanished or oversized requests get no answer
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        if path == "/metrics":
            try:
                return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
            except Exception as exc:  # a broken collector must not drop the connection silently
                log.exception("collecting metrics failed")
                return "500 Internal Server Error", "text/plain", f"{type(exc).__name__}: {exc}\n".encode()
        if path in ("/healthz", "/readyz"):
            try:
                ok, detail = (self._live if path == "/healthz" else self._ready)()
            except Exception as exc:  # a check that raises means not healthy / not ready
                log.exception("%s check raised", path)
                ok, detail = False, f"check raised {type(exc).__name__}: {exc}"
            return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", (detail + "\n").encode()
        return "404 Not Found", "text/plain", b"not found\n"
