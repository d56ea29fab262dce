"""What a handler is: decoded input events in, output events out. The daemon owns Kafka, offsets and retries."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from ocrbooth.config import Settings
from ocrbooth.messages import MessageContext, OutputEvent
from ocrbooth.metrics import Metrics
from ocrbooth.schemas import ErrorInfo
from ocrbooth.storage import S3Storage

Publish = Callable[[Sequence[OutputEvent], MessageContext], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HandlerRuntime:
    """What the daemon lends a handler at start."""

    settings: Settings
    storage: S3Storage
    metrics: Metrics
    publish: Publish
    """Publish events now (acks=all), for long-running handlers that report progress before they return."""


EventT = TypeVar("EventT", bound=BaseModel)


class Handler(abc.ABC, Generic[EventT]):
    """Base class of every handler. Subclasses expose plain coroutines; only the daemon creates tasks."""

    name: ClassVar[str]
    max_concurrency: int | None = None
    """Messages of this handler in flight at once (e.g. GPU slots); None means only the global limit."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abc.abstractmethod
    def input_topics(self) -> Mapping[str, type[EventT]]:
        """Topics consumed through the group, with the model each one's values decode to."""

    async def start(self, runtime: HandlerRuntime) -> None:
        """Load models, open clients. Runs before the consumer joins the group."""

    def broadcast_topics(self) -> Mapping[str, type[BaseModel]]:
        """Topics every replica reads in full, outside the consumer group (e.g. cancel commands)."""
        return {}

    async def on_broadcast(self, event: BaseModel, ctx: MessageContext) -> None:
        """One event from a broadcast topic."""

    async def drain(self) -> None:
        """Shutdown has begun: wind long-running work down (checkpoint and stop) within the drain deadline."""

    async def stop(self) -> None:
        """Release what start() acquired. Runs after the consumer has left the group."""

    def ready(self) -> bool:
        """False while the handler cannot take work (model still loading)."""
        return True

    def busy(self) -> bool:
        """True while the handler wants no new messages (its own resource budget, such as page memory, is
        spent); the consumer pauses the handler's partitions until it turns False. Called often: keep it O(1)."""
        return False

    def validate(self, event: EventT) -> None:
        """Cheap checks of a decoded event (bounds, allowlists), raising PoisonError with a specific code.

        The consumer runs this before the event waits for a handler slot, so a flood of bad requests is
        answered at decode speed even while every slot is busy. No I/O here."""

    @abc.abstractmethod
    async def handle(self, event: EventT, ctx: MessageContext) -> Sequence[OutputEvent]:
        """Process one event; raise PoisonError, RetryableError or FatalError to say how a failure is handled."""

    def failure_outputs(self, event: EventT, ctx: MessageContext, error: ErrorInfo) -> Sequence[OutputEvent]:
        """Outputs that report a failed event to its producer (a failed result). Empty means dead-letter it."""
        return ()


AnyHandler = Handler[Any]
"""A handler of some event type, as the runtime holds it (the runtime decodes each topic to its handler's model)."""
