"""The DreamBooth trainer: `python -m ocrbooth.models.dreambooth.train JOB.json` (or `ocrbooth train JOB.json`).

Shaped like litgpt's recipes: `setup()` parses and validates the job and resolves every input (instance images,
base model, the checkpoint to resume from) before any GPU work; `main()` builds the pieces (class images, latents,
the LightningModule, the Trainer) and `fit()` runs the loop. The package docstring (`ocrbooth.models.dreambooth`)
documents JOB.json, the stdout protocol, the exit codes and the S3 layout.

Resuming is exact: the example order is a function of (seed, position) (`data.StepSampler`), the noise of every
micro-batch comes from a generator seeded by (seed, micro-batch, rank), and a checkpoint holds weights, optimizer,
LR scheduler, grad scaler and RNG states. On CPU (deterministic kernels) a run killed and resumed ends with
weights bitwise equal to an uninterrupted run's; on GPUs it is the same computation up to kernel nondeterminism.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from ocrbooth.config import Settings, load_settings
from ocrbooth.errors import ConfigError, PoisonError
from ocrbooth.models.dreambooth import (
    EXIT_COMPLETED,
    EXIT_FAILED,
    EXIT_STOPPED,
    PARENT_PID_ENV,
    TrainJob,
    output_uri,
    validate_request,
)
from ocrbooth.models.dreambooth.checkpoints import (
    Checkpoint,
    CheckpointStore,
    capture_rng,
    checkpoint_name,
    restore_rng,
    save_checkpoint,
)
from ocrbooth.models.dreambooth.data import (
    DataState,
    LatentPairs,
    S3Objects,
    StepSampler,
    fetch_instance_images,
    image_to_tensor,
    resolve_model_dir,
)
from ocrbooth.models.dreambooth.generate import inference_dtype, load_pipeline, render
from ocrbooth.models.dreambooth.prior import ensure_class_images
from ocrbooth.schemas.finetune import FinetuneRequest
from ocrbooth.storage import parse_s3_uri

log = logging.getLogger(__name__)

EXIT_CRASHED = 1  # anything unexpected: the daemon reruns the job from its newest checkpoint

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
_MAX_GRAD_NORM = 1.0
_ENCODE_BATCH = 8


# ---- protocol ---------------------------------------------------------------------------------------------------


def _is_rank_zero() -> bool:
    """Lightning's DDP children run this same program with LOCAL_RANK set; only rank 0 speaks."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


