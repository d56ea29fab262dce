"""DreamBooth training throughput on the GPU: ocrbooth's trainer step against a typical script's step.

Full-size Stable Diffusion 1.5 architecture (UNet 860M, VAE, CLIP ViT-L/14 text encoder) with random weights,
512 px, prior preservation (1 instance + 1 class example per step), AdamW, bf16 autocast over float32
master weights on both sides. Throughput does not depend on the weight values.

- **ocrbooth**: `DreamBoothModule` from `ocrbooth.models.dreambooth.train` under a Lightning `Trainer`
  (precision `bf16-mixed`), exactly as the trainer subprocess runs it: VAE latents precomputed once, and with
  the text encoder frozen its two prompt embeddings precomputed too.
- **reference**: what a typical DreamBooth script does every step: encode both images with the VAE, run the
  text encoder, UNet forward/backward, AdamW step (float32 weights under autocast).

Also: class-image generation images/s with `StableDiffusionPipeline` (classifier-free guidance, conditional
and unconditional passes in one batched forward) in bfloat16.

    python bench/dreambooth_throughput.py --out DIR       # on the GPU machine; writes DIR/dreambooth_throughput.json
    python bench/dreambooth_throughput.py --plot-only bench/results/dreambooth_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
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


def bench_ours(train_text_encoder: bool, steps: int, warmup: int) -> dict[str, Any]:
    """ocrbooth's module and Lightning trainer, timed per optimizer step after warm-up."""
    import pytorch_lightning as pl
    import torch

    from ocrbooth.models.dreambooth.data import LatentPairs
    from ocrbooth.models.dreambooth.train import DreamBoothModule, LoopConfig, encode_latents

    device = torch.device("cuda")
    parts = _components(device)
    pixels = [torch.rand(3, RESOLUTION, RESOLUTION) * 2 - 1 for _ in range(4)]
    instance = encode_latents(parts["vae"], pixels[:2], device)
    class_latents = encode_latents(parts["vae"], pixels[2:], device)
    parts["vae"].to("cpu")
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
    total = warmup + steps
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
    module = DreamBoothModule(
        unet=parts["unet"],
        text_encoder=text_encoder,
        noise_scheduler=parts["scheduler"],
        prompts=prompts,
        dataset=LatentPairs(instance, class_latents),
        config=config,
        resume=None,
    )
    stamps: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    timed = stamps[warmup:]
    seconds = timed[-1] - stamps[warmup - 1]
    return {
        "side": "ocrbooth",
        "train_text_encoder": train_text_encoder,
        "steps_timed": len(timed),
        "steps_per_s": len(timed) / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "trainable_params": _params(parts["unet"]) + (_params(parts["text_encoder"]) if train_text_encoder else 0),
    }


def bench_reference(train_text_encoder: bool, steps: int, warmup: int) -> dict[str, Any]:
    """A typical DreamBooth script's step: VAE encode every step, text encoder every step, fp32 weights under
    bf16 autocast, AdamW, gradient clipping."""
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
    torch.cuda.reset_peak_memory_stats()
    stamps: list[float] = []
    for _ in range(warmup + steps):
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
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    timed = stamps[warmup:]
    return {
        "side": "reference",
        "train_text_encoder": train_text_encoder,
        "steps_timed": len(timed),
        "steps_per_s": len(timed) / (timed[-1] - stamps[warmup - 1]),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "trainable_params": sum(p.numel() for p in params),
    }


def bench_class_images(batch: int, steps: int) -> dict[str, Any]:
    """Class-image generation as `prior.py` does it: the pipeline in bfloat16, guidance 7.5, batched."""
    import torch
    from diffusers import StableDiffusionPipeline

    device = torch.device("cuda")
    parts = _components(device)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=None,
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device, torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    ids = torch.randint(0, 49408, (1, 77), device=device)
    with torch.no_grad():
        cond = parts["text_encoder"](ids)[0].expand(batch, -1, -1)
        uncond = parts["text_encoder"](torch.zeros_like(ids))[0].expand(batch, -1, -1)
    kwargs = {
        "prompt_embeds": cond,
        "negative_prompt_embeds": uncond,
        "guidance_scale": 7.5,
        "num_inference_steps": steps,
        "height": RESOLUTION,
        "width": RESOLUTION,
        "output_type": "pil",
        "generator": torch.Generator(device).manual_seed(0),
    }
    pipe(**kwargs)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    rounds = 2
    for _ in range(rounds):
        pipe(**kwargs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "batch": batch,
        "num_inference_steps": steps,
        "images_per_s": rounds * batch / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def run(out_dir: Path, steps: int, warmup: int) -> dict[str, Any]:
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
        "config": {"resolution": RESOLUTION, "batch": "1 instance + 1 class", "timed_steps": steps, "warmup": warmup},
        "training": [],
    }
    for train_te in (False, True):
        for fn in (bench_ours, bench_reference):
            row = fn(train_te, steps, warmup)
            print(json.dumps(row), flush=True)
            results["training"].append(row)
            torch.cuda.empty_cache()
    results["class_images"] = bench_class_images(batch=8, steps=30)
    print(json.dumps(results["class_images"]), flush=True)
    speedups = {}
    for train_te in (False, True):
        ours = next(r for r in results["training"] if r["side"] == "ocrbooth" and r["train_text_encoder"] == train_te)
        ref = next(r for r in results["training"] if r["side"] == "reference" and r["train_text_encoder"] == train_te)
        speedups["text_encoder_trained" if train_te else "text_encoder_frozen"] = (
            ours["steps_per_s"] / ref["steps_per_s"]
        )
    results["speedup_vs_reference"] = speedups
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dreambooth_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def plot(json_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels, speeds, mems, colors = [], [], [], []
    for row in data["training"]:
        te = "TE trained" if row["train_text_encoder"] else "TE frozen"
        labels.append(f"{row['side']}\n{te}")
        speeds.append(row["steps_per_s"])
        mems.append(row["peak_memory_gib"])
        colors.append("#2b8cbe" if row["side"] == "ocrbooth" else "#bbbbbb")
    axes[0].bar(labels, speeds, color=colors)
    axes[0].set_ylabel("optimizer steps / s (512 px, prior preservation)")
    for i, v in enumerate(speeds):
        axes[0].text(i, v, f"{v:.2f}", ha="center", va="bottom")
    axes[1].bar(labels, mems, color=colors)
    axes[1].set_ylabel("peak GPU memory (GiB)")
    for i, v in enumerate(mems):
        axes[1].text(i, v, f"{v:.1f}", ha="center", va="bottom")
    ci = data["class_images"]
    fig.suptitle(
        f"DreamBooth on {data['device']}: SD 1.5 architecture, random weights; "
        f"class images {ci['images_per_s']:.2f}/s (batch {ci['batch']}, {ci['num_inference_steps']} steps, CFG)"
    )
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--plot-only", type=Path, help="make the PNG from an existing JSON")
    args = parser.parse_args()
    if args.plot_only:
        print(plot(args.plot_only))
        return
    results = run(args.out, args.steps, args.warmup)
    print("speedup vs reference:", json.dumps(results["speedup_vs_reference"]))


if __name__ == "__main__":
    main()
