"""Chaos: S3 unreachable for 60 seconds while the daemon OCRs documents it must fetch from S3."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ocrbooth.dev.embedded import EmbeddedStack
from ocrbooth.testing import samples
from tests.chaos.common import SHORT_SESSION, answered_ids, exited, tally
from tests.chaos.figures import Figures
from tests.support.daemon import DaemonProcess, http_get, metric_value
from tests.support.kafka import consume_all, produce, wait_until
from tests.support.stack import TopicNames
from tests.support.tcpproxy import TcpProxy

N = 24
OUTAGE_S = 60
MAX_IN_FLIGHT = 2  # few documents fetched at a time, so most still need S3 when it goes away
WALL_BOUND_S = 240


def _s3_up(proc: DaemonProcess) -> float | None:
    """The daemon's `ocrbooth_dependency_up{dependency="s3"}` gauge (None while /metrics does not answer)."""
    status, body = http_get(proc.url + "/metrics")
    if status != 200:
        return None
    if 'ocrbooth_dependency_up{dependency="s3"}' not in body:
        return None
    return metric_value(body, "ocrbooth_dependency_up", dependency="s3")


@pytest.mark.timeout(WALL_BOUND_S + 60)
async def test_sixty_second_s3_outage_fails_no_request(
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    s3_prefix: str,
    tmp_path: Path,
    chaos_report: Callable[[Figures], None],
) -> None:
    """24 s3:// documents OCRed with Tesseract through a proxy that makes S3 unreachable for 60 s mid-stream:
    /readyz answers 503 and the s3 dependency gauge reads 0 while it is down, and once it is back every
    request succeeds: none fails, none is lost."""
    started = time.monotonic()
    s3 = stack.s3_client()
    try:
        for i in range(N):
            pdf = samples.text_pdf([f"Document {i}: the quick brown fox jumps over the lazy dog."])
            s3.put_object(Bucket=stack.bucket, Key=f"{s3_prefix}{i}.pdf", Body=pdf)
    finally:
        s3.close()
    requests = [
        (
            f"doc-{i}".encode(),
            json.dumps(
                {
                    "request_id": f"req-{i}",
                    "document_id": f"doc-{i}",
                    "source": {"uri": f"s3://{stack.bucket}/{s3_prefix}{i}.pdf"},
                }
            ).encode(),
        )
        for i in range(N)
    ]
    await produce(stack.bootstrap_servers, topics.ocr_requests, requests)

    proxy = TcpProxy(stack.ports.s3)
    async with proxy.running():
        env = {
            **daemon_env,
            **SHORT_SESSION,
            "OCRBOOTH_S3_ENDPOINT_URL": proxy.url,
            "OCRBOOTH_HANDLERS": "ocr",
            "OCRBOOTH_OCR_ENGINE": "tesseract",
            "OCRBOOTH_OCR_RENDER_LONGEST_PX": "800",
            "OCRBOOTH_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
        }
        proc = DaemonProcess(env, tmp_path / "daemon.log").start()
        try:
            await proc.wait_ready(90)
            await answered_ids(stack.bootstrap_servers, topics.ocr_results, 4, timeout_s=90)

            await proxy.down()
            down_at, down_wall_ms = time.monotonic(), time.time() * 1000
            readyz: list[int] = []
            gauge: list[float | None] = []
            while time.monotonic() - down_at < OUTAGE_S:
                assert not exited(proc), f"the daemon exited during the outage:\n{proc.log_tail()}"
                readyz.append((await asyncio.to_thread(http_get, proc.url + "/readyz"))[0])
                gauge.append(await asyncio.to_thread(_s3_up, proc))
                await asyncio.sleep(0.5)
            await proxy.up()

            await answered_ids(stack.bootstrap_servers, topics.ocr_results, N, timeout_s=120)
            await wait_until(
                lambda: asyncio.to_thread(lambda: http_get(proc.url + "/readyz")[0] == 200), 30, message="ready again"
            )
            back_up = await asyncio.to_thread(_s3_up, proc)
            proc.send(signal.SIGTERM)
            assert await proc.wait_exit(40) == 0, proc.log_tail()
        finally:
            proc.kill()

    results = await consume_all(stack.bootstrap_servers, topics.ocr_results, timeout_s=60)
    counted = tally((f"req-{i}" for i in range(N)), results)
    failures = [json.loads(r.value) for r in results if json.loads(r.value)["status"] == "failed"]
    chaos_report(
        Figures.of_tally("s3_outage", counted, sent=N, duplicate_bound=0, started=started, wall_bound_s=WALL_BOUND_S)
    )
    assert 503 in readyz, f"/readyz never went not-ready during the outage: {sorted(set(readyz))}"
    assert 0 in gauge, f'ocrbooth_dependency_up{{dependency="s3"}} never read 0 during the outage: {set(gauge)}'
    assert back_up == 1
    assert counted.failed == 0, [f["error"] for f in failures][:5]
    assert counted.lost == 0, f"lost {counted.lost}: {counted.missing}"
    assert counted.duplicated == 0
    done_before = {json.loads(r.value)["request_id"] for r in results if r.timestamp <= down_wall_ms}
    assert len(done_before) < N - MAX_IN_FLIGHT, "the documents were done before S3 went down; the test proved nothing"
