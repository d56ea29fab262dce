"""The trainer's stdout protocol: one JSON object per line, one model per event kind.

Both sides import this module: the trainer builds an event and `Emitter.emit`s it; the daemon's finetune handler
reads each line with `parse_line`. Neither can then send or expect a field the other does not know. No torch here:
the daemon imports it.

    class_images       {"generated", "total", "cache_hit", "seconds"}
    started            {"resumed_from_step": k | null, "attempt"}
    progress           {"step", "max_steps", "loss" | null, "learning_rate", "steps_per_second"}
    checkpoint         {"step", "uri", "upload_seconds"}
    checkpoint_failed  {"step", "error", "upload_seconds"}   (then the trainer exits; a rerun resumes)
    samples            {"uris": [...]}
    completed          {"artifacts": {"unet", "text_encoder"?, "pipeline", "samples", "logs"}}
    failed             {"code", "message"}                   (then exit code 2)
    stopped            {"step"}                              (then exit code 3)
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Annotated, Any, ClassVar, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

MAX_LINE_BYTES = 1 << 20  # a longer line is a broken trainer, not an event


class ProtocolError(ValueError):
    """A trainer line that is not one of the events below."""


class _Event(BaseModel):
    # Unknown fields are an error: a field one side adds must be added here, for both.
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields that stay between trainer and daemon (metrics, logs) and are not copied into FinetuneEvent.
    _LOCAL: ClassVar[frozenset[str]] = frozenset()

    def forwarded(self) -> dict[str, Any]:
        """The fields the daemon copies into the job's FinetuneEvent (none of the trainer-local ones)."""
        data = self.model_dump(exclude={"event", *self._LOCAL})
        return {k: v for k, v in data.items() if v is not None}


class ClassImagesEvent(_Event):
    """Class images for prior preservation are ready (generated now or reused from S3)."""

    event: Literal["class_images"] = "class_images"
    generated: int = Field(ge=0)
    total: int = Field(ge=0)
    cache_hit: bool
    seconds: float | None = Field(default=None, ge=0.0, description="Time spent generating, when generated.")
    _LOCAL: ClassVar[frozenset[str]] = frozenset({"seconds"})


class StartedEvent(_Event):
    """Training begins (from scratch or from a checkpoint)."""

    event: Literal["started"] = "started"
    resumed_from_step: int | None = Field(default=None, ge=0)
    attempt: int = Field(ge=1)
    _LOCAL: ClassVar[frozenset[str]] = frozenset({"attempt"})  # the daemon sets `attempt` itself


class ProgressEvent(_Event):
    """Every `progress_every_steps` optimizer steps and at the last one."""

    event: Literal["progress"] = "progress"
    step: int = Field(ge=0)
    max_steps: int = Field(ge=1)
    loss: float | None = None
    learning_rate: float = Field(ge=0.0)
    steps_per_second: float = Field(ge=0.0)


class CheckpointEvent(_Event):
    """A checkpoint was uploaded and marked complete."""

    event: Literal["checkpoint"] = "checkpoint"
    step: int = Field(ge=0)
    uri: str
    upload_seconds: float = Field(ge=0.0)
    _LOCAL: ClassVar[frozenset[str]] = frozenset({"upload_seconds"})


class CheckpointFailedEvent(_Event):
    """A checkpoint upload failed; the trainer exits next and a rerun resumes from the previous one."""

    event: Literal["checkpoint_failed"] = "checkpoint_failed"
    step: int = Field(ge=0)
    error: str
    upload_seconds: float = Field(ge=0.0)
    _LOCAL: ClassVar[frozenset[str]] = frozenset({"error", "upload_seconds"})


class SamplesEvent(_Event):
    """Validation samples of the trained pipeline were uploaded."""

    event: Literal["samples"] = "samples"
    uris: list[str]


class CompletedEvent(_Event):
    """The trained pipeline, samples and logs are in S3."""

    event: Literal["completed"] = "completed"
    artifacts: dict[str, str]


class FailedEvent(_Event):
    """The job cannot succeed (bad input); exit code 2 follows."""

    event: Literal["failed"] = "failed"
    code: str = Field(min_length=1)
    message: str


class StoppedEvent(_Event):
    """SIGTERM: a checkpoint of `step` was written; exit code 3 follows."""

    event: Literal["stopped"] = "stopped"
    step: int = Field(ge=0)


TrainerEvent = Annotated[
    ClassImagesEvent
    | StartedEvent
    | ProgressEvent
    | CheckpointEvent
    | CheckpointFailedEvent
    | SamplesEvent
    | CompletedEvent
    | FailedEvent
    | StoppedEvent,
    Field(discriminator="event"),
]
EVENT_TYPES: tuple[type[_Event], ...] = (
    ClassImagesEvent,
    StartedEvent,
    ProgressEvent,
    CheckpointEvent,
    CheckpointFailedEvent,
    SamplesEvent,
    CompletedEvent,
    FailedEvent,
    StoppedEvent,
)
_ADAPTER: TypeAdapter[TrainerEvent] = TypeAdapter(TrainerEvent)


def encode(event: _Event) -> str:
    """One protocol line, without the newline."""
    return event.model_dump_json()


def parse_line(raw: bytes | str) -> TrainerEvent | None:
    """One stdout line of a trainer as its event; None for a blank line. ProtocolError for anything else (not
    JSON, not an object, an unknown kind, a missing or extra or ill-typed field)."""
    if len(raw) > MAX_LINE_BYTES:
        raise ProtocolError(f"line of {len(raw)} bytes, over {MAX_LINE_BYTES}")
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if not text.strip():
        return None
    try:
        return _ADAPTER.validate_json(text)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in exc.errors()[:3])
        raise ProtocolError(errors) from exc


class Emitter:
    """Writes events to the protocol stream, one flushed line each (rank 0 only)."""

    def __init__(self, stream: TextIO, *, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.lock = threading.Lock()

    def emit(self, event: _Event) -> None:
        if not self.enabled:
            return
        line = encode(event)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def claim_stdout() -> TextIO:
    """Keep the real stdout for protocol lines and point fd 1 at stderr, so that a library's stray print can
    never corrupt the protocol."""
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    return protocol


def is_rank_zero() -> bool:
    """Lightning's DDP children run the trainer with LOCAL_RANK set; only rank 0 speaks."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def json_float(value: float) -> float | None:
    """NaN and infinities are not JSON: None instead."""
    return value if value == value and abs(value) != float("inf") else None


__all__ = [
    "EVENT_TYPES",
    "CheckpointEvent",
    "CheckpointFailedEvent",
    "ClassImagesEvent",
    "CompletedEvent",
    "Emitter",
    "FailedEvent",
    "ProgressEvent",
    "ProtocolError",
    "SamplesEvent",
    "StartedEvent",
    "StoppedEvent",
    "TrainerEvent",
    "claim_stdout",
    "encode",
    "is_rank_zero",
    "json_float",
    "parse_line",
]
