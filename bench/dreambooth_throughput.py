"""DreamBooth training throughput on the GPU: ocrbooth's trainer step against a typical script's step.

Full-size Stable Diffusion 1.5 architecture (UNet 860M, VAE, CLIP ViT-L/14 text encoder) with random weights,
512 px, prior preservation (1 instance + 1 class example per step), AdamW, bf16 autocast over float32
master weights on both sides. Throughput does not depend on the weight values.

- **ocrbooth**: `DreamBoothModule` (`ocrbooth.models.dreambooth.module`) under a Lightning `Trainer` (precision
  `bf16-mixed`, gradient clipping 1.0) exactly as the trainer subprocess runs it: VAE latents precomputed once and
  kept on the GPU (with the text encoder frozen its two prompt embeddings too), the step compiled
  (`StepOptions`), fused AdamW, channels-last, no host sync per step. `--modes` picks the variants.
- **reference**: what a typical DreamBooth script does every step: encode both images with the VAE, run the
  text encoder, UNet forward/backward, AdamW (default for-each), clip, `loss.item()` for the progress bar
  (float32 weights under bf16 autocast).

Also: class images/s of the stock `StableDiffusionPipeline` in bfloat16 (batch 4, 50 steps, guidance 7.5, 512 px,
what a typical DreamBooth script uses) against `prior.ClassImageSampler` (fused QKV, channels-last, compiled UNet
with CUDA graphs, batch from free memory), same settings; an 800-step job's wall time (compile included) for both
trainers; and a torch.profiler table of one side's steps (`--profile`) saying where the time goes.

    python bench/dreambooth_throughput.py --out DIR       # on the GPU machine; writes DIR/dreambooth_throughput.json
    python bench/dreambooth_throughput.py --plot-only bench/results/dreambooth_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

RESOLUTION = 512
LATENT = RESOLUTION // 8


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
    unet = UNet2DConditionModel(
        sample_size=LATENT,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=RESOLUTION,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
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

    torch.cuda.synchronize()


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
    from ocrbooth.models.dreambooth.module import DreamBoothModule, LoopConfig, StepOptions, encode_latents

    device = torch.device("cuda")
    parts = _components(device)
    pixels = [torch.rand(3, RESOLUTION, RESOLUTION) * 2 - 1 for _ in range(4)]
    instance = encode_latents(parts["vae"], pixels[:2], device)
    class_latents = encode_latents(parts["vae"], pixels[2:], device)
    del parts["vae"]
    ids = torch.randint(0, 49408, (1, 77))
    prompts: dict[str, torch.Tensor] = {"instance_ids": ids, "class_ids": torch.randint(0, 49408, (1, 77))}
    text_encoder = parts["text_encoder"]
    if not train_text_encoder:
        text_encoder.to(device).eval()
        with torch.no_grad():
            prompts = {
                "instance_embeds": text_encoder(prompts["instance_ids"].to(device))[0].cpu(),
                "class_embeds": text_encoder(prompts["class_ids"].to(device))[0].cpu(),
            }
        text_encoder = None
        del parts["text_encoder"]
    torch.cuda.empty_cache()
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
    options = StepOptions.eager() if mode == "eager" else StepOptions(compile_mode=mode)  # type: ignore[arg-type]
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
                profile.update(
                    _summarise(profiler[0], f"ocrbooth {mode} TE {'trained' if train_text_encoder else 'frozen'}")
                )

    torch.cuda.reset_peak_memory_stats()
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=total,
        max_epochs=1,
        gradient_clip_val=1.0,
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
    row = {
        "side": "ocrbooth",
        "mode": mode,
        "compiled": module.compiled,
        "train_text_encoder": train_text_encoder,
        "steps_timed": steps,
        "steps_per_s": rate,
        "ms_per_step": 1e3 / rate,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "setup_and_warmup_s": marks["warm"] - started,
        "job_800_steps_s": _job_seconds(marks["warm"] - started, warmup, rate),
        "trainable_params": _params(parts["unet"]) + (_params(text_encoder) if text_encoder is not None else 0),
    }
    if profile:
        row["profile"] = profile
    return row


def _summarise(prof: Any, label: str, rows: int = 20) -> dict[str, Any]:
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1e3
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:rows]
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    cpu_top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {
        "label": label,
        "gpu_busy_ms": round(gpu_total, 2),
        "kernel_launches": launches,
        "top_gpu": [
            {"name": e.key[:100], "ms": round(e.self_device_time_total / 1e3, 3), "calls": e.count} for e in top
        ],
        "top_cpu": [
            {"name": e.key[:100], "ms": round(e.self_cpu_time_total / 1e3, 3), "calls": e.count} for e in cpu_top
        ],
    }


def bench_reference(train_text_encoder: bool, steps: int, warmup: int, *, profile_steps: int = 0) -> dict[str, Any]:
    """A typical DreamBooth script's step: VAE encode every step, text encoder every step, fp32 weights under
    bf16 autocast, AdamW, gradient clipping, the loss read for the progress bar."""
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda")
    parts = _components(device)
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
        with torch.autocast("cuda", dtype=torch.bfloat16):
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

    torch.cuda.reset_peak_memory_stats()
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
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "setup_and_warmup_s": warm - started,
        "job_800_steps_s": _job_seconds(warm - started, warmup, rate),
        "trainable_params": sum(p.numel() for p in params),
    }
    if profile_steps:
        row["profile"] = _profile_steps(lambda: [step() for _ in range(profile_steps)], "reference")
    return row


def _profile_steps(fn: Any, label: str) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    return _summarise(prof, label)


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


def bench_class_images_stock(batch: int, steps: int, rounds: int = 2) -> dict[str, Any]:
    """The stock pipeline as a typical script calls it: bf16, `batch` prompts per call, one CPU generator each."""
    import torch

    device = torch.device("cuda")
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

    call(0)  # warm-up
    _sync()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for r in range(rounds):
        call(batch * (r + 1))
    _sync()
    seconds = time.perf_counter() - started
    return {
        "side": "stock StableDiffusionPipeline",
        "batch": batch,
        "num_inference_steps": steps,
        "images_per_s": rounds * batch / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def bench_class_images_ours(steps: int, images: int, batch: int | None = None) -> dict[str, Any]:
    """`ClassImageSampler` as `prior.ensure_class_images` runs it: compiled, batch from free memory."""
    import torch

    from ocrbooth.models.dreambooth.prior import ClassImageSampler, batch_size_for

    device = torch.device("cuda")
    pipe = _pipeline(device)
    started = time.perf_counter()
    sampler = ClassImageSampler(pipe, device, compile=True)
    size = batch_size_for(device, RESOLUTION, wanted=batch)
    kwargs = {"guidance_scale": 7.5, "num_inference_steps": steps, "resolution": RESOLUTION, "batch_size": size}
    sampler.sample(CLASS_PROMPT, list(range(size)), **kwargs)  # warm-up: compilation and graph capture
    _sync()
    first = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    sampler.sample(CLASS_PROMPT, list(range(1000, 1000 + images)), **kwargs)
    _sync()
    seconds = time.perf_counter() - t0
    return {
        "side": "ocrbooth ClassImageSampler",
        "batch": size,
        "compiled": sampler.compiled,
        "num_inference_steps": steps,
        "images_timed": images,
        "images_per_s": images / seconds,
        "compile_and_warmup_s": first,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def run(
    out_dir: Path, steps: int, warmup: int, modes: list[str], frozen_modes: list[str], profile_steps: int
) -> dict[str, Any]:
    import diffusers
    import pytorch_lightning
    import torch
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results: dict[str, Any] = {
        "benchmark": "dreambooth_throughput",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": torch.cuda.get_device_name(0),
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
            "job_800_steps_s": "time to the end of the warm-up steps (model build, compilation) measured, plus the "
            "remaining steps at the measured steady rate",
        },
        "training": [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out_dir / "dreambooth_throughput.json").write_text(json.dumps(results, indent=2) + "\n")

    for train_te in (True, False):
        names = ["reference", *(modes if train_te else frozen_modes)]
        for name in names:
            fn = (
                partial(bench_reference, train_te, steps, warmup, profile_steps=profile_steps)
                if name == "reference"
                else partial(bench_ours, train_te, steps, warmup, mode=name, profile_steps=profile_steps)
            )
            try:
                row = fn()
            except Exception as exc:  # one variant failing must not lose the others' numbers
                row = {"side": name, "train_text_encoder": train_te, "error": f"{type(exc).__name__}: {exc}"[:500]}
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            results["training"].append(row)
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            save()
    stock = bench_class_images_stock(batch=4, steps=50)
    print(json.dumps(stock), flush=True)
    torch.cuda.empty_cache()
    try:
        ours = bench_class_images_ours(steps=50, images=64)
    except Exception as exc:
        ours = {"error": f"{type(exc).__name__}: {exc}"[:500], "images_per_s": float("nan")}
    print(json.dumps(ours), flush=True)
    results["class_images"] = {"stock": stock, "ours": ours, "speedup": ours["images_per_s"] / stock["images_per_s"]}
    save()
    speedups: dict[str, Any] = {}
    for row in results["training"]:
        if row.get("side") != "ocrbooth" or "steps_per_s" not in row:
            continue
        ref = next(
            r
            for r in results["training"]
            if r["side"] == "reference" and r["train_text_encoder"] == row["train_text_encoder"]
        )
        key = f"{'text_encoder_trained' if row['train_text_encoder'] else 'text_encoder_frozen'}/{row['mode']}"
        speedups[key] = {
            "steps_per_s": row["steps_per_s"] / ref["steps_per_s"],
            "peak_memory_ratio": row["peak_memory_gib"] / ref["peak_memory_gib"],
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
        names = [f"stock pipeline\nbatch {ci['stock']['batch']}", f"ocrbooth sampler\nbatch {ci['ours']['batch']}"]
        rates = [ci["stock"]["images_per_s"], ci["ours"]["images_per_s"]]
        axes[2].bar(names, rates, color=["#bbbbbb", "#2b8cbe"])
        for i, v in enumerate(rates):
            axes[2].text(i, v, f"{v:.2f}", ha="center", va="bottom")
        axes[2].set_ylabel(f"class images / s ({ci['stock']['num_inference_steps']} steps, CFG 7.5, 512 px)")
    fig.suptitle(f"DreamBooth on {data['device']}: SD 1.5 architecture, random weights, bf16")
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--modes", default="default", help="comma-separated: eager, default, reduce-overhead, ...")
    parser.add_argument("--frozen-modes", default="default", help="the same, for the text-encoder-frozen runs")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps profiled after the timed ones")
    parser.add_argument("--plot-only", type=Path, help="make the PNG from an existing JSON")
    args = parser.parse_args()
    if args.plot_only:
        print(plot(args.plot_only))
        return
    results = run(
        args.out, args.steps, args.warmup, args.modes.split(","), args.frozen_modes.split(","), args.profile_steps
    )
    print("speedup vs reference:", json.dumps(results["speedup_vs_reference"], indent=1))
    print("class images:", json.dumps(results["class_images"]["speedup"]))


if __name__ == "__main__":
    main()
