"""Train the tiny SD model under Lightning on the GPU, the way the trainer does: the shared set-up of the tests
that compare one training step with another (`test_compiled_step.py`, `test_graph_step.py`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch


def _flat(modules: list[Any]) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for m in modules for p in m.parameters()])


def train_tiny(
    model_dir: Path,
    options: Any,
    *,
    train_text_encoder: bool,
    steps: int,
    accumulation: int = 1,
    lr_scheduler: str = "constant",
    lr_warmup_steps: int = 0,
    max_grad_norm: float = 1.0,
) -> dict[str, Any]:
    """`steps` optimizer steps of DreamBoothModule (bf16-mixed, seed 3, 3 instance + 3 class images of 64 px,
    prior preservation) with the step `options` (a `StepOptions`). Returns the per-step losses (the mean of
    each step's micro-batches), the step kind the module chose, Lightning's global step, the learning rate
    after each step, and the trainable weights flattened before and after."""
    import pytorch_lightning as pl

    from ocrbooth.models.dreambooth.data import LatentPairs
    from ocrbooth.models.dreambooth.module import (
        DreamBoothModule,
        LoopConfig,
        encode_latents,
        frozen_prompts,
        load_components,
        token_ids,
    )

    device = torch.device("cuda")
    parts = load_components(model_dir)
    generator = torch.Generator().manual_seed(0)
    pixels = [torch.rand(3, 64, 64, generator=generator) * 2 - 1 for _ in range(6)]
    instance = encode_latents(parts.vae, pixels[:3], device)
    class_latents = encode_latents(parts.vae, pixels[3:], device)
    prompts = {
        "instance_ids": token_ids(parts.tokenizer, "a sks dog"),
        "class_ids": token_ids(parts.tokenizer, "a dog"),
    }
    text_encoder = parts.text_encoder
    if not train_text_encoder:
        prompts = frozen_prompts(text_encoder, prompts, device)
        text_encoder = None
    config = LoopConfig(
        seed=3,
        batch_size=2,
        accumulation=accumulation,
        start_step=0,
        max_steps=steps,
        consumed_examples=0,
        learning_rate=1e-4,
        lr_scheduler=lr_scheduler,
        lr_warmup_steps=lr_warmup_steps,
        prior_loss_weight=1.0,
        with_prior=True,
        prediction_type="epsilon",
        latent_scale=0.18215,
        latent_shift=None,
        max_grad_norm=max_grad_norm,
    )
    trained = [parts.unet] + ([text_encoder] if text_encoder is not None else [])
    start = _flat(trained)
    module = DreamBoothModule(
        unet=parts.unet.train(),
        text_encoder=text_encoder.train() if text_encoder is not None else None,
        noise_scheduler=parts.noise_scheduler,
        prompts=prompts,
        dataset=LatentPairs(instance, class_latents),
        config=config,
        resume=None,
        options=options,
    )
    losses: list[torch.Tensor] = []
    lrs: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            losses.append(outputs["loss"].detach().clone())  # the graph's loss tensor is overwritten next replay
            if (batch_idx + 1) % accumulation == 0:
                lrs.append(trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0])

    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps,
        max_epochs=1,  # accumulation and clipping are the module's own: it optimizes manually
        logger=False,
        callbacks=[Record()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    per_micro = [float(x) for x in losses]
    n = accumulation
    return {
        "losses": [sum(per_micro[i : i + n]) / n for i in range(0, len(per_micro), n)],
        "step_kind": module.step_kind,
        "global_step": trainer.global_step,
        "lrs": lrs,
        "start": start,
        "end": _flat(trained),
    }
