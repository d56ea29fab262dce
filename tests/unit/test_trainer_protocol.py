"""The trainer's stdout protocol: every event kind the trainer emits parses on the daemon's side into the same
event, feeds the metrics and the job's FinetuneEvent; a line that is not an event is logged and counted."""

from __future__ import annotations

import io
import typing
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ocrbooth.config import load_settings
from ocrbooth.handlers.base import HandlerRuntime, MessageContext
from ocrbooth.handlers.finetune import FinetuneHandler, _Job
from ocrbooth.metrics import Metrics
from ocrbooth.models.dreambooth import protocol
from ocrbooth.schemas import FinetuneEvent, FinetuneRequest

EXAMPLES: list[protocol.TrainerEvent] = [
    protocol.ClassImagesEvent(generated=4, total=4, cache_hit=False, seconds=1.5),
    protocol.StartedEvent(resumed_from_step=None, attempt=1),
    protocol.StartedEvent(resumed_from_step=400, attempt=2),
    protocol.ProgressEvent(step=10, max_steps=800, loss=0.125, learning_rate=5e-6, steps_per_second=12.5),
    protocol.ProgressEvent(step=20, max_steps=800, loss=None, learning_rate=5e-6, steps_per_second=12.5),
    protocol.CheckpointEvent(step=100, uri="s3://b/jobs/j/checkpoints/step-000100/", upload_seconds=2.5),
    protocol.CheckpointFailedEvent(step=200, error="EndpointConnectionError: down", upload_seconds=30.0),
    protocol.SamplesEvent(uris=["s3://b/jobs/j/output/samples/00-00.png"]),
    protocol.CompletedEvent(artifacts={"unet": "s3://b/u/", "pipeline": "s3://b/p/", "samples": "s3://b/s/"}),
    protocol.FailedEvent(code="invalid_image", message="s3://b/x.png is not an image"),
    protocol.StoppedEvent(step=150),
]


@pytest.fixture
def handler() -> FinetuneHandler:
    """A finetune handler with a fresh metrics registry (no broker or storage: only line handling is used)."""
    settings = load_settings()
    h = FinetuneHandler(settings)
    h._runtime = HandlerRuntime(
        settings=settings,
        storage=None,  # type: ignore[arg-type]
        metrics=Metrics(CollectorRegistry()),
        publish=None,  # type: ignore[arg-type]
    )
    return h


def _value(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def test_examples_cover_every_event_kind() -> None:
    """The examples below hold at least one event of each kind the protocol defines."""
    union = typing.get_args(typing.get_args(protocol.TrainerEvent)[0])
    assert set(union) == set(protocol.EVENT_TYPES) == {type(e) for e in EXAMPLES}


def test_every_emitted_event_parses_back_to_itself_on_the_daemon_side(handler: FinetuneHandler) -> None:
    """Emitter writes one line per event; the handler's parser returns an equal event for each."""
    stream = io.StringIO()
    emitter = protocol.Emitter(stream)
    for event in EXAMPLES:
        emitter.emit(event)
    lines = stream.getvalue().encode().splitlines(keepends=True)
    assert len(lines) == len(EXAMPLES)
    parsed = [handler._parse(line, "job-1") for line in lines]
    assert parsed == EXAMPLES
    assert _value(handler._metrics(), "ocrbooth_finetune_protocol_errors_total") == 0


def test_events_feed_metrics_and_forward_into_finetune_events(handler: FinetuneHandler) -> None:
    """Each parsed event updates the daemon's metrics, and streamed kinds become valid FinetuneEvents carrying
    the trainer's fields (trainer-local ones such as upload_seconds stay out)."""
    request = FinetuneRequest(
        job_id="job-1", base_model="m", instance_images=["s3://b/i/"], instance_prompt="p", class_prompt="c"
    )
    job = _Job(request, MessageContext("finetune.requests", 0, 0, b"job-1", None))
    forwarded: dict[str, FinetuneEvent] = {}
    for event in EXAMPLES:
        handler._observe(event)
        fields: dict[str, Any] = event.forwarded()
        if isinstance(event, protocol.FailedEvent):
            continue  # the handler turns it into `error`
        kind = event.event
        if kind in ("checkpoint_failed", "stopped"):
            continue  # not streamed
        out = handler._event(job, kind, attempt=1, **fields).value  # type: ignore[arg-type]
        assert isinstance(out, FinetuneEvent)
        forwarded[kind] = out
    m = handler._metrics()
    assert _value(m, "ocrbooth_finetune_checkpoints_total") == 1
    assert _value(m, "ocrbooth_finetune_checkpoint_upload_failures_total") == 1
    assert _value(m, "ocrbooth_finetune_checkpoint_upload_duration_seconds_sum") == 2.5
    assert _value(m, "ocrbooth_finetune_loss") == 0.125
    assert _value(m, "ocrbooth_finetune_steps_per_second") == 12.5
    assert forwarded["checkpoint"].uri == "s3://b/jobs/j/checkpoints/step-000100/"
    assert forwarded["progress"].step == 20
    assert forwarded["progress"].max_steps == 800
    assert forwarded["class_images"].generated == 4
    assert forwarded["class_images"].cache_hit is False
    assert forwarded["started"].resumed_from_step == 400
    assert forwarded["samples"].uris == ["s3://b/jobs/j/output/samples/00-00.png"]
    assert forwarded["completed"].artifacts is not None
    assert "pipeline" in forwarded["completed"].artifacts


@pytest.mark.parametrize(
    "line",
    [
        b"Traceback (most recent call last):\n",
        b"[1, 2]\n",
        b'{"no_event": 1}\n',
        b'{"event": "teleported", "step": 1}\n',
        b'{"event": "progress", "step": 1}\n',
        b'{"event": "checkpoint", "step": "ten", "uri": "s3://b/k", "upload_seconds": 1}\n',
        b'{"event": "stopped", "step": 1, "surprise": true}\n',
        b'{"event": "progress", "step": -1, "max_steps": 8, "loss": 1, "learning_rate": 0, "steps_per_second": 1}\n',
        b"\xff\xfe garbage\n",
        b"{" + b" " * (protocol.MAX_LINE_BYTES + 1) + b"}\n",
    ],
)
def test_a_line_that_is_not_an_event_is_counted_and_skipped(
    handler: FinetuneHandler, line: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Malformed, unknown or ill-typed lines return None, log a warning and count a protocol error."""
    assert handler._parse(line, "job-1") is None
    assert _value(handler._metrics(), "ocrbooth_finetune_protocol_errors_total") == 1
    assert any("not a protocol event" in r.getMessage() for r in caplog.records)


def test_blank_lines_are_neither_events_nor_errors(handler: FinetuneHandler) -> None:
    """An empty line is skipped without counting an error."""
    assert handler._parse(b"\n", "job-1") is None
    assert _value(handler._metrics(), "ocrbooth_finetune_protocol_errors_total") == 0
