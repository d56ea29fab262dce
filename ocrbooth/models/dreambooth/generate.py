"""Sampling from a Stable Diffusion pipeline: `ocrbooth generate`, the trainer's validation samples and class
images. Image i of a call is drawn with seed `seed + i` on a CPU generator, so results do not depend on the
batch size or the device's RNG."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ocrbooth.config import Settings
from ocrbooth.models.dreambooth.data import S3Objects, resolve_model_dir

log = logging.getLogger(__name__)


def inference_dtype(device: torch.device, mixed_precision: str = "bf16") -> torch.dtype:
    """Half precision on CUDA (bf16 where supported, as asked), float32 on CPU."""
    if device.type != "cuda" or mixed_precision == "no":
        return torch.float32
    if mixed_precision == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def load_pipeline(model_dir: Path, device: torch.device, dtype: torch.dtype, **components: Any) -> Any:
    """A StableDiffusionPipeline from a local diffusers folder (no hub access), progress bars off."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
        str(model_dir), dtype=dtype, local_files_only=True, **components
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def render(
    pipeline: Any,
    prompt: str,
    seeds: Sequence[int],
    *,
    guidance_scale: float,
    num_inference_steps: int,
    resolution: int | None = None,
    batch_size: int = 4,
) -> list[Image.Image]:
    """One image per seed, `batch_size` at a time; classifier-free guidance runs the conditional and
    unconditional halves in one batched forward inside the pipeline."""
    images: list[Image.Image] = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        with torch.inference_mode():
            result = pipeline(
                prompt=[prompt] * len(chunk),
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(s) for s in chunk],
            )
        images += result.images
    return images


def generate(
    model_uri_or_path: str,
    prompt: str,
    *,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 30,
    num_images: int = 1,
    seed: int = 0,
    out_dir: Path,
    settings: Settings,
) -> list[Path]:
    """Sample `num_images` images of `prompt` from a pipeline (local folder, `s3://` prefix or cached hub id)
    into `out_dir` as PNG files; return their paths."""
    s3 = S3Objects(settings)
    model_dir = resolve_model_dir(model_uri_or_path, settings, s3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = load_pipeline(model_dir, device, inference_dtype(device))
    seeds = [seed + i for i in range(num_images)]
    images = render(pipeline, prompt, seeds, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, image in zip(seeds, images, strict=True):
        path = out_dir / f"seed-{s}.png"
        image.save(path)
        paths.append(path)
    log.info("images generated", extra={"model": model_uri_or_path, "count": len(paths)})
    return paths