class Events:
    """The stdout protocol: one JSON object per line, flushed at once (rank 0 only)."""

    def __init__(self, stream: TextIO, *, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps({"event": event, **fields}, allow_nan=False, default=str)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def _claim_stdout() -> TextIO:
    """Keep the real stdout for protocol lines and point fd 1 at stderr, so that a library's stray print can
    never corrupt the protocol."""
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    return protocol


class StopFlag:
    """Set by SIGTERM: finish the current step, checkpoint, print `stopped`, exit 3."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def request(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


# ---- setup: validate and resolve -----------------------------------------------------------------------------------


@dataclass
class Job:
    """A validated job with every input resolved; what `setup` hands to `main`."""

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


def setup(job_file: Path, settings: Settings) -> Job:
    """Parse and validate the job, fetch and check the instance images, find the base model and the checkpoint
    to resume from. Every bad input raises PoisonError here, before any GPU work."""
    try:
        raw = job_file.read_bytes()
    except OSError as exc:
        raise PoisonError(f"cannot read job file {job_file}: {exc}", code="invalid_request") from exc
    job = TrainJob.parse(raw)
    request = job.request
    validate_request(request, settings)
    s3 = S3Objects(settings)
    images = fetch_instance_images(request.instance_images, settings, s3)
    model_dir = resolve_model_dir(request.base_model, settings, s3)
    workdir = settings.finetune.workdir / request.job_id
    store = CheckpointStore(s3, request.job_id)
    signature = training_signature(request)
    # One folder per rank: DDP children run this setup too, while rank 0 may still be reading its copy.
    resume = store.download_latest(workdir / "resume" / f"rank-{os.environ.get('LOCAL_RANK', '0')}")
    if resume is not None and resume.config.get("signature") != signature:
        raise PoisonError(
            f"checkpoint {store.uri(resume.step)} was made for different training parameters",
            code="checkpoint_mismatch",
        )
    return Job(
        request=request,
        attempt=job.attempt,
        settings=settings,
        s3=s3,
        store=store,
        workdir=workdir,
        model_dir=model_dir,
        instance_images=images,
        output_uri=output_uri(request, settings),
        resume=resume,
        signature=signature,
    )


# ---- the model ----------------------------------------------------------------------------------------------------


@dataclass
class Components:
    """The diffusers/transformers parts of the base pipeline that training uses."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any


def load_components(model_dir: Path) -> Components:
    """Load the base pipeline's parts in float32 (the master weights); PoisonError(unknown_base_model) if any
    part is missing or broken."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        return Components(
            tokenizer=CLIPTokenizer.from_pretrained(str(model_dir), subfolder="tokenizer", local_files_only=True),
            text_encoder=CLIPTextModel.from_pretrained(str(model_dir), subfolder="text_encoder", local_files_only=True),
            vae=AutoencoderKL.from_pretrained(  # type: ignore[no-untyped-call]
                str(model_dir), subfolder="vae", local_files_only=True
            ),
            unet=UNet2DConditionModel.from_pretrained(  # type: ignore[no-untyped-call]
                str(model_dir), subfolder="unet", local_files_only=True
            ),
            noise_scheduler=DDPMScheduler.from_pretrained(  # type: ignore[no-untyped-call]
                str(model_dir), subfolder="scheduler", local_files_only=True
            ),
        )
    except Exception as exc:  # loaders raise OSError, ValueError, KeyError, EnvironmentError... for a bad folder
        raise PoisonError(f"base model at {model_dir} cannot be loaded: {exc}", code="unknown_base_model") from exc


def _token_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    ids: torch.Tensor = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids


@torch.no_grad()
def encode_latents(vae: Any, pixels: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE's latent distribution for each image, float32 on CPU."""
    vae.to(device).eval()
    means, stds = [], []
    for start in range(0, len(pixels), _ENCODE_BATCH):
        batch = torch.stack(pixels[start : start + _ENCODE_BATCH]).to(device, vae.dtype)
        dist = vae.encode(batch).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def _micro_seed(seed: int, micro_batch: int, rank: int) -> int:
    digest = hashlib.sha256(f"{seed}:{micro_batch}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class LoopConfig:
    """What the module needs to know about the run."""

    seed: int
    batch_size: int
    accumulation: int
    start_step: int
    max_steps: int
    consumed_examples: int
    learning_rate: float
    lr_scheduler: str
    lr_warmup_steps: int
    prior_loss_weight: float
    with_prior: bool
    prediction_type: str
    latent_scale: float
    latent_shift: float | None


class DreamBoothModule(pl.LightningModule):
    """UNet (and optionally the text encoder) trained on precomputed latents with the DreamBooth loss:
    MSE on the instance half of the batch + prior_loss_weight x MSE on the class half."""

    def __init__(
        self,
        *,
        unet: Any,
        text_encoder: Any | None,
        noise_scheduler: Any,
        prompts: dict[str, torch.Tensor],
        dataset: LatentPairs,
        config: LoopConfig,
        resume: Checkpoint | None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.noise_scheduler = noise_scheduler
        for name, tensor in prompts.items():
            self.register_buffer(name, tensor, persistent=False)
        self.dataset = dataset
        self.config = config
        self.resume = resume
        self.loss_window: list[torch.Tensor] = []

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        cfg = self.config
        sampler = StepSampler(
            len(self.dataset),
            cfg.seed,
            start=cfg.consumed_examples,
            count=(cfg.max_steps - cfg.start_step) * cfg.accumulation,
            batch_size=cfg.batch_size,
            rank=self.global_rank,
            world_size=self.trainer.world_size,
        )
        # Its own generator: a DataLoader iterator otherwise draws a seed from the global RNG.
        return DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=sampler, generator=torch.Generator())

    def _hidden_states(self, n_instance: int, n_class: int) -> torch.Tensor:
        """Text-encoder outputs for the batch: instance prompt rows first, then class prompt rows."""
        if self.text_encoder is not None:
            instance, class_ = self.get_buffer("instance_ids"), self.get_buffer("class_ids")
            ids = torch.cat([instance.expand(n_instance, -1), class_.expand(n_class, -1)])
            hidden: torch.Tensor = self.text_encoder(ids, return_dict=False)[0]
            return hidden
        instance, class_ = self.get_buffer("instance_embeds"), self.get_buffer("class_embeds")
        return torch.cat([instance.expand(n_instance, -1, -1), class_.expand(n_class, -1, -1)])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        cfg = self.config
        micro_batch = cfg.start_step * cfg.accumulation + batch_idx
        generator = torch.Generator().manual_seed(_micro_seed(cfg.seed, micro_batch, self.global_rank))
        mean, std = batch["instance_mean"], batch["instance_std"]
        n_instance = mean.shape[0]
        if cfg.with_prior:  # instance and class examples in one batch, split again for the loss
            mean = torch.cat([mean, batch["class_mean"]])
            std = torch.cat([std, batch["class_std"]])
        shape, n = mean.shape, mean.shape[0]
        # Drawn on the CPU from a per-micro-batch generator, so a resumed run draws exactly the same.
        sample_noise = torch.randn(shape, generator=generator).to(self.device)
        noise = torch.randn(shape, generator=generator).to(self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator).to(
            self.device
        )
        latents = mean + std * sample_noise
        if cfg.latent_shift is not None:
            latents = latents - cfg.latent_shift
        latents = latents * cfg.latent_scale
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = self._hidden_states(n_instance, n - n_instance)
        pred = self.unet(noisy, timesteps, hidden, return_dict=False)[0]
        if cfg.prediction_type == "epsilon":
            target = noise
        elif cfg.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:  # "sample"
            target = latents
        loss = F.mse_loss(pred[:n_instance].float(), target[:n_instance].float())
        if cfg.with_prior:
            prior = F.mse_loss(pred[n_instance:].float(), target[n_instance:].float())
            loss = loss + cfg.prior_loss_weight * prior
        self.loss_window.append(loss.detach())
        return loss

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.unet.parameters())
        if self.text_encoder is not None:
            params += list(self.text_encoder.parameters())
        return params

    def configure_optimizers(self) -> Any:
        from diffusers.optimization import get_scheduler

        cfg = self.config
        optimizer = torch.optim.AdamW(
            self.trainable_parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )
        # Stepped once per optimizer step by Lightning, so no scaling by the number of processes.
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
        )
        if self.resume is not None:
            optimizer.load_state_dict(self.resume.optimizer())
            scheduler.load_state_dict(self.resume.lr_scheduler())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


