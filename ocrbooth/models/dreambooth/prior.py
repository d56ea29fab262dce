"""Class images for the prior-preservation loss: generated once per (base model, prompt, resolution, seed, count)
and shared by every later job with the same key through S3.

Layout: `class-images/{key}/00000.png ...` then `class-images/{key}/_COMPLETE`, written last. Image i is always
drawn with seed `seed + i` (one CPU generator per image), so a generation interrupted half-way continues
where it stopped and any batch size yields the same pictures. Guidance scale and denoising steps come from the
request but are not part of the key: any picture of the class serves.

On a GPU, `ClassImageSampler` runs the stock pipeline's own denoising loop with its UNet and VAE prepared for
speed: fused QKV projections, channels-last weights, the UNet compiled with CUDA graphs (`reduce-overhead`: the
same shapes at every denoising step), classifier-free guidance's two halves in one batched forward (as the
pipeline does), and a batch size chosen from the GPU's free memory. The last batch is padded to full size so that
one captured graph serves every batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ocrbooth.constants import S3_PREFIX_CLASS_IMAGES
from ocrbooth.models.dreambooth.data import S3Objects, decode_image

log = logging.getLogger(__name__)


COMPLETE_MARKER = "_COMPLETE"
MAX_BATCH = 32
# GPU memory one image of a batch needs at 512 px in bf16 (CFG doubles the UNet rows; the VAE decodes the whole
# batch at full resolution, which is most of it), with headroom. Scaled by pixel count for other resolutions.
_BYTES_PER_IMAGE_512 = 1_600 * 2**20


def batch_size_for(device: torch.device, resolution: int, *, wanted: int | None = None) -> int:
    """`wanted` if given, else as many images as fit in half the GPU's free memory (at most MAX_BATCH); 4 on
    the CPU."""
    if wanted:
        return wanted
    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    per_image = _BYTES_PER_IMAGE_512 * (resolution / 512) ** 2
    return max(1, min(MAX_BATCH, int(free * 0.5 // per_image)))


class ClassImageSampler:
    """Class images from a StableDiffusionPipeline, prepared for speed on a GPU (see the module docstring)."""

    def __init__(self, pipeline: Any, device: torch.device, *, compile: bool) -> None:
        self.pipeline = pipeline
        self.device = device
        self.compiled = False
        if device.type != "cuda":
            return
        try:
            pipeline.unet.fuse_qkv_projections()
            pipeline.vae.fuse_qkv_projections()
        except (ValueError, AttributeError) as exc:  # models with added KV projections cannot fuse
            log.info("QKV projections not fused: %s", exc)
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
        if compile:
            pipeline.unet.compile(mode="reduce-overhead", fullgraph=True, dynamic=False)
            self.compiled = True

    def sample(
        self,
        prompt: str,
        seeds: Sequence[int],
        *,
        guidance_scale: float,
        num_inference_steps: int,
        resolution: int,
        batch_size: int,
    ) -> list[Image.Image]:
        """One image per seed (image i drawn from seed `seeds[i]` on the CPU, whatever the batch size)."""
        from ocrbooth.models.dreambooth.generate import render

        seeds = list(seeds)
        padded = seeds
        if self.compiled and len(seeds) % batch_size:  # one shape for every batch: one CUDA graph
            padded = seeds + [seeds[-1]] * (batch_size - len(seeds) % batch_size)
        try:
            images = render(
                self.pipeline,
                prompt,
                padded,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                resolution=resolution,
                batch_size=batch_size,
            )
        except Exception as exc:
            if not self.compiled:
                raise
            # Dynamo/Inductor/Triton raise many types; any of them means "sample eagerly".
            log.warning("compiled UNet failed; class images are sampled eagerly: %s", str(exc).splitlines()[0][:300])
            torch._dynamo.reset()
            self.pipeline.unet._compiled_call_impl = None
            self.compiled = False
            return self.sample(
                prompt,
                seeds,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                resolution=resolution,
                batch_size=batch_size,
            )
        return images[: len(seeds)]


@dataclass(frozen=True)
class ClassImages:
    """The class images of a job, and how they were obtained."""

    images: list[Image.Image]
    generated: int
    """Images generated by this run (0 on a cache hit)."""
    total: int
    cache_hit: bool
    """True when a complete set from an earlier job was reused."""
    uri: str


def class_images_key(base_model: str, class_prompt: str, resolution: int, seed: int, count: int) -> str:
    """The cache key: sha256 of the inputs that decide which pictures a job gets."""
    payload = json.dumps(
        {
            "base_model": base_model,
            "class_prompt": class_prompt,
            "resolution": resolution,
            "seed": seed,
            "count": count,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _image_name(index: int) -> str:
    return f"{index:05d}.png"


def ensure_class_images(
    s3: S3Objects,
    *,
    model_dir: Path,
    base_model: str,
    class_prompt: str,
    resolution: int,
    seed: int,
    count: int,
    guidance_scale: float,
    num_inference_steps: int,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int | None = None,
    compile: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
) -> ClassImages | None:
    """Reuse the cached class images or generate the missing ones; None when `should_stop()` turned true."""
    key = class_images_key(base_model, class_prompt, resolution, seed, count)
    prefix = f"{S3_PREFIX_CLASS_IMAGES}{key}/"
    uri = s3.uri(prefix)
    names = {o.key[len(prefix) :] for o in s3.list_objects(s3.bucket, prefix)}
    cache_hit = COMPLETE_MARKER in names
    images: dict[int, Image.Image] = {}
    for i in range(count):
        if _image_name(i) in names:
            images[i] = decode_image(s3.get(s3.bucket, prefix + _image_name(i)), f"{uri}{_image_name(i)}")
    missing = [i for i in range(count) if i not in images]
    if cache_hit and not missing:
        log.info("class images reused", extra={"uri": uri, "count": count})
        return ClassImages([images[i] for i in range(count)], 0, count, True, uri)

    log.info("generating class images", extra={"uri": uri, "missing": len(missing), "count": count})
    from ocrbooth.models.dreambooth.generate import load_pipeline

    pipeline = load_pipeline(model_dir, device, dtype, safety_checker=None, requires_safety_checker=False)
    sampler = ClassImageSampler(pipeline, device, compile=compile)
    size = batch_size_for(device, resolution, wanted=batch_size)
    log.info("class image batch size", extra={"batch_size": size, "compiled": sampler.compiled})
    generated = 0
    try:
        for start in range(0, len(missing), size):
            if should_stop():
                return None
            batch = missing[start : start + size]
            pictures = sampler.sample(
                class_prompt,
                [seed + i for i in batch],
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                resolution=resolution,
                batch_size=size,
            )
            for i, image in zip(batch, pictures, strict=True):
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                s3.put(prefix + _image_name(i), buf.getvalue())
                images[i] = decode_image(buf.getvalue(), f"{uri}{_image_name(i)}")  # as a cache hit would see it
            generated += len(batch)
    finally:
        del sampler, pipeline
        if device.type == "cuda":
            torch.cuda.empty_cache()
    s3.put(prefix + COMPLETE_MARKER, json.dumps({"count": count, "class_prompt": class_prompt}).encode())
    return ClassImages([images[i] for i in range(count)], generated, count, False, uri)
