"""The tiny Stable Diffusion factory lives in the package (the demo uses it too); tests import it from here,
with the request of a job small enough to train on a CPU in seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ocrbooth.testing.tiny_sd import build_tiny_sd, make_instance_images

__all__ = ["LOCAL_BASE_MODELS_ENV", "build_tiny_sd", "make_instance_images", "tiny_job_request"]

# The tiny model is a local path, which the daemon and the trainer refuse unless told otherwise.
LOCAL_BASE_MODELS_ENV = {"OCRBOOTH_FINETUNE_ALLOW_LOCAL_BASE_MODELS": "true"}


def tiny_job_request(job_id: str, base: Path, images: str, **overrides: Any) -> bytes:
    """A FinetuneRequest for the tiny model at `base` with the subject photos under `images` (an S3 prefix):
    64 px, 4 steps, checkpoints every 2, two class images; `overrides` replace any field."""
    fields: dict[str, Any] = {
        "job_id": job_id,
        "base_model": str(base),
        "instance_images": [images],
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of dog",
        "num_class_images": 2,
        "resolution": 64,
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "checkpoints_total_limit": 2,
        "learning_rate": 1e-3,
        "mixed_precision": "no",
        "num_inference_steps": 2,
        "num_validation_images": 1,
        "seed": 3,
    }
    return json.dumps(fields | overrides).encode()