# ---- the loop's side effects: progress, checkpoints, stop --------------------------------------------------------


class JobCallback(pl.Callback):
    """Progress lines, checkpoints (every `checkpointing_steps`, at the last step, and on SIGTERM) and RNG
    restoration at the start of a resumed run."""

    def __init__(
        self, job: Job, events: Events, stop: StopFlag, module: DreamBoothModule, config_json: dict[str, Any]
    ) -> None:
        self.job = job
        self.events = events
        self.stop = stop
        self.module = module
        self.config = module.config
        self.saved_step: int | None = job.start_step if job.resume is not None else None
        self.last_step = job.start_step
        self.window_step = job.start_step
        self.window_started = time.monotonic()
        self.config_json = config_json  # the resolved configuration, stored in every checkpoint

    def step(self, trainer: pl.Trainer) -> int:
        return self.config.start_step + trainer.global_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.job.resume is not None:
            restore_rng(self.job.resume.rng())
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            saved = self.job.resume.grad_scaler()
            if scaler is not None and saved is not None:
                scaler.load_state_dict(saved)
        self.window_started = time.monotonic()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self.step(trainer)
        req = self.job.request
        if step != self.last_step:  # an optimizer step just finished
            self.last_step = step
            if step % self.job.settings.finetune.progress_every_steps == 0 or step == req.max_train_steps:
                self.progress(trainer, step)
            if step % req.checkpointing_steps == 0 or step == req.max_train_steps:
                self.save(trainer, step, barrier=True)
        if self.stop:
            # Mid-accumulation the weights are still those of the last finished step: that is what gets saved.
            self.save(trainer, step, barrier=False)
            if trainer.world_size == 1:
                trainer.should_stop = True

    def progress(self, trainer: pl.Trainer, step: int) -> None:
        window = self.module.loss_window
        loss = float(torch.stack(window).mean().item()) if window else float("nan")
        window.clear()
        lr = float(trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0])
        now = time.monotonic()
        rate = (step - self.window_step) / max(now - self.window_started, 1e-9)
        self.window_step, self.window_started = step, now
        if not trainer.is_global_zero:
            return
        self.events.emit(
            "progress",
            step=step,
            max_steps=self.job.request.max_train_steps,
            loss=loss if loss == loss else None,  # NaN is not JSON
            learning_rate=lr,
            steps_per_second=round(rate, 4),
        )
        if trainer.logger is not None:
            trainer.logger.log_metrics({"train/loss": loss, "train/learning_rate": lr}, step=step)

    def save(self, trainer: pl.Trainer, step: int, *, barrier: bool) -> None:
        """Write, upload and mark complete a checkpoint of `step`, then rotate (rank 0; once per step)."""
        if step == self.saved_step or step == 0:
            return
        self.saved_step = step
        if trainer.is_global_zero:
            job, cfg = self.job, self.config
            examples_per_step = cfg.batch_size * cfg.accumulation * trainer.world_size
            data = DataState(
                cfg.consumed_examples + (step - cfg.start_step) * examples_per_step, len(self.module.dataset)
            )
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            text_encoder = self.module.text_encoder
            local = save_checkpoint(
                job.workdir / "checkpoints" / checkpoint_name(step),
                step=step,
                unet=self.module.unet.state_dict(),
                text_encoder=text_encoder.state_dict() if text_encoder is not None else None,
                optimizer=trainer.optimizers[0].state_dict(),
                lr_scheduler=trainer.lr_scheduler_configs[0].scheduler.state_dict(),
                grad_scaler=scaler.state_dict() if scaler is not None else None,
                rng=capture_rng(),
                data=data.to_json(),
                config=self.config_json,
            )
            started = time.monotonic()
            try:
                uri = job.store.upload(local, step)
            except Exception as exc:
                # Reported for the daemon's metrics, then the trainer dies; its restart resumes from the previous
                # complete checkpoint (this one has no _COMPLETE marker, so it never counts).
                self.events.emit(
                    "checkpoint_failed",
                    step=step,
                    error=f"{type(exc).__name__}: {exc}"[:500],
                    upload_seconds=round(time.monotonic() - started, 3),
                )
                raise
            upload_seconds = round(time.monotonic() - started, 3)
            shutil.rmtree(local, ignore_errors=True)
            self.events.emit("checkpoint", step=step, uri=uri, upload_seconds=upload_seconds)
            job.store.rotate(job.request.checkpoints_total_limit)
            _upload_logs(job, trainer)
        if barrier:
            trainer.strategy.barrier("checkpoint")


