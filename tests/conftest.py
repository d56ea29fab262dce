"""Shared fixtures: one embedded stack per session (started on first use), unique names per test, and a clean
environment and logging setup for tests that need them."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from ocrbooth.config import ENV_PREFIX
from ocrbooth.dev.embedded import EmbeddedStack
from tests.support.stack import TopicNames, s3_prefix_for, start_stack, unique_suffix
from tests.support.stack import daemon_env as build_daemon_env


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    """SeaweedFS + Tansu (log stored in S3) for the whole session; started only if a test asks for it."""
    running = start_stack(tmp_path_factory.mktemp("stack"), storage="s3")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def bootstrap(stack: EmbeddedStack) -> str:
    """The session broker's bootstrap address."""
    return stack.bootstrap_servers


@pytest.fixture
def topic_partitions() -> int:
    """Partitions of each per-test topic (DLQ and control: 1). Override with
    ``@pytest.mark.parametrize("topic_partitions", [N])`` or a module-level fixture."""
    return 4


@pytest.fixture
def topics(stack: EmbeddedStack, topic_partitions: int) -> TopicNames:
    """Fresh topics for this test (default names with a unique suffix), created on the session broker."""
    names = TopicNames.unique()
    stack.create_topics(names.partition_counts(topic_partitions))
    return names


@pytest.fixture
def s3_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix in the session bucket that no other test uses."""
    return s3_prefix_for(request.node.name)


@pytest.fixture
def group_id() -> str:
    """A consumer group id no other test uses."""
    return f"ocrbooth-test-{unique_suffix()}"


@pytest.fixture
def daemon_env(stack: EmbeddedStack, topics: TopicNames, group_id: str) -> dict[str, str]:
    """Environment for a daemon on the session stack, using this test's topics and group."""
    return build_daemon_env(stack, topics, group_id)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OCRBOOTH_* variable from the shell or another test: settings start from their defaults."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that call configure_logging (directly or through the CLI): the root logger's handlers and
    level, and aiokafka's level, are put back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    aiokafka_level = logging.getLogger("aiokafka").level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        logging.getLogger("aiokafka").setLevel(aiokafka_level)
