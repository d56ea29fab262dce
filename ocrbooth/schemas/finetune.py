"""Fine-tune topics: `FinetuneRequest` and `FinetuneControl` in, `FinetuneEvent` out.

Bounds here are sanity only (positive counts, finite numbers, seeds that fit 32 bits). The operator's settings
impose the real limits (`ocrbooth.models.dreambooth.validate_request`), so that an oversized job is failed with
a specific code rather than dead-lettered.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, model_validator

from ocrbooth.schemas.base import S3_URI_PATTERN, ErrorInfo, WireModel

# Job ids name S3 prefixes and checkpoint folders, so no slashes or leading dots.
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

# Lightning and NumPy seed with unsigned 32-bit values (Lightning swaps a larger seed for a random one).
SEED_MAX = 2**32 - 1

JobId = Annotated[
    str,
    Field(
        pattern=JOB_ID_PATTERN,
        description="Job identifier: 1-128 letters, digits, `.`, `_` or `-`; starts with a letter or digit.",
    ),
]


class FinetuneRequest(WireModel):
    """A DreamBooth fine-tuning job for a diffusers Stable Diffusion pipeline. Keyed by `job_id`."""

    job_id: JobId
    base_model: str = Field(
        min_length=1, description="Hub id, local path or S3 URI of a diffusers Stable Diffusion pipeline."
    )
    instance_images: list[Annotated[str, Field(pattern=S3_URI_PATTERN)]] = Field(
        min_length=1, description="Images of the subject: `s3://` object URIs, or one `s3://` prefix."
    )
    instance_prompt: str = Field(min_length=1, description="Prompt naming the subject, e.g. `a photo of sks dog`.")
    class_prompt: str | None = Field(
        default=None,
        min_length=1,
        description="Prompt for the subject's class, e.g. `a photo of dog`; needed for prior preservation.",
    )
    with_prior_preservation: bool = Field(
        default=True, description="Train against generated class images to keep the class prior."
    )
    num_class_images: int = Field(default=100, ge=1, description="Class images to have for prior preservation.")
    prior_loss_weight: float = Field(default=1.0, ge=0.0, description="Weight of the prior-preservation loss.")
    resolution: int = Field(
        default=512, ge=8, multiple_of=8, description="Training image side, in pixels (multiple of 8)."
    )
    center_crop: bool = Field(default=False, description="Center-crop images to `resolution` instead of random crops.")
    train_text_encoder: bool = Field(default=True, description="Also fine-tune the text encoder.")
    max_train_steps: int = Field(default=800, ge=1, description="Optimizer steps to train for.")
    learning_rate: float = Field(default=5e-6, gt=0.0, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        default="constant", description="Learning-rate schedule."
    )
    lr_warmup_steps: int = Field(default=0, ge=0, description="Steps of learning-rate warmup.")
    train_batch_size: int = Field(default=1, ge=1, description="Images per batch per device.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, description="Batches accumulated into one optimizer step."
    )
    mixed_precision: Literal["bf16", "fp16", "no"] = Field(
        default="bf16", description="Mixed-precision mode for training."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Trade compute for memory by recomputing activations."
    )
    seed: int = Field(
        default=0, ge=0, le=SEED_MAX, description="Random seed, for reproducible training (0 to 2^32 - 1)."
    )
    checkpointing_steps: int = Field(default=100, ge=1, description="Save a checkpoint every this many steps.")
    checkpoints_total_limit: int = Field(default=3, ge=1, description="Checkpoints kept; older ones are deleted.")
    validation_prompts: list[str] = Field(
        default_factory=list, description="Prompts to sample with at the end of training; none when empty."
    )
    num_validation_images: int = Field(default=4, ge=1, description="Images sampled per validation prompt.")
    guidance_scale: float = Field(default=7.5, ge=0.0, description="Classifier-free guidance scale for samples.")
    num_inference_steps: int = Field(default=30, ge=1, description="Denoising steps per sample.")
    output_uri: str | None = Field(
        default=None,
        min_length=1,
        description="Where to put the trained pipeline; under the job's own prefix when omitted.",
    )

    @model_validator(mode="after")
    def _class_prompt_for_prior(self) -> FinetuneRequest:
        if self.with_prior_preservation and self.class_prompt is None:
            raise ValueError("`class_prompt` is required when `with_prior_preservation` is true")
        return self


class FinetuneControl(WireModel):
    """An instruction about a running or queued job. Every replica reads every control message."""

    job_id: JobId
    action: Literal["cancel"] = Field(description="What to do with the job.")


FinetuneEventKind = Literal[
    "accepted",
    "class_images",
    "started",
    "progress",
    "checkpoint",
    "samples",
    "completed",
    "failed",
    "cancelled",
]


class FinetuneEvent(WireModel):
    """Something that happened to a job. Keyed by `job_id`; payload fields depend on `event`."""

    job_id: JobId
    event: FinetuneEventKind = Field(description="What happened.")
    seq: int = Field(ge=0, description="Per-job sequence number, increasing with every event of the job.")
    emitted_at: AwareDatetime = Field(description="When the event was emitted (UTC).")
    attempt: int | None = Field(default=None, ge=1, description="Which attempt at the job this is (1-based).")
    generated: int | None = Field(default=None, ge=0, description="`class_images`: class images generated.")
    total: int | None = Field(default=None, ge=0, description="`class_images`: class images wanted.")
    cache_hit: bool | None = Field(
        default=None, description="`class_images`: whether the class images came from an earlier job."
    )
    resumed_from_step: int | None = Field(
        default=None, ge=0, description="`started`: the checkpoint step training resumed from, if any."
    )
    step: int | None = Field(default=None, ge=0, description="`progress`, `checkpoint`: optimizer step reached.")
    max_steps: int | None = Field(default=None, ge=1, description="`progress`: steps the job will train for.")
    loss: float | None = Field(default=None, description="`progress`: recent training loss.")
    learning_rate: float | None = Field(default=None, ge=0.0, description="`progress`: current learning rate.")
    steps_per_second: float | None = Field(default=None, ge=0.0, description="`progress`: recent throughput.")
    uri: str | None = Field(default=None, description="`checkpoint`: S3 URI of the completed checkpoint.")
    uris: list[str] | None = Field(default=None, description="`samples`: S3 URIs of the sample images.")
    artifacts: dict[str, str] | None = Field(
        default=None, description="`completed`: artifact name to S3 URI, e.g. `pipeline`."
    )
    error: ErrorInfo | None = Field(default=None, description="`failed`: why the job failed.")

    @model_validator(mode="after")
    def _error_with_failed(self) -> FinetuneEvent:
        if self.event == "failed" and self.error is None:
            raise ValueError("a `failed` event needs `error`")
        return self