def _upload_logs(job: Job, trainer: pl.Trainer | None) -> str:
    if trainer is not None and trainer.logger is not None:
        trainer.logger.save()
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "flush"):
            experiment.flush()
    bucket, key = parse_s3_uri(job.output_uri)
    logs = job.workdir / "logs"
    if logs.is_dir():
        job.s3.upload_dir(logs, bucket, key + "logs/")
    return f"{job.output_uri}logs/"


# ---- main: build everything ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    accelerator: str
    devices: int
    precision: str
    device: torch.device


def choose_hardware(request: FinetuneRequest, settings: Settings) -> Hardware:
    """GPUs with mixed precision when present (DDP above one device); otherwise the CPU in 32-bit."""
    if torch.cuda.is_available():
        devices = min(settings.finetune.devices, torch.cuda.device_count())
        precision = {
            "bf16": "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed",
            "fp16": "16-mixed",
            "no": "32-true",
        }[request.mixed_precision]
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return Hardware("gpu", devices, precision, torch.device("cuda", local_rank))
    log.info(
        "no CUDA device: training on the CPU in 32-bit precision",
        extra={"mixed_precision_requested": request.mixed_precision},
    )
    return Hardware("cpu", 1, "32-true", torch.device("cpu"))


def _pixels(images: list[Image.Image], request: FinetuneRequest, rng: random.Random) -> list[torch.Tensor]:
    return [image_to_tensor(im, request.resolution, center_crop=request.center_crop, rng=rng) for im in images]


