"""Session-level helpers around the embedded stack: per-test topic names, prefixes and daemon env."""

from __future__ import annotations

import re
import uuid
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from ocrbooth import constants
from ocrbooth.dev.embedded import EmbeddedStack

# Settings env names for each topic field (the daemon's `Settings.topics` section).
_TOPIC_ENV = {
    "ocr_requests": "OCRBOOTH_TOPICS_OCR_REQUESTS",
    "ocr_results": "OCRBOOTH_TOPICS_OCR_RESULTS",
    "ocr_review": "OCRBOOTH_TOPICS_OCR_REVIEW",
    "finetune_requests": "OCRBOOTH_TOPICS_FINETUNE_REQUESTS",
    "finetune_control": "OCRBOOTH_TOPICS_FINETUNE_CONTROL",
    "finetune_events": "OCRBOOTH_TOPICS_FINETUNE_EVENTS",
    "dlq": "OCRBOOTH_TOPICS_DLQ",
}
# Same layout as production: the DLQ and the control topic have one partition.
_SINGLE_PARTITION = frozenset({"dlq", "finetune_control"})


def unique_suffix() -> str:
    """A short random suffix for names that must not collide between tests."""
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class TopicNames:
    """One test's topic names: the default names with a unique suffix."""

    ocr_requests: str
    ocr_results: str
    ocr_review: str
    finetune_requests: str
    finetune_control: str
    finetune_events: str
    dlq: str

    @classmethod
    def unique(cls, suffix: str | None = None) -> TopicNames:
        """Default topic names from `ocrbooth.constants`, each suffixed with `.{suffix}` (random if None)."""
        tag = suffix or unique_suffix()
        return cls(
            ocr_requests=f"{constants.TOPIC_OCR_REQUESTS}.{tag}",
            ocr_results=f"{constants.TOPIC_OCR_RESULTS}.{tag}",
            ocr_review=f"{constants.TOPIC_OCR_REVIEW}.{tag}",
            finetune_requests=f"{constants.TOPIC_FINETUNE_REQUESTS}.{tag}",
            finetune_control=f"{constants.TOPIC_FINETUNE_CONTROL}.{tag}",
            finetune_events=f"{constants.TOPIC_FINETUNE_EVENTS}.{tag}",
            dlq=f"{constants.TOPIC_DLQ}.{tag}",
        )

    def all(self) -> tuple[str, ...]:
        """Every topic name, in field order."""
        return astuple(self)

    def partition_counts(self, partitions: int = 4) -> dict[str, int]:
        """Topic name -> partitions: `partitions` each, except the DLQ and the control topic (1)."""
        return {getattr(self, f.name): 1 if f.name in _SINGLE_PARTITION else partitions for f in fields(self)}

    def env(self) -> dict[str, str]:
        """The `OCRBOOTH_TOPICS_*` overrides that point a daemon at these topics."""
        return {env: getattr(self, name) for name, env in _TOPIC_ENV.items()}


def start_stack(data_dir: Path, **kwargs: Any) -> EmbeddedStack:
    """Start an embedded stack in `data_dir`; the caller stops it."""
    stack = EmbeddedStack(data_dir, **kwargs)
    stack.start()
    return stack


def daemon_env(stack: EmbeddedStack, topics: TopicNames, group_id: str) -> dict[str, str]:
    """Everything a daemon subprocess needs to run against `stack` on `topics` in its own group."""
    return {**stack.env(), **topics.env(), "OCRBOOTH_GROUP_ID": group_id}


def s3_prefix_for(test_name: str) -> str:
    """A unique S3 key prefix for one test, readable in listings: ``tests/{test-name}-{suffix}/``."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", test_name).strip("-")[:60]
    return f"tests/{slug}-{unique_suffix()}/"
