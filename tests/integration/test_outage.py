"""An S3 outage is waited out: no new work, not ready while it lasts, nothing failed once S3 is back."""

from __future__ import annotations

import asyncio
import json

import pytest

from ocrbooth.dev.embedded import EmbeddedStack
from tests.support.daemon import http_get, metric_value, request_event, running_daemon, settings_for
from tests.support.kafka import consume_all, produce, wait_until
from tests.support.s3faults import S3FaultProxy
from tests.support.stack import TopicNames


@pytest.mark.parametrize("topic_partitions", [2])
async def test_an_s3_outage_pauses_work_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch, stack: EmbeddedStack, topics: TopicNames, daemon_env: dict[str, str]
) -> None:
    """With every S3 request answered 503 for a while, the daemon (whose crash guard must write to S3 before it
    handles offsets past its recorded window, here 4 ahead) reports not-ready and s3 down, takes no new work, and
    once S3 answers again every request succeeds: no failed result, no dead letter."""
    proxy = S3FaultProxy(stack.s3_endpoint_url)
    with proxy.running():
        env = {**daemon_env, "OCRBOOTH_S3_ENDPOINT_URL": proxy.url}
        settings = settings_for(
            monkeypatch,
            env,
            OCRBOOTH_RETRY_MAX_ATTEMPTS="2",
            OCRBOOTH_RETRY_INITIAL_BACKOFF_MS="50",
            OCRBOOTH_MAX_IN_FLIGHT="4",
        )
        async with running_daemon(settings) as (daemon, _):
            await produce(stack.bootstrap_servers, topics.ocr_requests, [(b"a", request_event(0))])
            await consume_all(stack.bootstrap_servers, topics.ocr_results, count=1, timeout_s=60)
            url = f"http://127.0.0.1:{daemon.health.port}"  # bound once the daemon has started
            assert (await asyncio.to_thread(http_get, f"{url}/readyz"))[0] == 200

            for method in ("GET", "PUT", "HEAD", "POST", "DELETE"):
                proxy.fail(method, ".")
            await produce(
                stack.bootstrap_servers,
                topics.ocr_requests,
                [(f"d{i}".encode(), request_event(i)) for i in range(1, 41)],
            )

            async def degraded() -> bool:
                status, body = await asyncio.to_thread(http_get, f"{url}/readyz")
                return status == 503 and "s3 unreachable" in body

            await wait_until(degraded, timeout_s=60)
            metrics = (await asyncio.to_thread(http_get, f"{url}/metrics"))[1]
            assert metric_value(metrics, "ocrbooth_dependency_up", dependency="s3") == 0
            await asyncio.sleep(3)  # the outage goes on; nothing may fail meanwhile
            assert daemon.consumer.counts["failed_result"] == daemon.consumer.counts["dead_lettered"] == 0
            proxy.heal()

            results = await consume_all(stack.bootstrap_servers, topics.ocr_results, count=41, timeout_s=120)

            async def ready() -> bool:
                return (await asyncio.to_thread(http_get, f"{url}/readyz"))[0] == 200

            # Work resumes as soon as a write succeeds; readiness follows at the watcher's next probe, which
            # backs off up to the dependency's max_backoff_ms (5 s), so the results can arrive first.
            await wait_until(ready, timeout_s=30, message="not ready again after S3 came back")
    statuses = {json.loads(r.value)["request_id"]: json.loads(r.value)["status"] for r in results}
    assert statuses == {f"req-{i}": "succeeded" for i in range(41)}
    assert daemon.consumer.counts["failed_result"] == daemon.consumer.counts["dead_lettered"] == 0