def build_module(
    job: Job, components: Components, class_images: list[Image.Image] | None, hardware: Hardware
) -> DreamBoothModule:
    """Precompute latents (and frozen prompt embeddings), apply a resumed checkpoint's weights, wrap it all."""
    req = job.request
    rng = random.Random(req.seed)
    # The VAE is frozen, so every image's latent distribution is computed ONCE here instead of at every step
    # as the reference script does; each step then samples mean + std * noise. This is most of why training is
    # faster. (The crop of each image is therefore drawn once, not per step.)
    instance = encode_latents(components.vae, _pixels(job.instance_images, req, rng), hardware.device)
    class_latents = (
        encode_latents(components.vae, _pixels(class_images, req, rng), hardware.device) if class_images else None
    )
    vae_config = components.vae.config
    components.vae = None  # frozen and no longer needed: training reads the latents above

    prompts: dict[str, torch.Tensor] = {
        "instance_ids": _token_ids(components.tokenizer, req.instance_prompt),
        "class_ids": _token_ids(components.tokenizer, req.class_prompt or req.instance_prompt),
    }
    text_encoder = components.text_encoder
    if req.train_text_encoder:
        text_encoder.train()
        if req.gradient_checkpointing:
            text_encoder.gradient_checkpointing_enable()
    else:  # frozen: its two outputs are all training needs
        text_encoder.to(hardware.device).eval()
        with torch.no_grad():
            prompts = {
                "instance_embeds": text_encoder(prompts["instance_ids"].to(hardware.device))[0].cpu(),
                "class_embeds": text_encoder(prompts["class_ids"].to(hardware.device))[0].cpu(),
            }
        text_encoder = components.text_encoder = None
    unet = components.unet
    unet.train()
    if req.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # Attention runs through diffusers' default AttnProcessor2_0, i.e. torch's scaled_dot_product_attention.
    if job.resume is not None:
        unet.load_state_dict(job.resume.unet())
        if text_encoder is not None:
            saved = job.resume.text_encoder()
            if saved is None:
                raise PoisonError("checkpoint has no text encoder weights", code="checkpoint_mismatch")
            text_encoder.load_state_dict(saved)
    shift = getattr(vae_config, "shift_factor", None)
    config = LoopConfig(
        seed=req.seed,
        batch_size=req.train_batch_size,
        accumulation=req.gradient_accumulation_steps,
        start_step=job.start_step,
        max_steps=req.max_train_steps,
        consumed_examples=int(job.resume.data["consumed_examples"]) if job.resume is not None else 0,
        learning_rate=req.learning_rate,
        lr_scheduler=req.lr_scheduler,
        lr_warmup_steps=req.lr_warmup_steps,
        prior_loss_weight=req.prior_loss_weight,
        with_prior=class_latents is not None,
        prediction_type=str(components.noise_scheduler.config.prediction_type),
        latent_scale=float(vae_config.scaling_factor),
        latent_shift=float(shift) if shift is not None else None,
    )
    return DreamBoothModule(
        unet=unet,
        text_encoder=text_encoder,
        noise_scheduler=components.noise_scheduler,
        prompts=prompts,
        dataset=LatentPairs(instance, class_latents),
        config=config,
        resume=job.resume,
    )


def build_trainer(job: Job, hardware: Hardware, callback: JobCallback) -> pl.Trainer:
    req = job.request
    logger = TensorBoardLogger(
        save_dir=str(job.workdir / "logs"), name="", version=f"attempt-{job.attempt}", default_hp_metric=False
    )
    return pl.Trainer(
        accelerator=hardware.accelerator,
        devices=hardware.devices,
        strategy="ddp" if hardware.devices > 1 else "auto",
        precision=hardware.precision,  # type: ignore[arg-type]
        max_steps=req.max_train_steps - job.start_step,
        max_epochs=1,  # one pass over a sampler that yields exactly the steps left
        accumulate_grad_batches=req.gradient_accumulation_steps,
        gradient_clip_val=_MAX_GRAD_NORM,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,  # ours are in S3 (checkpoints.py)
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # nothing goes through self.log; metrics are logged with the progress lines
        use_distributed_sampler=False,  # StepSampler shards by rank itself
        default_root_dir=str(job.workdir),
    )


