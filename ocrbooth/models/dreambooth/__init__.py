"""DreamBooth fine-tuning of diffusers Stable Diffusion pipelines, run as `ocrbooth train JOB.json`.

This package's `__init__` stays light (no torch): the daemon imports `validate_request`, `TrainJob` and
`protocol` from here before it launches anything. The trainer is `train.py` (setup -> main -> fit); its parts:
`module.py` (the LightningModule and its compiled step), `callbacks.py` (progress, checkpoints, SIGTERM),
`export.py` (checkpoint upload, the trained pipeline), `protocol.py` (the stdout events), `job.py` (the resolved
job), `data.py` (instance images and example order), `prior.py` (class images, made or reused),
`checkpoints.py` (checkpoint folders, rotation, RNG), `generate.py` (sampling from a trained pipeline).

JOB.json, written by the daemon, is `TrainJob`'s JSON: ``{"request": {FinetuneRequest}, "attempt": 2}``. A bare
FinetuneRequest object with an optional top-level ``"attempt"`` is accepted too (handy by hand).

Protocol: JSON lines on stdout, one per event, flushed at once; logs go to stderr. One pydantic model per kind in
`protocol.py`, which the trainer emits and the daemon parses (a line that is none of them is logged and counted
in `ocrbooth_finetune_protocol_errors_total`):

    {"event": "class_images", "generated": n, "total": m, "cache_hit": bool, "seconds": s | null}
    {"event": "started", "resumed_from_step": k | null, "attempt": a}
    {"event": "progress", "step", "max_steps", "loss" | null, "learning_rate", "steps_per_second"}
    {"event": "checkpoint", "step", "uri", "upload_seconds"}
    {"event": "checkpoint_failed", "step", "error", "upload_seconds"}      (the trainer then exits; a rerun resumes)
    {"event": "samples", "uris": [...]}
    {"event": "completed", "artifacts": {"unet", "text_encoder"?, "pipeline", "samples", "logs"}}
    {"event": "failed", "code", "message"}
    {"event": "stopped", "step"}

Failure codes (`failed` lines): resolution_out_of_range, too_many_steps, invalid_request (other bounds, an
unreadable JOB.json), source_not_allowed (a bucket outside `s3.allowed_buckets`), base_model_not_allowed,
no_instance_images, invalid_image, image_too_large, source_not_found / source_forbidden (a named object),
unknown_base_model, checkpoint_mismatch (the job's checkpoints were made with other training parameters),
invalid_config (the trainer's own settings).

Exit codes: 0 completed; 2 failed (a `failed` line came first; retrying will not help); 3 stopped by SIGTERM
after a checkpoint; anything else is a crash, resumed from the newest complete checkpoint by a rerun.

S3 layout (bucket `settings.s3.bucket` unless the request's output_uri says otherwise):

    jobs/{job_id}/checkpoints/step-000400/{unet.safetensors, text_encoder.safetensors, optimizer.pt,
        lr_scheduler.pt, rng.pt, state.json, config.json}, then step-000400/_COMPLETE last
    jobs/{job_id}/output/{pipeline/, samples/, logs/}         (default output_uri)
    class-images/{sha256 of base_model, class_prompt, resolution, seed, count}/00000.png ... then _COMPLETE
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ocrbooth.constants import S3_PREFIX_JOBS
from ocrbooth.daemon.config import Settings
from ocrbooth.errors import PoisonError
from ocrbooth.schemas.finetune import FinetuneRequest

EXIT_COMPLETED = 0
EXIT_FAILED = 2  # a `failed` line was printed: retrying will not help
EXIT_STOPPED = 3  # SIGTERM: a checkpoint was written; a rerun resumes from it
PARENT_PID_ENV = "OCRBOOTH_TRAINER_PARENT_PID"  # set by the daemon: the trainer exits when that process dies


class TrainJob(BaseModel):
    """What the trainer is asked to do: the request, and which attempt at it this run is (1-based)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request: FinetuneRequest
    attempt: int = Field(default=1, ge=1)

    @classmethod
    def parse(cls, raw: str | bytes) -> TrainJob:
        """Read JOB.json: ``{"request": ..., "attempt": n}`` or a bare request with an optional ``attempt``.
        Raises PoisonError(invalid_request) when it is not valid."""
        try:
            data: Any = json.loads(raw)
            if isinstance(data, dict) and "request" not in data:
                attempt = data.pop("attempt", 1)
                data = {"request": data, "attempt": attempt}
            return cls.model_validate(data)
        except ValueError as exc:  # json.JSONDecodeError and pydantic.ValidationError are both ValueErrors
            raise PoisonError(f"invalid job file: {exc}", code="invalid_request") from exc


