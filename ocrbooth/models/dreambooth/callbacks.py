"""The training loop's side effects: progress lines, checkpoints (every `checkpointing_steps`, at the last step,
and on SIGTERM), and RNG restoration at the start of a resumed run."""

from __future__ import annotations

import threading
import time
from types import FrameType
from typing import Any

import pytorch_lightning as pl

from ocrbooth.models.dreambooth.checkpoints import restore_rng
from ocrbooth.models.dreambooth.export import write_checkpoint
from ocrbooth.models.dreambooth.job import Job
from ocrbooth.models.dreambooth.module import DreamBoothModule
from ocrbooth.models.dreambooth.protocol import Emitter, ProgressEvent, json_float


class StopFlag:
    """Set by SIGTERM: finish the current step, checkpoint, print `stopped`, exit 3."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def request(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


class StopAgreement:
    """Under DDP every rank must stop at the same step, or the ones that go on wait forever in the next gradient
    all-reduce. The daemon signals the trainer's process group, but each rank may see the signal at a different
    step: at every optimizer step the ranks all-reduce (MAX) their local stop flags, over a CPU (gloo) group so
    that no GPU synchronisation is added, and all stop once any of them was asked to."""

    def __init__(self) -> None:
        self._group: Any = None

    def join(self) -> None:
        """Create the CPU group (collectively: every rank calls this at the same point, e.g. train start)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")

    def __call__(self, local: bool) -> bool:
        """True on every rank when any rank's `local` flag is set (collective: every rank calls it each step)."""
        if self._group is None:
            return local
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())


class JobCallback(pl.Callback):
    """Progress lines every `progress_every_steps` (the only place the host reads the loss), checkpoints, stop."""

    def __init__(
        self, job: Job, events: Emitter, stop: StopFlag, module: DreamBoothModule, config_json: dict[str, Any]
    ) -> None:
        self.job = job
        self.events = events
        self.stop = stop
        self.module = module
        self.config = module.config
        self.saved_step: int | None = job.start_step if job.resume is not None else None
        self.last_step = job.start_step
        self.window_step = job.start_step
        self.window_started = time.monotonic()
        self.config_json = config_json  # the resolved configuration, stored in every checkpoint
        self.agree = StopAgreement()
        self.stopping = False

    def step(self, trainer: pl.Trainer) -> int:
        return self.config.start_step + trainer.global_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.agree.join()
        self.config_json["step"] = self.module.step_kind  # decided in on_fit_start (graph, compiled or eager)
        if self.job.resume is not None:
            restore_rng(self.job.resume.rng())
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            saved = self.job.resume.grad_scaler()
            if scaler is not None and saved is not None:
                scaler.load_state_dict(saved)
        self.window_started = time.monotonic()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self.step(trainer)
        req = self.job.request
        if step == self.last_step:
            if trainer.world_size == 1 and self.stop:
                # Mid-accumulation the weights are still those of the last finished step: that is what gets saved.
                self.stopping = True
                self.save(trainer, step, barrier=False)
                trainer.should_stop = True
            return
        # An optimizer step just finished (under DDP every rank is here together: the agreement is collective).
        self.last_step = step
        if step % self.job.settings.finetune.progress_every_steps == 0 or step == req.max_train_steps:
            self.progress(trainer, step)
        stopping = self.agree(bool(self.stop))
        if step % req.checkpointing_steps == 0 or step == req.max_train_steps or stopping:
            self.save(trainer, step, barrier=trainer.world_size > 1)
        if stopping:
            self.stopping = True
            trainer.should_stop = True

    def progress(self, trainer: pl.Trainer, step: int) -> None:
        loss = self.module.take_mean_loss()  # the host waits for the GPU here, once per progress line
        lr = float(trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0])
        now = time.monotonic()
        rate = (step - self.window_step) / max(now - self.window_started, 1e-9)
        self.window_step, self.window_started = step, now
        if not trainer.is_global_zero:
            return
        finite = json_float(loss) if loss is not None else None
        self.events.emit(
            ProgressEvent(
                step=step,
                max_steps=self.job.request.max_train_steps,
                loss=finite,
                learning_rate=lr,
                steps_per_second=round(rate, 4),
            )
        )
        if trainer.logger is not None and finite is not None:
            trainer.logger.log_metrics({"train/loss": finite, "train/learning_rate": lr}, step=step)

    def save(self, trainer: pl.Trainer, step: int, *, barrier: bool) -> None:
        """Write, upload and mark complete a checkpoint of `step`, then rotate (rank 0; once per step)."""
        if step == self.saved_step or step == 0:
            return
        self.saved_step = step
        if trainer.is_global_zero:
            write_checkpoint(self.job, trainer, self.module, self.events, step, self.config_json)
        if barrier:
            trainer.strategy.barrier("checkpoint")


__all__ = ["JobCallback", "StopAgreement", "StopFlag"]
