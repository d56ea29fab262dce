"""DreamBooth fine-tuning of diffusers Stable Diffusion pipelines, run as `ocrbooth train JOB.json`.

This package's `__init__` stays light (no torch): the daemon imports `validate_request`, `TrainJob` and
`protocol` from here before it launches anything. The trainer is `train.py` (setup -> main -> fit); its parts:
`module.py` (the LightningModule), `step_graphs.py` (its micro-step as CUDA graphs), `callbacks.py` (progress,
checkpoints, SIGTERM), `export.py` (checkpoint upload, the trained pipeline), `protocol.py` (the stdout events),
`job.py` (the resolved job), `data.py` (instance images and example order), `prior.py` (class images, made or
reused), `checkpoints.py` (checkpoint folders, rotation, RNG), `generate.py` (sampling from a trained pipeline).

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

Failure codes (`failed` lines). Refused by `validate_request`, before any I/O (the daemon runs it before a
request waits for a job slot, and the trainer again at setup), each with the setting that bounds it:

    string_too_long         a prompt (`max_prompt_bytes`), URI (`max_uri_bytes`) or base_model
                            (`max_base_model_bytes`) is too long, in UTF-8 bytes
    invalid_uri             an instance_images entry, an s3:// base_model or output_uri that is not a canonical
                            s3:// URI (`..`, `.`, empty segments, backslashes, control characters)
    resolution_out_of_range resolution outside [`min_resolution`, `max_resolution`]
    too_many_steps          max_train_steps or lr_warmup_steps over `max_train_steps`,
                            gradient_accumulation_steps over `max_gradient_accumulation_steps`,
                            num_inference_steps over `max_inference_steps`
    too_many_images         instance images (`max_instance_images`), num_class_images (`max_class_images`),
                            num_validation_images (`max_validation_images`)
    too_many_prompts        validation_prompts (`max_validation_prompts`)
    too_many_checkpoints    max_train_steps / checkpointing_steps over `max_checkpoints_per_job`, or
                            checkpoints_total_limit over `max_checkpoints_total_limit`
    batch_too_large         train_batch_size over `max_train_batch_size`
    source_not_allowed      instance images or an s3:// base model in a bucket outside `s3.allowed_buckets`
    base_model_not_allowed  base_model not in `allowed_base_models` (hub ids, s3:// prefixes), or a local path
                            while `allow_local_base_models` is off
    output_uri_not_allowed  output_uri outside `s3.output_buckets`, outside the job's own prefix
                            (`jobs/{job_id}/`), or inside its checkpoints

Failed later by the trainer: invalid_request (an unreadable JOB.json), no_instance_images, invalid_image,
image_too_large, source_not_found / source_forbidden (a named object), unknown_base_model, checkpoint_mismatch
(the job's checkpoints were made with other training parameters), invalid_config (the trainer's own settings).

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
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ocrbooth.config import Settings
from ocrbooth.constants import S3_PREFIX_JOBS
from ocrbooth.errors import PoisonError
from ocrbooth.schemas.finetune import FinetuneRequest
from ocrbooth.storage import parse_s3_uri

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


# A Hugging Face hub repository id: `name` or `owner/name`. Anything that is neither this nor `s3://` is taken
# for a local path (which is also what diffusers' from_pretrained would try first).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


# Problems named in one error message; a request with thousands of bad URIs gets a short answer.
_MAX_SHOWN = 10


def _shown(value: str, limit: int = 80) -> str:
    """`value` for an error message: never the whole of a huge string."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _utf8_len(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))


class _Problems:
    """Every refusal of one request, in the order found; the first one's code is the request's."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def add(self, code: str, message: str) -> None:
        self.found.append((code, message))

    def s3_uri(self, field: str, uri: str) -> tuple[str, str] | None:
        """(bucket, key) of a canonical s3:// URI, or None with the problem recorded."""
        try:
            return parse_s3_uri(uri, code="invalid_uri")
        except PoisonError as exc:
            self.add(exc.code, f"{field}: {exc.message}")
            return None

    def raise_any(self) -> None:
        if self.found:
            shown = [message for _, message in self.found[:_MAX_SHOWN]]
            if len(self.found) > _MAX_SHOWN:
                shown.append(f"and {len(self.found) - _MAX_SHOWN} more")
            raise PoisonError("; ".join(shown), code=self.found[0][0])


def _over(problems: _Problems, code: str, field: str, value: int, limit: int) -> None:
    if value > limit:
        problems.add(code, f"{field} {value} is over {limit}")