def fit(trainer: pl.Trainer, module: DreamBoothModule, callback: JobCallback, stop: StopFlag) -> bool:
    """Run the training loop; True when it ran to the end, False when SIGTERM stopped it (checkpoint written)."""
    with warnings.catch_warnings():
        # Latents are in memory already: loader worker processes would only add start-up time.
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        # pytorch_lightning 2.6 still calls a pytree API that torch 2.13 deprecates.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        try:
            trainer.fit(module)
        except SIGTERMException:
            log.info("training interrupted by SIGTERM")
    if stop:
        callback.save(trainer, callback.step(trainer), barrier=False)  # if the signal came after the last check
        return False
    return True


def export(job: Job, module: DreamBoothModule, hardware: Hardware, events: Events, stop: StopFlag) -> bool:
    """Save the trained pipeline in diffusers format, sample validation images, upload both and the logs; emit
    `samples` and `completed`. False if SIGTERM came first."""
    req = job.request
    bucket, prefix = parse_s3_uri(job.output_uri)
    local = job.workdir / "export"
    shutil.rmtree(local, ignore_errors=True)
    components: dict[str, Any] = {"unet": module.unet.eval()}
    if module.text_encoder is not None:
        components["text_encoder"] = module.text_encoder.eval()
    pipeline = load_pipeline(job.model_dir, torch.device("cpu"), torch.float32, **components)
    pipeline.save_pretrained(str(local / "pipeline"), safe_serialization=True)
    job.s3.upload_dir(local / "pipeline", bucket, prefix + "pipeline/")
    if stop:
        return False

    pipeline.to(hardware.device, inference_dtype(hardware.device, req.mixed_precision))
    uris = []
    for p, prompt in enumerate(req.validation_prompts or [req.instance_prompt]):
        seeds = [req.seed + i for i in range(req.num_validation_images)]
        images = render(
            pipeline,
            prompt,
            seeds,
            guidance_scale=req.guidance_scale,
            num_inference_steps=req.num_inference_steps,
            resolution=req.resolution,
        )
        for i, image in enumerate(images):
            path = local / "samples" / f"{p:02d}-{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            uris.append(job.s3.upload_file(path, bucket, f"{prefix}samples/{path.name}"))
    events.emit("samples", uris=uris)
    artifacts = {
        "unet": f"{job.output_uri}pipeline/unet/",
        "pipeline": f"{job.output_uri}pipeline/",
        "samples": f"{job.output_uri}samples/",
        "logs": _upload_logs(job, None),
    }
    if module.text_encoder is not None:
        artifacts["text_encoder"] = f"{job.output_uri}pipeline/text_encoder/"
    events.emit("completed", artifacts=artifacts)
    return True


