"""`finetune`: FinetuneRequest in, a stream of FinetuneEvents out, training in `ocrbooth train` subprocesses.

The request's offset is committed only when the job reaches a terminal state (completed, failed,
cancelled): `handle` runs as long as the job does. A daemon killed mid-training leaves the request
uncommitted; after the rebalance another replica picks it up and the trainer resumes from the newest
complete checkpoint in S3. On shutdown the trainers are told to checkpoint and stop, and the request is
left uncommitted (RequeueError). A crashing trainer is restarted from its checkpoint up to `max_attempts`.
Cancels arrive on `finetune.control`, which every replica reads in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from ocrbooth import constants
from ocrbooth.config import Settings
from ocrbooth.errors import PoisonError, RequeueError, RetryableError
from ocrbooth.handlers.base import Handler, HandlerRuntime
from ocrbooth.messages import MessageContext, OutputEvent
from ocrbooth.metrics import Metrics
from ocrbooth.models.dreambooth import EXIT_FAILED, EXIT_STOPPED, PARENT_PID_ENV, protocol, validate_request
from ocrbooth.schemas import ErrorInfo, FinetuneControl, FinetuneEvent, FinetuneRequest
from ocrbooth.schemas.finetune import FinetuneEventKind

log = logging.getLogger(__name__)


# Trainer events that go on to the job's event stream, and the FinetuneEvent kind each becomes.
_STREAMED: dict[type[protocol.TrainerEvent], FinetuneEventKind] = {
    protocol.ClassImagesEvent: "class_images",
    protocol.StartedEvent: "started",
    protocol.ProgressEvent: "progress",
    protocol.CheckpointEvent: "checkpoint",
    protocol.SamplesEvent: "samples",
}


class _Seq:
    """Per-job event numbers that keep increasing across replicas: milliseconds since the epoch, made
    strictly increasing within this process (a replica taking over later starts later)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, int(time.time() * 1000))
        return self._last


class _Job:
    def __init__(self, request: FinetuneRequest, ctx: MessageContext) -> None:
        self.request = request
        self.ctx = ctx
        self.seq = _Seq()
        self.proc: asyncio.subprocess.Process | None = None
        self.cancelled = asyncio.Event()
        self.stopping = False


