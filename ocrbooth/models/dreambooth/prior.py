"""Class images for the prior-preservation loss: generated once per (base model, prompt, resolution, seed, count)
and shared by every later job with the same key through S3.

Layout: `class-images/{key}/00000.png ...` then `class-images/{key}/_COMPLETE`, written last. Image i is always
drawn with seed `seed + i` (one CPU generator per image), so a generation interrupted half-way continues
where it stopped and any batch size yields the same pictures. Guidance scale and denoising steps come from the
request but are not part of the key: any picture of the class serves.

On a GPU, `ClassImageSampler` runs the stock pipeline's own denoising loop with its UNet and VAE prepared for
speed: fused QKV projections, NCHW weights (channels-last was slower here: GroupNorm copies every activation back
to NCHW, 9.5 of 33 ms a UNet step at batch 4 on an H100), the UNet step captured in a CUDA graph (`GraphedUNet`: the
same shapes at every denoising step, so one capture serves the whole job, with no compilation) or, if asked,
compiled with Inductor's CUDA graphs (`reduce-overhead`), classifier-free guidance's two halves in one batched
forward (as the pipeline does), and batches as large as the GPU's free memory allows, evened out over the
images to make (`even_batch`). The last batch is padded to full size so that one captured graph serves every
batch.
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


def even_batch(count: int, largest: int) -> int:
    """The batch size that makes `count` images in as few batches as `largest` would, with the least padding:
    100 images at up to 32 a batch are 4 batches of 25, not 4 of 32 with 28 padding images."""
    if count <= 0:
        return largest
    batches = -(-count // largest)
    return -(-count // batches)


class GraphedUNet:
    """A UNet's forward as CUDA graphs, one per input shape: installed as `unet.forward`, it copies the
    sample, timestep and text embeddings into static buffers and replays the graph captured for their shapes
    (after two eager warm-up calls on a side stream, cuDNN autotuning on). Calls it cannot serve (extra
    conditioning, tensors off the GPU, autograd on) go to the eager forward."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet
        self.eager = unet.forward
        self.graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        extra = args or any(v is not None for v in kwargs.values())
        if extra or torch.is_grad_enabled() or not torch.is_tensor(timestep) or not sample.is_cuda:
            return self.eager(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        inputs = (sample, timestep, encoder_hidden_states)
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(inputs)
        graph, static, out = entry
        for buffer, value in zip(static, inputs, strict=True):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        result = out.clone()  # the graph's output is overwritten by the next replay; schedulers keep theirs
        if not return_dict:
            return (result,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=result)

    def _capture(
        self, inputs: tuple[torch.Tensor, ...]
    ) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]:
        from ocrbooth.models.dreambooth.module import capture_attempts, first_line

        static = tuple(t.clone() for t in inputs)
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its convolution algorithms once
        failure: Exception | None = None
        try:
            for label, attention in capture_attempts():
                try:
                    with attention():
                        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
                        side.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(side):
                            for _ in range(2):
                                self.eager(*static, return_dict=False)
                        torch.cuda.current_stream().wait_stream(side)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            out = self.eager(*static, return_dict=False)[0]
                except Exception as exc:  # capture errors come as RuntimeError, torch.AcceleratorError...
                    log.warning("UNet CUDA graph capture (%s) failed: %s", label, first_line(exc))
                    failure = exc
                    continue
                log.info(
                    "UNet step captured in a CUDA graph", extra={"shape": list(inputs[0].shape), "attention": label}
                )
                return graph, static, out
        finally:
            torch.backends.cudnn.benchmark = benchmark
        assert failure is not None
        raise failure

    def remove(self) -> None:
        """Put the eager forward back and free the graphs."""
        if self.unet.__dict__.get("forward") is self:
            del self.unet.forward
        self.graphs.clear()


class ClassImageSampler:
    """Class images from a StableDiffusionPipeline, prepared for speed on a GPU (see the module docstring):
    `mode` is "graph" (CUDA graph of the UNet step, the default on a GPU: 1.26x the stock pipeline at batch 4
    on an H100), "compiled" (torch.compile reduce-overhead) or "eager" (the CPU, or both off, or after a
    failure). `channels_last` is the benchmark's comparison, off by default."""

    def __init__(
        self,
        pipeline: Any,
        device: torch.device,
        *,
        compile: bool = False,
        graph: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.device = device
        self.mode = "eager"
        self.graphed: GraphedUNet | None = None
        if device.type != "cuda":
            return
        try:
            pipeline.unet.fuse_qkv_projections()
            pipeline.vae.fuse_qkv_projections()
        except (ValueError, AttributeError) as exc:  # models with added KV projections cannot fuse
            log.info("QKV projections not fused: %s", exc)
        if channels_last:
            pipeline.unet.to(memory_format=torch.channels_last)
            pipeline.vae.to(memory_format=torch.channels_last)
        if compile:
            pipeline.unet.compile(mode="reduce-overhead", fullgraph=True, dynamic=False)
            self.mode = "compiled"
        elif graph:
            self.graphed = GraphedUNet(pipeline.unet)
            pipeline.unet.forward = self.graphed
            self.mode = "graph"

    @property
    def compiled(self) -> bool:
        return self.mode == "compiled"

    def _to_eager(self) -> None:
        if self.mode == "compiled":
            torch._dynamo.reset()
            self.pipeline.unet._compiled_call_impl = None
        self.close()
        self.mode = "eager"

    def close(self) -> None:
        """Free the CUDA graphs and their memory (the graphed forward and the UNet refer to each other: without
        this, both would wait for the garbage collector)."""
        if self.graphed is not None:
            self.graphed.remove()
            self.graphed = None
            torch.cuda.empty_cache()

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
        from ocrbooth.models.dreambooth.module import first_line

        seeds = list(seeds)
        padded = seeds
        if self.mode != "eager" and len(seeds) % batch_size:  # one shape for every batch: one CUDA graph
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
            if self.mode == "eager":
                raise
            # Capture errors, and Dynamo/Inductor/Triton's many types: any of them means "sample eagerly".
            log.warning("%s UNet failed; class images are sampled eagerly: %s", self.mode, first_line(exc))
            self._to_eager()
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
    compile: bool = False,
    graph: bool = True,
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
    sampler = ClassImageSampler(pipeline, device, compile=compile, graph=graph)
    size = even_batch(len(missing), batch_size_for(device, resolution, wanted=batch_size))
    log.info("class image batch size", extra={"batch_size": size, "unet_step": sampler.mode})
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
        sampler.close()
        del sampler, pipeline
        if device.type == "cuda":
            torch.cuda.empty_cache()
    s3.put(prefix + COMPLETE_MARKER, json.dumps({"count": count, "class_prompt": class_prompt}).encode())
    return ClassImages([images[i] for i in range(count)], generated, count, False, uri)
