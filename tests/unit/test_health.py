"""The metrics and health server: real HTTP on 127.0.0.1 with a fresh registry, probes following their checks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from ocrbooth.daemon.health import HealthServer
from ocrbooth.metrics import Metrics

DEADLINE_S = 5.0


@dataclass
class Checks:
    """Mutable probe answers the server reads on every request."""

    live: tuple[bool, str] = (True, "alive")
    ready: tuple[bool, str] = (False, "not assigned yet")
    calls: list[str] = field(default_factory=list)

    def check_live(self) -> tuple[bool, str]:
        self.calls.append("live")
        return self.live

    def check_ready(self) -> tuple[bool, str]:
        self.calls.append("ready")
        return self.ready


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@pytest.fixture
def metrics() -> Metrics:
    """A metrics container on its own fresh registry."""
    return Metrics()


@pytest.fixture
def checks() -> Checks:
    """Probe answers the test can flip."""
    return Checks()


@pytest.fixture
async def server(metrics: Metrics, checks: Checks) -> AsyncIterator[HealthServer]:
    """A started server on a free port, stopped afterwards."""
    health = HealthServer("127.0.0.1", 0, metrics.registry, checks.check_live, checks.check_ready)
    await health.start()
    try:
        yield health
    finally:
        await health.stop()


async def _request(server: HealthServer, method: str, path: str, body: bytes = b"") -> Response:
    """One HTTP/1.1 request over asyncio streams; the server closes the connection after answering."""

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            head = f"{method} {path} HTTP/1.1\r\nHost: {server.host}\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
            return await reader.read()  # until EOF: the server sends Connection: close
        finally:
            writer.close()
            await writer.wait_closed()

    raw = await asyncio.wait_for(exchange(), DEADLINE_S)
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(int(status), headers, payload)


async def test_server_binds_a_free_port(server: HealthServer) -> None:
    """Port 0 is replaced by the port actually bound."""
    assert server.port > 0


async def test_metrics_returns_prometheus_text(server: HealthServer, metrics: Metrics) -> None:
    """GET /metrics serves the registry in the Prometheus text format, with ocrbooth_ metrics and current values."""
    metrics.consumed.labels("ocr.requests").inc(3)
    metrics.in_flight.set(2)
    response = await _request(server, "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert int(response.headers["content-length"]) == len(response.body)
    text = response.body.decode()
    assert "# TYPE ocrbooth_consumed_messages_total counter" in text
    assert 'ocrbooth_consumed_messages_total{topic="ocr.requests"} 3.0' in text
    assert "ocrbooth_in_flight_messages 2.0" in text
    assert "ocrbooth_build_info{" in text
    metric_lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert metric_lines
    assert all(line.startswith("ocrbooth_") for line in metric_lines)  # a fresh registry: nothing else in it


async def test_metrics_ignores_the_query_string(server: HealthServer) -> None:
    """A query string on a known path still routes to it."""
    response = await _request(server, "GET", "/metrics?name[]=ocrbooth_ready")
    assert response.status == 200
    assert b"ocrbooth_ready" in response.body


async def test_probes_follow_their_checks(server: HealthServer, checks: Checks) -> None:
    """/healthz and /readyz answer 200 or 503 from their own check each time, with the check's detail as body."""
    live = await _request(server, "GET", "/healthz")
    assert (live.status, live.body) == (200, b"alive\n")
    ready = await _request(server, "GET", "/readyz")
    assert (ready.status, ready.body) == (503, b"not assigned yet\n")

    checks.live = (False, "event loop stalled for 12.0s")
    checks.ready = (True, "ready")
    live = await _request(server, "GET", "/healthz")
    assert (live.status, live.body) == (503, b"event loop stalled for 12.0s\n")
    ready = await _request(server, "GET", "/readyz")
    assert (ready.status, ready.body) == (200, b"ready\n")
    assert checks.calls == ["live", "ready", "live", "ready"]


async def test_head_sends_headers_only(server: HealthServer) -> None:
    """HEAD answers like GET but without a body."""
    response = await _request(server, "HEAD", "/healthz")
    assert response.status == 200
    assert int(response.headers["content-length"]) == len(b"alive\n")
    assert response.body == b""


async def test_unknown_path_is_404(server: HealthServer) -> None:
    """A path the server does not serve gets 404."""
    response = await _request(server, "GET", "/nope")
    assert response.status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_other_methods_are_405(server: HealthServer, checks: Checks, method: str) -> None:
    """Only GET and HEAD are allowed; anything else is 405 without running a check."""
    response = await _request(server, method, "/healthz", body=b"{}")
    assert response.status == 405
    assert checks.calls == []


async def test_stop_closes_the_port(metrics: Metrics, checks: Checks) -> None:
    """After stop() no connection is accepted, and stopping again is harmless."""
    health = HealthServer("127.0.0.1", 0, metrics.registry, checks.check_live, checks.check_ready)
    await health.start()
    port = health.port
    await health.stop()
    await health.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), DEADLINE_S)