class FinetuneHandler(Handler[FinetuneRequest]):
    """Runs DreamBooth jobs as subprocesses, at most `max_concurrent_jobs` at a time on this daemon."""

    name = "finetune"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.cfg = settings.finetune
        self.max_concurrency = self.cfg.max_concurrent_jobs
        self._runtime: HandlerRuntime | None = None
        self._jobs: dict[str, _Job] = {}
        self._cancelled: set[str] = set()
        self._draining = False

    def input_topics(self) -> Mapping[str, type[FinetuneRequest]]:
        return {self.settings.topics.finetune_requests: FinetuneRequest}

    def broadcast_topics(self) -> Mapping[str, type[BaseModel]]:
        return {self.settings.topics.finetune_control: FinetuneControl}

    async def start(self, runtime: HandlerRuntime) -> None:
        self._runtime = runtime
        runtime.metrics.init_finetune()
        self.cfg.workdir.mkdir(parents=True, exist_ok=True)

    async def drain(self) -> None:
        """Tell every trainer to checkpoint and stop; their requests stay uncommitted for another replica."""
        self._draining = True
        for job in self._jobs.values():
            job.stopping = True
            _signal(job.proc, signal.SIGTERM)

    # ---- control -----------------------------------------------------------------------------------

    async def on_broadcast(self, event: BaseModel, ctx: MessageContext) -> None:
        if not isinstance(event, FinetuneControl):  # one broadcast topic today; a second would get its own branch
            raise PoisonError(f"unexpected {type(event).__name__} on a control topic", code="schema_violation")
        if event.action != "cancel" or event.job_id in self._cancelled:
            return
        self._cancelled.add(event.job_id)
        log.info("cancel received", extra={"job_id": event.job_id})
        # Remembered in S3 too, so that a replica started later (or a restarted one) never starts the job.
        await self._put_json(event.job_id, "cancel.json", {"cancelled_at": _now().isoformat()})
        job = self._jobs.get(event.job_id)
        if job is not None:
            job.cancelled.set()
            _signal(job.proc, signal.SIGTERM)

    # ---- jobs --------------------------------------------------------------------------------------

    def validate(self, event: FinetuneRequest) -> None:
        validate_request(event, self.settings)

    async def handle(self, event: FinetuneRequest, ctx: MessageContext) -> Sequence[OutputEvent]:
        validate_request(event, self.settings)  # bounds first: a bad request fails before any GPU work
        job = _Job(event, ctx)
        state = await self._get_json(event.job_id, "state.json")
        if state and state.get("status") == "completed":
            log.info("job already completed; republishing its result", extra={"job_id": event.job_id})
            return [self._event(job, "completed", artifacts=state.get("artifacts") or {})]
        if event.job_id in self._cancelled or await self._get_json(event.job_id, "cancel.json") is not None:
            await self._set_state(event.job_id, "cancelled")
            return [self._event(job, "cancelled")]
        if event.job_id in self._jobs:
            # A redelivered or repeated request while the job runs here: the running one will report.
            log.info("job already running on this daemon; duplicate request ignored", extra={"job_id": event.job_id})
            return []
        self._jobs[event.job_id] = job
        metrics = self._metrics()
        metrics.finetune_running.inc()
        outcome = "failed"
        try:
            await self._publish(job, [self._event(job, "accepted")])
            await self._put_json(event.job_id, "request.json", json.loads(event.model_dump_json()))
            outputs = await self._run(job)
            last = outputs[-1].value if outputs else None
            outcome = last.event if isinstance(last, FinetuneEvent) else "completed"
            return outputs
        except RequeueError:
            outcome = "requeued"
            raise
        finally:
            self._jobs.pop(event.job_id, None)
            metrics.finetune_running.dec()
            metrics.finetune_jobs.labels(outcome).inc()

    async def _run(self, job: _Job) -> Sequence[OutputEvent]:
        req = job.request
        previous = int((await self._get_json(req.job_id, "state.json") or {}).get("attempts", 0))
        for attempt in itertools.count(previous + 1):
            if attempt > previous + self.cfg.max_attempts:
                await self._set_state(req.job_id, "failed")
                error = ErrorInfo(code="trainer_crashed", message=f"the trainer crashed {self.cfg.max_attempts} times")
                return [self._event(job, "failed", attempt=attempt - 1, error=error)]
            self._metrics().finetune_trainer_restarts.inc(attempt > previous + 1)  # this run replaces a crashed one
            await self._set_state(req.job_id, "running", attempts=attempt)
            code, terminal = await self._attempt(job, attempt)
            if job.cancelled.is_set():
                await self._set_state(req.job_id, "cancelled", attempts=attempt)
                return [self._event(job, "cancelled", attempt=attempt)]
            if terminal is not None:
                return [terminal]
            if code == EXIT_STOPPED or job.stopping:
                raise RequeueError(f"job {req.job_id} stopped at shutdown; it resumes from its checkpoint")
            log.warning(
                "trainer exited with %s; restarting from the last checkpoint", code, extra={"job_id": req.job_id}
            )
        raise AssertionError("unreachable")

    async def _attempt(self, job: _Job, attempt: int) -> tuple[int, OutputEvent | None]:
        """One trainer run: stream its events; return (exit code, terminal event or None)."""
        req = job.request
        workdir = self.cfg.workdir / req.job_id
        workdir.mkdir(parents=True, exist_ok=True)
        job_file = workdir / "job.json"
        job_file.write_text(json.dumps({"request": json.loads(req.model_dump_json()), "attempt": attempt}))
        self._metrics().finetune_last_progress.set_to_current_time()  # a fresh trainer counts as progress
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ocrbooth.models.dreambooth.train",
            str(job_file),
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # the trainer's log goes to ours
            cwd=workdir,
            env={**os.environ, PARENT_PID_ENV: str(os.getpid())},
            # Its own process group: signals reach every rank of a multi-GPU job (Lightning starts ranks 1.. as
            # rank 0's children), and a kill at the drain deadline leaves no rank behind.
            start_new_session=True,
        )
        job.proc = proc
        if self._draining or job.cancelled.is_set():
            _signal(proc, signal.SIGTERM)
        terminal: OutputEvent | None = None
        assert proc.stdout is not None
        try:
            async for raw in proc.stdout:
                line = self._parse(raw, req.job_id)
                if line is None:
                    continue
                self._observe(line)
                if isinstance(line, protocol.CompletedEvent):
                    await self._set_state(req.job_id, "completed", attempts=attempt, artifacts=line.artifacts)
                    terminal = self._event(job, "completed", attempt=attempt, **line.forwarded())
                elif isinstance(line, protocol.FailedEvent):
                    await self._set_state(req.job_id, "failed", attempts=attempt)
                    error = ErrorInfo(code=line.code, message=line.message)
                    terminal = self._event(job, "failed", attempt=attempt, error=error)
                elif type(line) in _STREAMED:
                    kind = _STREAMED[type(line)]
                    await self._publish(job, [self._event(job, kind, attempt=attempt, **line.forwarded())])
                # `checkpoint_failed` and `stopped` only feed metrics and logs; the exit code says the rest
            code = await proc.wait()
        finally:
            if proc.returncode is None:
                # Cancelled (the drain deadline passed, or the daemon is going down): no rank may outlive us.
                _signal(proc, signal.SIGKILL)
        job.proc = None
        if (
            terminal is not None
            and isinstance(terminal.value, FinetuneEvent)
            and terminal.value.event == "failed"
            and code != EXIT_FAILED
        ):
            log.warning("trainer printed `failed` but exited %s", code)
        return code, terminal

    # ---- events and state ----------------------------------------------------------------------------

    def _metrics(self) -> Metrics:
        assert self._runtime is not None
        return self._runtime.metrics

    def _parse(self, raw: bytes, job_id: str) -> protocol.TrainerEvent | None:
        """One trainer stdout line as its event; a line that is not one is logged, counted and skipped (a broken
        or mismatched trainer must not take the handler down)."""
        try:
            return protocol.parse_line(raw)
        except protocol.ProtocolError as exc:
            self._metrics().finetune_protocol_errors.inc()
            log.warning(
                "trainer line is not a protocol event: %s",
                exc,
                extra={"job_id": job_id, "line": raw[:200].decode("utf-8", "replace")},
            )
            return None

    def _observe(self, line: protocol.TrainerEvent) -> None:
        m = self._metrics()
        if isinstance(line, protocol.ProgressEvent):
            m.finetune_steps.inc(self.cfg.progress_every_steps)
            m.finetune_last_progress.set_to_current_time()
            m.finetune_steps_per_second.set(line.steps_per_second)
            if line.loss is not None:
                m.finetune_loss.set(line.loss)
        elif isinstance(line, protocol.StartedEvent | protocol.ClassImagesEvent):
            m.finetune_last_progress.set_to_current_time()
        elif isinstance(line, protocol.CheckpointEvent):
            m.finetune_checkpoints.inc()
            m.finetune_last_progress.set_to_current_time()
            m.finetune_checkpoint_upload_seconds.observe(line.upload_seconds)
        elif isinstance(line, protocol.CheckpointFailedEvent):
            m.finetune_checkpoint_failures.inc()
            log.warning(
                "checkpoint upload failed",
                extra={"step": line.step, "error": line.error, "upload_seconds": line.upload_seconds},
            )

    def _event(self, job: _Job, kind: FinetuneEventKind, **fields: Any) -> OutputEvent:
        value = FinetuneEvent(job_id=job.request.job_id, event=kind, seq=job.seq.next(), emitted_at=_now(), **fields)
        return OutputEvent(self.settings.topics.finetune_events, job.request.job_id, value)

    async def _publish(self, job: _Job, events: Sequence[OutputEvent]) -> None:
        assert self._runtime is not None
        await self._runtime.publish(events, job.ctx)

    def failure_outputs(self, event: FinetuneRequest, ctx: MessageContext, error: ErrorInfo) -> Sequence[OutputEvent]:
        value = FinetuneEvent(job_id=event.job_id, event="failed", seq=_Seq().next(), emitted_at=_now(), error=error)
        return [OutputEvent(self.settings.topics.finetune_events, event.job_id, value)]

    def _key(self, job_id: str, name: str) -> str:
        return f"{constants.S3_PREFIX_JOBS}{job_id}/{name}"

    async def _put_json(self, job_id: str, name: str, data: dict[str, Any]) -> None:
        assert self._runtime is not None
        await self._runtime.storage.put(
            self._key(job_id, name), json.dumps(data).encode(), content_type="application/json"
        )

    async def _get_json(self, job_id: str, name: str) -> dict[str, Any] | None:
        assert self._runtime is not None
        storage = self._runtime.storage
        uri = storage.uri(self._key(job_id, name))
        try:
            data = json.loads(await storage.get(uri))
        except PoisonError as exc:
            if exc.code == "source_not_found":
                return None
            raise RetryableError(f"job state {uri} unreadable: {exc}", code="storage_unavailable") from exc
        return data if isinstance(data, dict) else None

    async def _set_state(self, job_id: str, status: str, **extra: Any) -> None:
        state = await self._get_json(job_id, "state.json") or {}
        state.update(extra, status=status, updated_at=_now().isoformat())
        await self._put_json(job_id, "state.json", state)


def _now() -> datetime:
    return datetime.now(UTC)


def _signal(proc: asyncio.subprocess.Process | None, sig: signal.Signals) -> None:
    """Signal a trainer's whole process group (every DDP rank); the ranks agree on the step to stop at."""
    if proc is not None and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
