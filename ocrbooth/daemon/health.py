"""The HTTP server for /metrics, /healthz and /readyz, on aiohttp's server on the daemon's event loop."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]

# Stopping waits this long for a response being written; idle keep-alive connections close at once.
_SHUTDOWN_TIMEOUT_S = 2.0


class HealthServer:
    """Serves probes and metrics on host:port; `port` is the bound one after start (0 picks a free port).
    GET and HEAD only (aiohttp answers HEAD for GET routes, 404 for other paths, 405 for other methods)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, live: Check, ready: Check) -> None:
        self.host = host
        self.port = port
        self._registry = registry
        self._live = live
        self._ready = ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        # No access log: Prometheus and the kubelet call every few seconds.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError:  # the port is taken: release what setup() made before reporting it
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("metrics and health on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            body = generate_latest(self._registry)
        except Exception as exc:  # a broken collector is reported to the scraper, not hidden
            log.exception("collecting metrics failed")
            return web.Response(status=500, text=f"{type(exc).__name__}: {exc}\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return _probe("/healthz", self._live)

    async def _readyz(self, request: web.Request) -> web.Response:
        return _probe("/readyz", self._ready)


def _probe(path: str, check: Check) -> web.Response:
    try:
        ok, detail = check()
    except Exception as exc:  # a check that raises means not healthy / not ready
        log.exception("%s check raised", path)
        ok, detail = False, f"check raised {type(exc).__name__}: {exc}"
    return web.Response(status=200 if ok else 503, text=detail + "\n")