def run(job: Job, events: Events, stop: StopFlag) -> int:
    """Everything after setup: class images, latents, the module and trainer, the loop, the export."""
    req, settings = job.request, job.settings
    hardware = choose_hardware(req, settings)
    components = load_components(job.model_dir)
    if components.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise PoisonError(
            f"unsupported prediction_type {components.noise_scheduler.config.prediction_type!r}",
            code="unknown_base_model",
        )
    class_images = None
    if req.with_prior_preservation:
        assert req.class_prompt is not None  # the schema requires it with prior preservation
        result = ensure_class_images(
            job.s3,
            model_dir=job.model_dir,
            base_model=req.base_model,
            class_prompt=req.class_prompt,
            resolution=req.resolution,
            seed=req.seed,
            count=req.num_class_images,
            guidance_scale=req.guidance_scale,
            num_inference_steps=req.num_inference_steps,
            device=hardware.device,
            dtype=inference_dtype(hardware.device, req.mixed_precision),
            batch_size=8 if hardware.device.type == "cuda" else 4,
            should_stop=lambda: bool(stop),
        )
        if result is None:
            events.emit("stopped", step=job.start_step)
            return EXIT_STOPPED
        events.emit("class_images", generated=result.generated, total=result.total, cache_hit=result.cache_hit)
        class_images = result.images
    if stop:
        events.emit("stopped", step=job.start_step)
        return EXIT_STOPPED

    module = build_module(job, components, class_images, hardware)
    config_json = {
        "signature": job.signature,
        "request": req.model_dump(mode="json"),
        "attempt": job.attempt,
        "precision": hardware.precision,
        "accelerator": hardware.accelerator,
        "devices": hardware.devices,
        "base_model_dir": str(job.model_dir),
        "prediction_type": module.config.prediction_type,
        "versions": {"torch": torch.__version__, "pytorch_lightning": version("pytorch_lightning")},
    }
    callback = JobCallback(job, events, stop, module, config_json)
    events.emit("started", resumed_from_step=job.start_step if job.resume is not None else None, attempt=job.attempt)
    trainer = build_trainer(job, hardware, callback)
    log.info("training", extra={"from_step": job.start_step, "max_steps": req.max_train_steps, **config_json})
    if job.start_step < req.max_train_steps:
        if hardware.device.type == "cpu":
            torch.use_deterministic_algorithms(True)  # bitwise-reproducible resumes on CPU
        finished = fit(trainer, module, callback, stop)
        if not finished:
            events.emit("stopped", step=callback.step(trainer))
            return EXIT_STOPPED
        if not trainer.is_global_zero:
            return EXIT_COMPLETED
    elif stop:
        events.emit("stopped", step=job.start_step)
        return EXIT_STOPPED
    if not export(job, module, hardware, events, stop):
        events.emit("stopped", step=req.max_train_steps)
        return EXIT_STOPPED
    for leftover in ("checkpoints", "resume", "export"):
        shutil.rmtree(job.workdir / leftover, ignore_errors=True)
    return EXIT_COMPLETED


def main(argv: list[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run one job. With `out` (tests), events go there and process-wide state (stdout, logging, signal
    handlers) is left alone; without it, this is the trainer process and owns all of that."""
    parser = argparse.ArgumentParser(prog="ocrbooth train", description="Run one DreamBooth fine-tuning job.")
    parser.add_argument("job", type=Path, help="JOB.json: a TrainJob (see ocrbooth.models.dreambooth)")
    args = parser.parse_args(argv)
    standalone = out is None
    if standalone:
        _die_with_parent()
    events = Events(_claim_stdout() if out is None else out, enabled=_is_rank_zero())
    stop = StopFlag()
    previous = signal.signal(signal.SIGTERM, stop.request) if standalone else None
    try:
        try:
            settings = load_settings()
        except ConfigError as exc:
            events.emit("failed", code=exc.code, message=str(exc))
            return EXIT_FAILED
        if standalone:
            from ocrbooth.logs import configure_logging

            configure_logging(settings.log.level, settings.log.format)
            _quiet_libraries()
        job = setup(args.job, settings)
        return run(job, events, stop)
    except PoisonError as exc:
        log.warning("job failed: %s", exc, extra={"code": exc.code})
        events.emit("failed", code=exc.code, message=exc.message)
        return EXIT_FAILED
    except Exception:
        log.exception("trainer crashed")
        return EXIT_CRASHED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _die_with_parent() -> None:
    """When the daemon that started us dies (SIGKILL, OOM), stop too: an orphan would keep training and
    writing checkpoints while another replica resumes the same job. Linux only; elsewhere a no-op."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(EXIT_CRASHED)
    # Lightning's DDP launcher starts ranks 1.. as our children with a copy of this environment: their parent
    # is this process, not the daemon (and PDEATHSIG makes them die with us, and so with the daemon).
    os.environ[PARENT_PID_ENV] = str(os.getpid())


def _quiet_libraries() -> None:
    """Progress bars and chatter off: the protocol is on stdout, and stderr is for our log lines."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()  # type: ignore[no-untyped-call]


__all__ = [
    "EXIT_COMPLETED",
    "EXIT_CRASHED",
    "EXIT_FAILED",
    "EXIT_STOPPED",
    "DreamBoothModule",
    "Events",
    "Job",
    "JobCallback",
    "fit",
    "main",
    "setup",
    "validate_request",
]


if __name__ == "__main__":
    sys.exit(main())