def validate_request(req: FinetuneRequest, settings: Settings) -> None:
    """Check the request against the operator's bounds without any I/O; raise PoisonError naming every problem
    (the code is the first problem's; the codes are listed in this module's docstring)."""
    bounds = settings.finetune
    problems = _Problems()

    # Strings first: a field that is too long is not looked at any further (nor echoed).
    too_long: set[str] = set()
    strings: list[tuple[str, Sequence[str], int]] = [
        ("base_model", [req.base_model], bounds.max_base_model_bytes),
        ("instance_prompt", [req.instance_prompt], bounds.max_prompt_bytes),
        ("class_prompt", [req.class_prompt] if req.class_prompt is not None else [], bounds.max_prompt_bytes),
        ("validation_prompts", req.validation_prompts, bounds.max_prompt_bytes),
        ("instance_images", req.instance_images, bounds.max_uri_bytes),
        ("output_uri", [req.output_uri] if req.output_uri is not None else [], bounds.max_uri_bytes),
    ]
    for field, values, limit in strings:
        longest = max((_utf8_len(v) for v in values), default=0)
        if longest > limit:
            too_long.add(field)
            problems.add("string_too_long", f"{field} is {longest} bytes long, over {limit}")

    if not bounds.min_resolution <= req.resolution <= bounds.max_resolution:
        problems.add(
            "resolution_out_of_range",
            f"resolution {req.resolution} is outside [{bounds.min_resolution}, {bounds.max_resolution}]",
        )
    _over(problems, "too_many_steps", "max_train_steps", req.max_train_steps, bounds.max_train_steps)
    _over(problems, "too_many_steps", "lr_warmup_steps", req.lr_warmup_steps, bounds.max_train_steps)
    _over(
        problems,
        "too_many_steps",
        "gradient_accumulation_steps",
        req.gradient_accumulation_steps,
        bounds.max_gradient_accumulation_steps,
    )
    _over(problems, "too_many_steps", "num_inference_steps", req.num_inference_steps, bounds.max_inference_steps)
    _over(problems, "too_many_images", "instance_images count", len(req.instance_images), bounds.max_instance_images)
    if req.with_prior_preservation:
        _over(problems, "too_many_images", "num_class_images", req.num_class_images, bounds.max_class_images)
    _over(
        problems,
        "too_many_images",
        "num_validation_images",
        req.num_validation_images,
        bounds.max_validation_images,
    )
    _over(
        problems,
        "too_many_prompts",
        "validation_prompts count",
        len(req.validation_prompts),
        bounds.max_validation_prompts,
    )
    _over(
        problems,
        "too_many_checkpoints",
        "checkpoints written (max_train_steps / checkpointing_steps)",
        req.max_train_steps // req.checkpointing_steps,
        bounds.max_checkpoints_per_job,
    )
    _over(
        problems,
        "too_many_checkpoints",
        "checkpoints_total_limit",
        req.checkpoints_total_limit,
        bounds.max_checkpoints_total_limit,
    )
    _over(problems, "batch_too_large", "train_batch_size", req.train_batch_size, bounds.max_train_batch_size)

    readable = settings.s3.readable_buckets()
    if "instance_images" not in too_long:
        parsed = [problems.s3_uri("instance_images", uri) for uri in req.instance_images]
        outside = sorted({p[0] for p in parsed if p is not None} - readable)
        if outside:
            problems.add("source_not_allowed", f"instance images in buckets not allowed: {', '.join(outside)}")
    if "base_model" not in too_long:
        _check_base_model(problems, req.base_model, settings)
    if req.output_uri is not None and "output_uri" not in too_long:
        _check_output_uri(problems, req.output_uri, req.job_id, settings)
    problems.raise_any()


def _check_base_model(problems: _Problems, model: str, settings: Settings) -> None:
    bounds = settings.finetune
    if model.startswith("s3://"):
        parsed = problems.s3_uri("base_model", model)
        if parsed is None:
            return
        # Our own bucket holds earlier jobs' pipelines, which are fine to build on.
        if parsed[0] not in settings.s3.readable_buckets() | {settings.s3.bucket}:
            problems.add("source_not_allowed", f"base model bucket {parsed[0]!r} is not allowed")
        prefixes = [p if p.endswith("/") else p + "/" for p in bounds.allowed_base_models if p.startswith("s3://")]
        if not any(model == p.removesuffix("/") or model.startswith(p) for p in prefixes):
            problems.add(
                "base_model_not_allowed",
                f"base model {_shown(model)} is under none of the allowed s3:// prefixes "
                "(OCRBOOTH_FINETUNE_ALLOWED_BASE_MODELS)",
            )
    elif _HUB_ID.fullmatch(model) and ".." not in model:
        if model not in bounds.allowed_base_models:
            problems.add(
                "base_model_not_allowed",
                f"base model {_shown(model)} is not in the allowed list (OCRBOOTH_FINETUNE_ALLOWED_BASE_MODELS)",
            )
    elif not bounds.allow_local_base_models:
        problems.add(
            "base_model_not_allowed",
            f"base model {_shown(model)} is a local path, and local paths are not allowed "
            "(OCRBOOTH_FINETUNE_ALLOW_LOCAL_BASE_MODELS)",
        )
    elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in model):
        problems.add("base_model_not_allowed", f"base model path {_shown(model)} contains a control character")


def _check_output_uri(problems: _Problems, uri: str, job_id: str, settings: Settings) -> None:
    parsed = problems.s3_uri("output_uri", uri)
    if parsed is None:
        return
    bucket, key = parsed
    own = job_prefix(job_id)
    folder = key if key.endswith("/") else key + "/"
    if bucket not in settings.s3.writable_buckets():
        problems.add("output_uri_not_allowed", f"output bucket {bucket!r} is not writable (OCRBOOTH_S3_OUTPUT_BUCKETS)")
    elif not folder.startswith(own):
        problems.add("output_uri_not_allowed", f"output_uri must be under s3://{bucket}/{own}, not {_shown(uri)}")
    elif bucket == settings.s3.bucket and folder.startswith(f"{own}checkpoints/"):
        problems.add("output_uri_not_allowed", f"output_uri {_shown(uri)} is inside the job's checkpoints")


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
