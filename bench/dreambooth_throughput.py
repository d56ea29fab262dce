"""DreamBooth training throughput on the GPU: ocrbooth's trainer step against a typical script's step.

Full-size Stable Diffusion 1.5 architecture (UNet 860M, VAE, CLIP ViT-L/14 text encoder) with random weights,
512 px, prior preservation (1 instance + 1 class example per step), AdamW, bf16 autocast over float32
master weights on both sides. Throughput does not depend on the weight values.

- **ocrbooth**: `DreamBoothModule` (`ocrbooth.models.dreambooth.module`) under a Lightning `Trainer` (precision
  `bf16-mixed`) exactly as the trainer subprocess runs it: VAE latents precomputed once and kept on the GPU
  (with the text encoder frozen its two prompt embeddings too), fused AdamW, channels-last, clipping 1.0, no
  host sync per step, and the step chosen by `--rows`: `graph` (the default: forward + backward replayed from
  CUDA graphs), `eager` (graphs off), or an Inductor mode (`default`, `reduce-overhead`, ...: torch.compile).
- **reference**: what a typical DreamBooth script does every step: encode both images with the VAE, run the
  text encoder, UNet forward/backward, AdamW (default for-each), clip, `loss.item()` for the progress bar
  (float32 weights under bf16 autocast).

Also: class images/s of the stock `StableDiffusionPipeline` in bfloat16 (batch 4, 50 steps, guidance 7.5, 512 px,
what a typical DreamBooth script uses) against `prior.ClassImageSampler` (fused QKV, channels-last, the UNet step
in a CUDA graph) at batch 4 and at the batch it picks from free memory, same settings; an 800-step job's wall
time (setup, capture or compilation included) for every trainer row, and the time to make 100 class images;
the two ceilings of the card (bf16 matrix product, device copy) and the FLOPs of a step, for floors; and a
torch.profiler summary of a few steps of each row (kernel time against wall time) saying where the time goes.

    python bench/dreambooth_throughput.py --out DIR       # on the GPU machine; writes DIR/dreambooth_throughput.json
    python bench/dreambooth_throughput.py --plot-only bench/results/dreambooth_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

from bench.gpu_profile import profile_call, summarise

RESOLUTION = 512
LATENT = RESOLUTION // 8
HIDDEN = 768
DEVICE = "cuda"  # `--dry-run`: "cpu", with a tiny model at 64 px, to check the script's plumbing anywhere


def dry_run() -> None:
    global RESOLUTION, LATENT, HIDDEN, DEVICE
    RESOLUTION, LATENT, HIDDEN, DEVICE = 64, 8, 32, "cpu"


def _components(device: Any) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: random init of 1B parameters on the CPU takes minutes
        return _build(UNet2DConditionModel, AutoencoderKL, CLIPTextConfig, CLIPTextModel, DDPMScheduler)


def _build(
    UNet2DConditionModel: Any, AutoencoderKL: Any, CLIPTextConfig: Any, CLIPTextModel: Any, DDPMScheduler: Any
) -> dict[str, Any]:
    full = DEVICE == "cuda"
    tiny_blocks = {
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    }
    unet = UNet2DConditionModel(
        sample_size=LATENT,
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280) if full else (32, 64),
        layers_per_block=2 if full else 1,
        **({} if full else tiny_blocks),
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * (4 if full else 2),
        up_block_types=("UpDecoderBlock2D",) * (4 if full else 2),
        block_out_channels=(128, 256, 512, 512) if full else (32, 64),
        layers_per_block=2 if full else 1,
        latent_channels=4,
        sample_size=RESOLUTION,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=HIDDEN,
            intermediate_size=3072 if full else 37,
            num_hidden_layers=12 if full else 2,
            num_attention_heads=12 if full else 4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


JOB_STEPS = 800


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak() -> tuple[float, float]:
    """Peak allocated and peak reserved GiB since the last `_reset_peak` (NaN on the CPU)."""
    import torch

    if DEVICE != "cuda":
        return float("nan"), float("nan")
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def _empty_cache() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _job_seconds(first_seconds: float, warmup: int, steps_per_s: float) -> float:
    """An 800-step job: the measured time to the end of the warm-up steps (compilation included) plus the
    remaining steps at the measured steady rate."""
    return first_seconds + (JOB_STEPS - warmup) / steps_per_s


def bench_ours(
    train_text_encoder: bool, steps: int, warmup: int, *, mode: str, profile_steps: int = 0
) -> dict[str, Any]:
    """ocrbooth's module and Lightning trainer; timed between two syncs after the warm-up steps (the trainer
    itself never syncs per step)."""
    import pytorch_lightning as pl
    import torch

    from ocrbooth.models.dreambooth.data import LatentPairs
    from ocrbooth.models.dreambooth.module import (
        DreamBoothModule,
        LoopConfig,
        StepOptions,
        encode_latents,
        frozen_prompts,
    )

    device = torch.device(DEVICE)
    build_started = time.perf_counter()
    parts = _components(device)
    pixels = [torch.rand(3, RESOLUTION, RESOLUTION) * 2 - 1 for _ in range(4)]
    instance = encode_latents(parts["vae"], pixels[:2], device)
    class_latents = encode_latents(parts["vae"], pixels[2:], device)
    del parts["vae"]
    ids = torch.randint(0, 49408, (1, 77))
    prompts: dict[str, torch.Tensor] = {"instance_ids": ids, "class_ids": torch.randint(0, 49408, (1, 77))}
    text_encoder = parts["text_encoder"]
    if not train_text_encoder:
        prompts = frozen_prompts(text_encoder, prompts, device)
        text_encoder = None
        del parts["text_encoder"]
    _empty_cache()
    _sync()
    build_s = time.perf_counter() - build_started  # random init on the GPU + VAE encode (+ frozen prompts)
    total = warmup + steps + profile_steps
    config = LoopConfig(
        seed=0,
        batch_size=1,
        accumulation=1,
        start_step=0,
        max_steps=total,
        consumed_examples=0,
        learning_rate=5e-6,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        prior_loss_weight=1.0,
        with_prior=True,
        prediction_type="epsilon",
        latent_scale=0.18215,
        latent_shift=None,
    )
    base, _, layout = mode.partition("-")  # "graph-nchw": the same step with the UNet left in NCHW
    channels_last = layout != "nchw"
    if base == "graph":
        options = StepOptions(graph=True, channels_last=channels_last)
    elif base == "eager":
        options = StepOptions(graph=False, channels_last=channels_last)
    else:  # an Inductor mode
        options = StepOptions(graph=False, compile=True, compile_mode=mode, channels_last=channels_last)  # type: ignore[arg-type]
    module = DreamBoothModule(
        unet=parts["unet"],
        text_encoder=text_encoder,
        noise_scheduler=parts["scheduler"],
        prompts=prompts,
        dataset=LatentPairs(instance, class_latents),
        config=config,
        resume=None,
        options=options,
    )
    marks: dict[str, float] = {}
    profile: dict[str, Any] = {}
    profiler: list[Any] = []

    class Clock(pl.Callback):
        def on_fit_start(self, *args: Any) -> None:
            marks["fit_start"] = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            step = trainer.global_step
            if step == warmup:
                _sync()
                marks["warm"] = time.perf_counter()
            elif step == warmup + steps:
                _sync()
                marks["end"] = time.perf_counter()
                if profile_steps:
                    # Profile the next steps in place: start here, stop at the last batch.
                    from torch.profiler import ProfilerActivity
                    from torch.profiler import profile as prof

                    profiler.append(prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]))
                    profiler[0].__enter__()
            elif profile_steps and step == total:
                _sync()
                profiler[0].__exit__(None, None, None)
                label = f"ocrbooth {mode} TE {'trained' if train_text_encoder else 'frozen'}"
                profile.update(summarise(profiler[0], label, profile_steps, time.perf_counter() - marks["end"]))

    _reset_peak()
    trainer = pl.Trainer(
        accelerator="gpu" if DEVICE == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=total,
        max_epochs=1,  # clipping (1.0) is the module's own: it optimizes manually
        logger=False,
        callbacks=[Clock()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    rate = steps / (marks["end"] - marks["warm"])
    peak, reserved = _peak()
    row = {
        "side": "ocrbooth",
        "mode": mode,
        "step": module.step_kind,
        "train_text_encoder": train_text_encoder,
        "steps_timed": steps,
        "steps_per_s": rate,
        "ms_per_step": 1e3 / rate,
        "peak_memory_gib": peak,
        "peak_reserved_gib": reserved,
        "setup_and_warmup_s": marks["warm"] - started + build_s,
        "model_build_s": build_s,
        "job_800_steps_s": _job_seconds(marks["warm"] - started + build_s, warmup, rate),
        "trainable_params": _params(parts["unet"]) + (_params(text_encoder) if text_encoder is not None else 0),
    }
    if profile:
        row["profile"] = profile
    module.release_graphs()
    try:
        row["step_tflop"] = _step_flops(module) / 1e12
    except Exception as exc:  # the count is a nicety: never lose the row for it
        row["step_tflop_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def _step_flops(module: Any) -> float:
    """FLOPs of one forward + backward of the module's step (matrix products and convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module.to(DEVICE)  # Lightning's teardown moved the module back to the CPU; its latents stayed on the GPU
    index = torch.zeros(module.config.batch_size, dtype=torch.long, device=module.device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(DEVICE, dtype=torch.bfloat16, cache_enabled=False):
            loss = module._forward_loss(*module._inputs(index, 0))
        loss.backward()
    for p in module.trainable_parameters():
        p.grad = None
    return float(counter.get_total_flops())


def bench_reference(train_text_encoder: bool, steps: int, warmup: int, *, profile_steps: int = 0) -> dict[str, Any]:
    """A typical DreamBooth script's step: VAE encode every step, text encoder every step, fp32 weights under
    bf16 autocast, AdamW, gradient clipping, the loss read for the progress bar."""
    import torch
    import torch.nn.functional as F

    device = torch.device(DEVICE)
    build_started = time.perf_counter()
    parts = _components(device)
    _sync()
    build_s = time.perf_counter() - build_started
    unet, vae, text_encoder, scheduler = parts["unet"], parts["vae"], parts["text_encoder"], parts["scheduler"]
    unet.to(device).train()
    vae.to(device).eval().requires_grad_(False)
    text_encoder.to(device).train(train_text_encoder).requires_grad_(train_text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])
    optimizer = torch.optim.AdamW(params, lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION, device=device) * 2 - 1  # instance + class image
    ids = torch.randint(0, 49408, (2, 77), device=device)
    losses: list[float] = []

    def step() -> None:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            latents = vae.encode(pixels).latent_dist.sample() * 0.18215
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (2,), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            hidden = text_encoder(ids)[0]
            pred = unet(noisy, timesteps, hidden).sample
            loss = F.mse_loss(pred[:1].float(), noise[:1].float()) + F.mse_loss(pred[1:].float(), noise[1:].float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())  # the progress bar's loss: a host sync per step, as scripts do

    _reset_peak()
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync()
    warm = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    rate = steps / (time.perf_counter() - warm)
    row = {
        "side": "reference",
        "train_text_encoder": train_text_encoder,
        "steps_timed": steps,
        "steps_per_s": rate,
        "ms_per_step": 1e3 / rate,
        "peak_memory_gib": _peak()[0],
        "peak_reserved_gib": _peak()[1],
        "setup_and_warmup_s": warm - started + build_s,
        "model_build_s": build_s,
        "job_800_steps_s": _job_seconds(warm - started + build_s, warmup, rate),
        "trainable_params": sum(p.numel() for p in params),
    }
    if profile_steps:
        label = f"reference TE {'trained' if train_text_encoder else 'frozen'}"
        row["profile"] = _profile_steps(lambda: [step() for _ in range(profile_steps)], label, profile_steps)
    return row