def job_prefix(job_id: str) -> str:
    """The job's own key prefix in the configured bucket: ``jobs/{job_id}/``."""
    return f"{S3_PREFIX_JOBS}{job_id}/"


def output_uri(request: FinetuneRequest, settings: Settings) -> str:
    """Where the trained pipeline, samples and logs go, always ending in ``/``."""
    uri = request.output_uri or f"s3://{settings.s3.bucket}/{job_prefix(request.job_id)}output/"
    return uri if uri.endswith("/") else uri + "/"


def _bucket(uri: str) -> str:
    return uri[5:].partition("/")[0]


def validate_request(req: FinetuneRequest, settings: Settings) -> None:
    """Check the request against the operator's bounds without any I/O; raise PoisonError naming every problem
    (the code is the first problem's)."""
    bounds = settings.finetune
    readable = settings.s3.readable_buckets()
    problems: list[tuple[str, str]] = []
    if not bounds.min_resolution <= req.resolution <= bounds.max_resolution:
        problems.append(
            (
                "resolution_out_of_range",
                f"resolution {req.resolution} is outside [{bounds.min_resolution}, {bounds.max_resolution}]",
            )
        )
    if req.max_train_steps > bounds.max_train_steps:
        problems.append(("too_many_steps", f"max_train_steps {req.max_train_steps} is over {bounds.max_train_steps}"))
    outside = sorted({_bucket(uri) for uri in req.instance_images} - readable)
    if outside:
        problems.append(("source_not_allowed", f"instance images in buckets not allowed: {', '.join(outside)}"))
    if req.base_model.startswith("s3://") and _bucket(req.base_model) not in readable:
        problems.append(("source_not_allowed", f"base model bucket {_bucket(req.base_model)!r} is not allowed"))
    if bounds.allowed_base_models and req.base_model not in bounds.allowed_base_models:
        problems.append(("base_model_not_allowed", f"base model {req.base_model!r} is not in the allowed list"))
    if req.train_batch_size > bounds.max_train_batch_size:
        problems.append(
            ("invalid_request", f"train_batch_size {req.train_batch_size} is over {bounds.max_train_batch_size}")
        )
    if len(req.instance_images) > bounds.max_instance_images:
        problems.append(
            ("invalid_request", f"{len(req.instance_images)} instance images, over {bounds.max_instance_images}")
        )
    if req.with_prior_preservation and req.num_class_images > bounds.max_class_images:
        problems.append(
            ("invalid_request", f"num_class_images {req.num_class_images} is over {bounds.max_class_images}")
        )
    if req.num_validation_images > bounds.max_validation_images:
        problems.append(
            (
                "invalid_request",
                f"num_validation_images {req.num_validation_images} is over {bounds.max_validation_images}",
            )
        )
    if req.output_uri is not None:
        if not req.output_uri.startswith("s3://") or not _bucket(req.output_uri):
            problems.append(("invalid_request", f"output_uri {req.output_uri!r} is not an s3:// URI"))
        elif _bucket(req.output_uri) not in readable | {settings.s3.bucket}:
            problems.append(("source_not_allowed", f"output bucket {_bucket(req.output_uri)!r} is not allowed"))
    if problems:
        raise PoisonError("; ".join(message for _, message in problems), code=problems[0][0])


__all__ = [
    "EXIT_COMPLETED",
    "EXIT_FAILED",
    "EXIT_STOPPED",
    "PARENT_PID_ENV",
    "TrainJob",
    "job_prefix",
    "output_uri",
    "validate_request",
]
