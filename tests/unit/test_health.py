"""The metrics and health server: real HTTP on 127.0.0.1 with a fresh registry, probes following their checks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from ocrbooth.daemon.health import HealthServer
from ocrbooth.metrics import Metrics

DEADLINE_S = 5.0


@dataclass
class Checks:
    """Mutable probe answers the server reads on every request."""

    live: tuple[bool, str] = (True, "alive")
    ready: tuple[bool, str] | Exception = (False, "not assigned yet")
    calls: list[str] = field(default_factory=list)

    def check_live(self) -> tuple[bool, str]:
        self.calls.append("live")
        return self.live

    def check_ready(self) -> tuple[bool, str]:
        self.calls.append("ready")
        if isinstance(self.ready, Exception):
            raise self.ready
        return self.ready


@dataclass
class Response:
    """What the server answered."""

    status: int
    headers: dict[str, str]
    body: bytes


class BrokenCollector:
    """A custom collector whose collect() raises, as a buggy exporter would."""

    def describe(self) -> list[Metric]:
        return []  # so registering does not call collect()

    def collect(self) -> list[Metric]:
        raise RuntimeError("collector exploded")


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


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE_S))


async def _request(server: HealthServer, method: str, path: str, body: bytes = b"") -> Response:
    """One HTTP request through aiohttp's client, within DEADLINE_S."""
    async with (
        _session() as session,
        session.request(method, f"http://{server.host}:{server.port}{path}", data=body) as response,
    ):
        return Response(response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read())


async def test_port_zero_binds_a_free_port_of_its_own(metrics: Metrics, checks: Checks) -> None:
    """Two servers started on port 0 report different bound ports, and each port reaches its own server."""
    other = Checks(live=(False, "the other server"))
    first = HealthServer("127.0.0.1", 0, metrics.registry, checks.check_live, checks.check_ready)
    second = HealthServer("127.0.0.1", 0, Metrics().registry, other.check_live, other.check_ready)
    await first.start()
    try:
        await second.start()
        try:
            assert first.port != second.port
            assert (await _request(first, "GET", "/healthz")).body == b"alive\n"
            assert (await _request(second, "GET", "/healthz")).body == b"the other server\n"
        finally:
            await second.stop()
    finally:
        await first.stop()


async def test_a_taken_port_fails_start(server: HealthServer, metrics: Metrics, checks: Checks) -> None:
    """Starting on a port another server holds raises OSError, and the running server keeps serving."""
    clash = HealthServer("127.0.0.1", server.port, metrics.registry, checks.check_live, checks.check_ready)
    with pytest.raises(OSError, match="address already in use"):
        await clash.start()
    await clash.stop()  # nothing to stop: harmless
    assert (await _request(server, "GET", "/healthz")).status == 200


async def test_metrics_returns_prometheus_text(server: HealthServer, metrics: Metrics) -> None:
    """GET /metrics serves the registry in the Prometheus text format, with ocrbooth_ metrics and current values."""
    metrics.consumed.labels("ocr.requests").inc(3)
    metrics.in_flight.set(2)
    response = await _request(server, "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
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
    assert live.headers["content-type"] == "text/plain; charset=utf-8"
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
    assert (await _request(server, "GET", "/healthz/extra")).status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_other_methods_are_405(server: HealthServer, checks: Checks, method: str) -> None:
    """Only GET and HEAD are allowed; anything else is 405 without running a check."""
    response = await _request(server, method, "/healthz", body=b"{}")
    assert response.status == 405
    assert set(response.headers["allow"].split(",")) == {"GET", "HEAD"}
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


async def test_stop_does_not_wait_for_an_idle_keep_alive_connection(metrics: Metrics, checks: Checks) -> None:
    """One connection serves request after request (HTTP/1.1 keep-alive), and a scraper holding it open idle
    neither holds up stop() nor keeps the connection: the server closes it."""
    health = HealthServer("127.0.0.1", 0, metrics.registry, checks.check_live, checks.check_ready)
    await health.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
        try:
            for _ in range(2):
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                assert b"\r\nContent-Length: 6\r\n" in head
                assert await asyncio.wait_for(reader.readexactly(6), DEADLINE_S) == b"alive\n"
            await asyncio.wait_for(health.stop(), DEADLINE_S)
            assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""  # closed by the server
        finally:
            writer.close()
            await writer.wait_closed()
    finally:
        await health.stop()
    assert checks.calls == ["live", "live"]


async def test_a_collector_that_raises_is_a_500_naming_the_error(server: HealthServer, metrics: Metrics) -> None:
    """A broken collector turns /metrics into a 500 with the error as body; the probes keep answering."""
    metrics.registry.register(BrokenCollector())  # type: ignore[arg-type]
    response = await _request(server, "GET", "/metrics")
    assert response.status == 500
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.body == b"RuntimeError: collector exploded\n"
    assert (await _request(server, "GET", "/healthz")).status == 200


async def test_a_check_that_raises_answers_503(server: HealthServer, checks: Checks) -> None:
    """A probe whose check raises is not healthy / not ready: 503 naming the exception; the other probe is unmoved."""
    checks.ready = ValueError("state unreadable")
    response = await _request(server, "GET", "/readyz")
    assert (response.status, response.body) == (503, b"check raised ValueError: state unreadable\n")
    assert (await _request(server, "GET", "/healthz")).status == 200
