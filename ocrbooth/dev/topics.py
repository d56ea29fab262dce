"""Kafka admin helpers of the embedded stack: the default topics, creating missing ones, probing the
broker, and running these coroutines from synchronous code."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final, TypeVar

from ocrbooth.constants import (
    TOPIC_DLQ,
    TOPIC_FINETUNE_CONTROL,
    TOPIC_FINETUNE_EVENTS,
    TOPIC_FINETUNE_REQUESTS,
    TOPIC_OCR_REQUESTS,
    TOPIC_OCR_RESULTS,
    TOPIC_OCR_REVIEW,
)
from ocrbooth.dev.errors import EmbeddedStackError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_POLL_INTERVAL_S: Final = 0.1
# Single-partition topics: the DLQ is read by people, the control topic by every replica in order.
_SINGLE_PARTITION_TOPICS: Final = frozenset({TOPIC_DLQ, TOPIC_FINETUNE_CONTROL})


def default_topics(partitions: int = 4) -> dict[str, int]:
    """Every default topic from `ocrbooth.constants` with `partitions` partitions (DLQ and control: 1)."""
    names = (
        TOPIC_OCR_REQUESTS,
        TOPIC_OCR_RESULTS,
        TOPIC_OCR_REVIEW,
        TOPIC_FINETUNE_REQUESTS,
        TOPIC_FINETUNE_CONTROL,
        TOPIC_FINETUNE_EVENTS,
        TOPIC_DLQ,
    )
    return {name: 1 if name in _SINGLE_PARTITION_TOPICS else partitions for name in names}


def run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private loop in a private thread.

    Works whether or not the caller is itself inside a running event loop.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(factory()))
        except Exception as exc:  # handed back to the calling thread and re-raised there
            error.append(exc)

    thread = threading.Thread(target=target, name="ocrbooth-embedded-sync", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    if not result:
        raise EmbeddedStackError("the private event loop thread ended without a result")
    return result[0]


async def kafka_metadata_ok(bootstrap_servers: str, *, timeout_s: float = 5.0) -> bool:
    """Whether the broker answers a metadata request (each request times out after `timeout_s`)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    # No asyncio.wait_for here: cancelling aiokafka's bootstrap leaks its connection (a ResourceWarning);
    # its own request timeout fails cleanly instead.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=max(1, int(timeout_s * 1000)))
    try:
        await admin.start()
        await admin.list_topics()
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await admin.close()
    return True


async def ensure_topics(bootstrap_servers: str, topics: Mapping[str, int], *, timeout_s: float = 30.0) -> None:
    """Create every missing topic with its partition count (replication 1); existing topics are kept."""
    if not topics:
        return
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, n, 1) for name, n in topics.items() if name not in existing]
        if missing:
            response = await admin.create_topics(missing)
            for name, code, *_ in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise for_code(code)(f"creating topic {name!r}")
            logger.info("created topics %s", ", ".join(f"{t.name}[{t.num_partitions}]" for t in missing))
        deadline = time.monotonic() + timeout_s
        while True:
            described = {t["topic"]: t for t in await admin.describe_topics(list(topics))}
            pending = [n for n in topics if n not in described or described[n]["error_code"] != 0]
            if not pending:
                break
            if time.monotonic() > deadline:
                raise EmbeddedStackError(f"topics not visible in metadata after {timeout_s}s: {pending}")
            await asyncio.sleep(_POLL_INTERVAL_S)
        for name, wanted in topics.items():
            have = len(described[name]["partitions"])
            if have != wanted:
                logger.warning("topic %s exists with %d partitions, not %d", name, have, wanted)
    finally:
        await admin.close()