def _profile_steps(fn: Any, label: str, steps: int) -> dict[str, Any]:
    """The profile of one call of `fn` that runs `steps` steps (training steps, or a batch of class images: its
    UNet steps and the VAE decode)."""
    return profile_call(fn, label, steps, _sync)


def _pipeline(device: Any) -> Any:
    import tempfile

    import torch
    from diffusers import StableDiffusionPipeline

    from ocrbooth.testing.tiny_sd import build_tokenizer

    parts = _components(device)
    tokenizer = build_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")  # any tokenizer: ids only index embeddings
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=tokenizer,
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device, torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CLASS_PROMPT = "a photo of dog"
CLASS_ROWS = ("stock", "ours_batch_4", "ours", "ours_batch_4_channels_last", "ours_compiled")


def bench_class_images_stock(batch: int, steps: int, rounds: int = 2, profile: bool = False) -> dict[str, Any]:
    """The stock pipeline as a typical script calls it: bf16, `batch` prompts per call, one CPU generator each."""
    import torch

    device = torch.device(DEVICE)
    pipe = _pipeline(device)

    def call(seed: int) -> None:
        pipe(
            prompt=[CLASS_PROMPT] * batch,
            guidance_scale=7.5,
            num_inference_steps=steps,
            height=RESOLUTION,
            width=RESOLUTION,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)],
        )

    started = time.perf_counter()
    call(0)  # warm-up
    _sync()
    first = time.perf_counter() - started
    _reset_peak()
    started = time.perf_counter()
    for r in range(rounds):
        call(batch * (r + 1))
    _sync()
    seconds = time.perf_counter() - started
    rate = rounds * batch / seconds
    row = {
        "side": "stock StableDiffusionPipeline",
        "batch": batch,
        "num_inference_steps": steps,
        "images_timed": rounds * batch,
        "images_per_s": rate,
        "first_batch_s": first,
        "job_100_images_s": max(first - batch / rate, 0.0) + 100 / rate,
        "peak_memory_gib": _peak()[0],
    }
    if profile:
        row["profile"] = _profile_steps(lambda: call(7919), f"stock pipeline, batch {batch}, per UNet step", steps)
    try:
        row |= _image_flops(pipe, steps)
    except Exception as exc:  # the count is a nicety: never lose the row for it
        row["flops_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def _image_flops(pipe: Any, steps: int) -> dict[str, float]:
    """FLOPs of one class image: `steps` UNet forwards of 2 rows (classifier-free guidance) + one VAE decode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    latent = torch.randn(2, 4, LATENT, LATENT, device=DEVICE, dtype=pipe.unet.dtype)
    hidden = torch.randn(2, 77, HIDDEN, device=DEVICE, dtype=pipe.unet.dtype)
    t = torch.tensor(500, device=DEVICE)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as unet_counter:
            pipe.unet(latent, t, hidden, return_dict=False)
        with FlopCounterMode(display=False) as vae_counter:
            pipe.vae.decode(latent[:1], return_dict=False)
    unet = float(unet_counter.get_total_flops())
    vae = float(vae_counter.get_total_flops())
    return {
        "unet_2_rows_tflop": unet / 1e12,
        "vae_decode_tflop": vae / 1e12,
        "tflop_per_image": (steps * unet + vae) / 1e12,
    }


def bench_class_images_ours(
    steps: int,
    images: int,
    batch: int | None = None,
    rounds: int = 1,
    profile: bool = False,
    channels_last: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """`ClassImageSampler` as `prior.ensure_class_images` runs it: the UNet step in a CUDA graph, channels-last,
    fused QKV, at `batch` (default: from free memory, as the trainer picks it)."""
    import torch

    from ocrbooth.models.dreambooth.prior import ClassImageSampler, batch_size_for

    device = torch.device(DEVICE)
    pipe = _pipeline(device)
    started = time.perf_counter()
    sampler = ClassImageSampler(pipe, device, graph=not compile, compile=compile, channels_last=channels_last)
    size = batch_size_for(device, RESOLUTION, wanted=batch)
    kwargs = {"guidance_scale": 7.5, "num_inference_steps": steps, "resolution": RESOLUTION, "batch_size": size}
    sampler.sample(CLASS_PROMPT, list(range(size)), **kwargs)  # warm-up: graph capture, cuDNN autotuning
    _sync()
    first = time.perf_counter() - started
    _reset_peak()
    timed = -(-images // size) * size  # whole batches: a partial one is padded, and its padding costs time
    t0 = time.perf_counter()
    for r in range(rounds):
        sampler.sample(CLASS_PROMPT, list(range(1000 * (r + 1), 1000 * (r + 1) + timed)), **kwargs)
    _sync()
    seconds = time.perf_counter() - t0
    rate = rounds * timed / seconds
    row = {
        "side": "ocrbooth ClassImageSampler",
        "batch": size,
        "unet_step": sampler.mode,
        "channels_last": channels_last,
        "num_inference_steps": steps,
        "images_timed": rounds * timed,
        "images_per_s": rate,
        "capture_and_first_batch_s": first,
        "job_100_images_s": max(first - size / rate, 0.0) + 100 / rate,
        "peak_memory_gib": _peak()[0],
        "peak_reserved_gib": _peak()[1],
    }
    if profile:
        row["profile"] = _profile_steps(
            lambda: sampler.sample(CLASS_PROMPT, list(range(size)), **kwargs),
            f"ours, batch {size}, per UNet step",
            steps,
        )
    sampler.close()
    return row


def ceilings() -> dict[str, float]:
    """The card's two ceilings as measured here: a bf16 8192^3 matrix product (TFLOP/s, random data) and a
    1 GiB device-to-device copy (GB/s, bytes read + written); medians of 20 after warm-up."""
    import torch

    if DEVICE != "cuda":
        return {"bf16_matmul_tflops": float("nan"), "copy_gbps": float("nan")}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)

    def median_ms(fn: Any) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    mm = median_ms(lambda: a @ b)
    copy = median_ms(lambda: dst.copy_(src))
    return {"bf16_matmul_tflops": 2 * 8192**3 / mm / 1e9, "copy_gbps": 2 * src.numel() * 4 / copy / 1e6}


# Bytes one optimizer step moves per trainable float32 parameter besides the matrix work: fused AdamW reads
# weight, gradient and two moments and writes three (28), clipping reads the gradient twice and writes it (12),
# autocast reads the weight and writes its bf16 copy (6).
BYTES_PER_PARAM = 28 + 12 + 6


def run(
    out_dir: Path,
    steps: int,
    warmup: int,
    rows_wanted: list[str],
    profile_steps: int,
    class_images: int,
    class_rows: frozenset[str] = frozenset(CLASS_ROWS),
) -> dict[str, Any]:
    import gc

    import diffusers
    import pytorch_lightning
    import torch
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cuda = DEVICE == "cuda"
    results: dict[str, Any] = {
        "benchmark": "dreambooth_throughput",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run: tiny model, 64 px)",
        "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "pytorch_lightning": pytorch_lightning.__version__,
        },
        "config": {
            "resolution": RESOLUTION,
            "batch": "1 instance + 1 class",
            "timed_steps": steps,
            "warmup": warmup,
            "job_steps": JOB_STEPS,
            "job_800_steps_s": "model build (random init on the GPU, VAE encode) + time to the end of the warm-up "
            "steps (Trainer start, graph capture or compilation) measured, plus the remaining steps at the measured "
            "steady rate",
            "peak_memory_gib": "torch.cuda.max_memory_allocated over the training run; peak_reserved_gib is the "
            "allocator's reserve (CUDA graph pools count there)",
            "floor_ms_per_step": "step FLOPs at the measured bf16 matrix rate + bytes_per_param x trainable "
            "parameters at the measured copy rate",
            "bytes_per_param": BYTES_PER_PARAM,
        },
        "ceilings": ceilings(),
        "training": [],
    }
    print(json.dumps(results["ceilings"]), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out_dir / "dreambooth_throughput.json").write_text(json.dumps(results, indent=2) + "\n")

    def tidy() -> None:
        gc.collect()  # Lightning's trainer and the module refer to each other: free them before the next row
        _empty_cache()
        torch._dynamo.reset()

    def training_row(train_te: bool, name: str) -> None:
        fn = (
            partial(bench_reference, train_te, steps, warmup, profile_steps=profile_steps)
            if name == "reference"
            else partial(bench_ours, train_te, steps, warmup, mode=name, profile_steps=profile_steps)
        )
        try:
            row = fn()
        except Exception as exc:  # one variant failing must not lose the others' numbers
            row = {"side": name, "train_text_encoder": train_te, "error": f"{type(exc).__name__}: {exc}"[:500]}
        if "step_tflop" in row:
            c = results["ceilings"]
            row["floor_ms_per_step"] = (
                row["step_tflop"] / c["bf16_matmul_tflops"] * 1e3
                + row["trainable_params"] * BYTES_PER_PARAM / c["copy_gbps"] / 1e6
            )
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        results["training"].append(row)

    def class_image_rows() -> None:
        rows: dict[str, Any] = {}
        results["class_images"] = rows
        for key, fn in (
            ("stock", partial(bench_class_images_stock, batch=4, steps=50, profile=profile_steps > 0)),
            ("ours_batch_4", partial(bench_class_images_ours, steps=50, images=8, batch=4, profile=profile_steps > 0)),
            ("ours", partial(bench_class_images_ours, steps=50, images=class_images, profile=profile_steps > 0)),
            (
                "ours_batch_4_channels_last",
                partial(bench_class_images_ours, steps=50, images=8, batch=4, channels_last=True),
            ),
            ("ours_compiled", partial(bench_class_images_ours, steps=50, images=class_images, compile=True)),
        ):
            if key not in class_rows:
                continue
            try:
                rows[key] = fn()
            except Exception as exc:
                rows[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(key, json.dumps(rows[key]), flush=True)
            tidy()
            save()
        stock = rows["stock"].get("images_per_s")
        if stock:
            rows["speedup"] = {
                k: rows[k]["images_per_s"] / stock
                for k in ("ours_batch_4", "ours", "ours_batch_4_channels_last", "ours_compiled")
                if "images_per_s" in rows.get(k, {})
            }
            if "tflop_per_image" in rows["stock"]:
                rows["floor_images_per_s"] = (
                    results["ceilings"]["bf16_matmul_tflops"] / rows["stock"]["tflop_per_image"]
                )

    # In the given order, so that a run cut short has the rows that matter most.
    for item in rows_wanted:
        if item == "class_images":
            class_image_rows()
        else:
            side, _, name = item.partition(":")
            training_row(side == "te", name)
        tidy()
        save()
    speedups: dict[str, Any] = {}
    for row in results["training"]:
        if row.get("side") != "ocrbooth" or "steps_per_s" not in row:
            continue
        ref = next(
            (
                r
                for r in results["training"]
                if r["side"] == "reference"
                and r["train_text_encoder"] == row["train_text_encoder"]
                and "steps_per_s" in r
            ),
            None,
        )
        if ref is None:
            continue
        key = f"{'text_encoder_trained' if row['train_text_encoder'] else 'text_encoder_frozen'}/{row['mode']}"
        speedups[key] = {
            "steps_per_s": row["steps_per_s"] / ref["steps_per_s"],
            "peak_memory_ratio": row["peak_memory_gib"] / ref["peak_memory_gib"],
            "peak_reserved_ratio": row["peak_reserved_gib"] / ref["peak_reserved_gib"],
            "job_800_steps_ratio": ref["job_800_steps_s"] / row["job_800_steps_s"],
        }
    results["speedup_vs_reference"] = speedups
    save()
    return results


def plot(json_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    labels, speeds, mems, colors = [], [], [], []
    for row in data["training"]:
        if "steps_per_s" not in row:
            continue
        te = "TE trained" if row["train_text_encoder"] else "TE frozen"
        name = row["side"] if row["side"] == "reference" else f"ocrbooth\n{row['mode']}"
        labels.append(f"{name}\n{te}")
        speeds.append(row["steps_per_s"])
        mems.append(row["peak_memory_gib"])
        colors.append("#bbbbbb" if row["side"] == "reference" else "#2b8cbe")
    axes[0].bar(labels, speeds, color=colors)
    axes[0].set_ylabel("optimizer steps / s (512 px, prior preservation)")
    for i, v in enumerate(speeds):
        axes[0].text(i, v, f"{v:.2f}", ha="center", va="bottom")
    axes[1].bar(labels, mems, color=colors)
    axes[1].set_ylabel("peak GPU memory (GiB)")
    for i, v in enumerate(mems):
        axes[1].text(i, v, f"{v:.1f}", ha="center", va="bottom")
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=7)
    ci = data.get("class_images")
    if ci:
        names, rates = [], []
        for key, label in (
            ("stock", "stock pipeline"),
            ("ours_batch_4", "ocrbooth sampler"),
            ("ours", "ocrbooth sampler"),
            ("ours_batch_4_channels_last", "ocrbooth sampler\nchannels-last"),
            ("ours_compiled", "ocrbooth sampler\ncompiled"),
        ):
            row = ci.get(key, {})
            if "images_per_s" in row:
                names.append(f"{label}\nbatch {row['batch']}")
                rates.append(row["images_per_s"])
        axes[2].bar(names, rates, color=["#bbbbbb"] + ["#2b8cbe"] * (len(rates) - 1))
        for i, v in enumerate(rates):
            axes[2].text(i, v, f"{v:.2f}", ha="center", va="bottom")
        axes[2].set_ylabel("class images / s (50 steps, CFG 7.5, 512 px)")
    fig.suptitle(f"DreamBooth on {data['device']}: SD 1.5 architecture, random weights, bf16")
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="default: bench/results (a --dry-run: a new temporary folder)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--rows",
        default="te:reference,te:graph,class_images,frozen:reference,frozen:graph,te:eager",
        help="comma-separated, run in this order: te:MODE (text encoder trained), frozen:MODE, class_images; "
        "MODE is reference, graph, eager or an Inductor mode (default, reduce-overhead, ...); ocrbooth's modes "
        "take -nchw (graph-nchw) to leave the UNet in NCHW instead of channels-last",
    )
    parser.add_argument("--profile-steps", type=int, default=3, help="steps profiled after the timed ones")
    parser.add_argument("--class-images", type=int, default=64, help="class images timed at the sampler's batch")
    parser.add_argument(
        "--class-rows",
        default=",".join(CLASS_ROWS),
        help="which class-image rows `class_images` runs (stock is the reference of the speed-ups)",
    )
    parser.add_argument("--plot-only", type=Path, help="make the PNG from an existing JSON")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script, not speed")
    args = parser.parse_args()
    if args.dry_run:
        dry_run()
    if args.out is None:  # a dry run's numbers are no results: never over the committed ones
        args.out = Path(tempfile.mkdtemp(prefix="dreambooth-dry-run-")) if args.dry_run else Path("bench/results")
    if args.plot_only:
        print(plot(args.plot_only))
        return
    results = run(
        args.out,
        args.steps,
        args.warmup,
        args.rows.split(","),
        args.profile_steps,
        args.class_images,
        class_rows=frozenset(args.class_rows.split(",")),
    )
    print("speedup vs reference:", json.dumps(results["speedup_vs_reference"], indent=1))
    print("class images:", json.dumps(results.get("class_images", {}).get("speedup")))
    try:
        print(plot(args.out / "dreambooth_throughput.json"))
    except ImportError as exc:  # matplotlib is not a dependency of the trainer
        print("no plot:", exc)


if __name__ == "__main__":
    main()
