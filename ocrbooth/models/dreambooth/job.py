"""`Job`: a validated DreamBooth job with every input resolved, what `train.setup` hands to the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ocrbooth.config import Settings
from ocrbooth.models.dreambooth.checkpoints import Checkpoint, CheckpointStore
from ocrbooth.models.dreambooth.data import S3Objects
from ocrbooth.schemas.finetune import FinetuneRequest

# Request fields that do not change the trained weights; the rest must match a checkpoint to resume from it.
_NOT_TRAINING = frozenset(
    {
        "schema_version",
        "validation_prompts",
        "num_validation_images",
        "guidance_scale",
        "num_inference_steps",
        "output_uri",
        "checkpointing_steps",
        "checkpoints_total_limit",
    }
)


@dataclass
class Job:
    """A validated job with every input resolved."""

    request: FinetuneRequest
    attempt: int
    settings: Settings
    s3: S3Objects
    store: CheckpointStore
    workdir: Path
    model_dir: Path
    instance_images: list[Image.Image]
    output_uri: str
    resume: Checkpoint | None
    signature: dict[str, Any] = field(default_factory=dict)

    @property
    def start_step(self) -> int:
        return self.resume.step if self.resume is not None else 0


def training_signature(request: FinetuneRequest) -> dict[str, Any]:
    """The request fields that decide the trained weights (a checkpoint is only resumed under the same ones)."""
    return {k: v for k, v in request.model_dump(mode="json").items() if k not in _NOT_TRAINING}


__all__ = ["Job", "training_signature"]
