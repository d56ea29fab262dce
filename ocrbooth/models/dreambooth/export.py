"""What the trainer writes out: checkpoints (written, uploaded, marked complete, rotated), the TensorBoard logs,
and at the end the trained pipeline with its validation samples."""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

import pytorch_lightning as pl
import torch

from ocrbooth.models.dreambooth.checkpoint_names import checkpoint_name
from ocrbooth.models.dreambooth.checkpoints import capture_rng, save_checkpoint
from ocrbooth.models.dreambooth.data import DataState
from ocrbooth.models.dreambooth.generate import inference_dtype, load_pipeline, render
from ocrbooth.models.dreambooth.job import Job
from ocrbooth.models.dreambooth.module import DreamBoothModule
from ocrbooth.models.dreambooth.protocol import (
    CheckpointEvent,
    CheckpointFailedEvent,
    CompletedEvent,
    Emitter,
    SamplesEvent,
)
from ocrbooth.storage import parse_s3_uri

log = logging.getLogger(__name__)


def write_checkpoint(
    job: Job,
    trainer: pl.Trainer,
    module: DreamBoothModule,
    events: Emitter,
    step: int,
    config_json: dict[str, Any],
) -> None:
    """Write the checkpoint of `step` locally, upload it and mark it complete, emit `checkpoint`, rotate, upload
    the logs. On an upload error: emit `checkpoint_failed` and raise (the trainer dies; its rerun resumes from
    the previous complete checkpoint, since this one has no _COMPLETE marker)."""
    cfg = module.config
    examples_per_step = cfg.batch_size * cfg.accumulation * trainer.world_size
    data = DataState(cfg.consumed_examples + (step - cfg.start_step) * examples_per_step, len(module.dataset))
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    text_encoder = module.text_encoder
    local = save_checkpoint(
        job.workdir / "checkpoints" / checkpoint_name(step),
        step=step,
        unet=module.unet.state_dict(),
        text_encoder=text_encoder.state_dict() if text_encoder is not None else None,
        optimizer=trainer.optimizers[0].state_dict(),
        lr_scheduler=trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        grad_scaler=scaler.state_dict() if scaler is not None else None,
        rng=capture_rng(),
        data=data.to_json(),
        config=config_json,
    )
    started = time.monotonic()
    try:
        uri = job.store.upload(local, step)
    except Exception as exc:
        events.emit(
            CheckpointFailedEvent(
                step=step,
                error=f"{type(exc).__name__}: {exc}"[:500],
                upload_seconds=round(time.monotonic() - started, 3),
            )
        )
        raise
    upload_seconds = round(time.monotonic() - started, 3)
    shutil.rmtree(local, ignore_errors=True)
    events.emit(CheckpointEvent(step=step, uri=uri, upload_seconds=upload_seconds))
    job.store.rotate(job.request.checkpoints_total_limit)
    upload_logs(job, trainer)


def upload_logs(job: Job, trainer: pl.Trainer | None) -> str:
    """Flush the TensorBoard logs and upload them under the output prefix; return their URI."""
    if trainer is not None and trainer.logger is not None:
        trainer.logger.save()
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "flush"):
            experiment.flush()
    bucket, key = parse_s3_uri(job.output_uri)
    logs = job.workdir / "logs"
    if logs.is_dir():
        job.s3.upload_dir(logs, bucket, key + "logs/")
    return f"{job.output_uri}logs/"


def export_pipeline(
    job: Job, module: DreamBoothModule, device: torch.device, events: Emitter, should_stop: Any
) -> bool:
    """Save the trained pipeline in diffusers format, sample validation images, upload both and the logs; emit
    `samples` and `completed`. False if `should_stop()` turned true first."""
    req = job.request
    bucket, prefix = parse_s3_uri(job.output_uri)
    local = job.workdir / "export"
    shutil.rmtree(local, ignore_errors=True)
    components: dict[str, Any] = {"unet": module.unet.eval()}
    if module.text_encoder is not None:
        components["text_encoder"] = module.text_encoder.eval()
    pipeline = load_pipeline(job.model_dir, torch.device("cpu"), torch.float32, **components)
    pipeline.save_pretrained(str(local / "pipeline"), safe_serialization=True)
    job.s3.upload_dir(local / "pipeline", bucket, prefix + "pipeline/")
    if should_stop():
        return False

    pipeline.to(device, inference_dtype(device, req.mixed_precision))
    uris = []
    for p, prompt in enumerate(req.validation_prompts or [req.instance_prompt]):
        seeds = [req.seed + i for i in range(req.num_validation_images)]
        images = render(
            pipeline,
            prompt,
            seeds,
            guidance_scale=req.guidance_scale,
            num_inference_steps=req.num_inference_steps,
            resolution=req.resolution,
        )
        for i, image in enumerate(images):
            path = local / "samples" / f"{p:02d}-{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            uris.append(job.s3.upload_file(path, bucket, f"{prefix}samples/{path.name}"))
    events.emit(SamplesEvent(uris=uris))
    artifacts = {
        "unet": f"{job.output_uri}pipeline/unet/",
        "pipeline": f"{job.output_uri}pipeline/",
        "samples": f"{job.output_uri}samples/",
        "logs": upload_logs(job, None),
    }
    if module.text_encoder is not None:
        artifacts["text_encoder"] = f"{job.output_uri}pipeline/text_encoder/"
    events.emit(CompletedEvent(artifacts=artifacts))
    return True


__all__ = ["export_pipeline", "upload_logs", "write_checkpoint"]
