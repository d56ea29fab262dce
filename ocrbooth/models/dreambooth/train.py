"""The DreamBooth trainer: `python -m ocrbooth.models.dreambooth.train JOB.json` (or `ocrbooth train JOB.json`).

Shaped like litgpt's recipes: `setup()` parses and validates the job and resolves every input (instance images,
base model, the checkpoint to resume from) before any GPU work; `main()` builds the pieces (class images, latents,
the LightningModule, the Trainer) and `fit()` runs the loop. The parts live beside this file: `module.py` (the
LightningModule and the choice of its fast step), `step_graphs.py` (that step as CUDA graphs), `callbacks.py`
(progress, checkpoints, stop), `export.py` (checkpoint upload, the trained pipeline), `protocol.py` (the JSON-line
events the daemon reads), `prior.py` (class images). The package docstring (`ocrbooth.models.dreambooth`)
documents JOB.json, the exit codes and the S3 layout.

Resuming is exact: the example order is a function of (seed, position) (`data.StepSampler`), the noise of every
micro-batch comes from a generator seeded by (seed, micro-batch, rank), and a checkpoint holds weights, optimizer,
LR scheduler, grad scaler and RNG states. On CPU (deterministic kernels) a run killed and resumed ends with
weights bitwise equal to an uninterrupted run's; on GPUs it is the same computation up to kernel nondeterminism.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TextIO

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

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
from ocrbooth.models.dreambooth.callbacks import JobCallback, StopFlag
from ocrbooth.models.dreambooth.checkpoints import CheckpointStore
from ocrbooth.models.dreambooth.data import (
    LatentPairs,
    S3Objects,
    fetch_instance_images,
    image_to_tensor,
    resolve_model_dir,
)
from ocrbooth.models.dreambooth.export import export_pipeline
from ocrbooth.models.dreambooth.generate import inference_dtype
from ocrbooth.models.dreambooth.job import Job, training_signature
from ocrbooth.models.dreambooth.module import (
    Components,
    DreamBoothModule,
    LoopConfig,
    StepOptions,
    encode_latents,
    frozen_prompts,
    load_components,
    token_ids,
)
from ocrbooth.models.dreambooth.prior import ensure_class_images
from ocrbooth.models.dreambooth.protocol import (
    ClassImagesEvent,
    Emitter,
    FailedEvent,
    StartedEvent,
    StoppedEvent,
    claim_stdout,
    is_rank_zero,
)
from ocrbooth.schemas.finetune import FinetuneRequest

log = logging.getLogger(__name__)

EXIT_CRASHED = 1  # anything unexpected: the daemon reruns the job from its newest checkpoint
_MAX_GRAD_NORM = 1.0


# ---- setup: validate and resolve -----------------------------------------------------------------------------------


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


def step_options(settings: Settings, hardware: Hardware) -> StepOptions:
    """The fast-step knobs from the settings (`OCRBOOTH_FINETUNE_CUDA_GRAPHS`, `..._COMPILE`, `..._COMPILE_MODE`);
    `module.choose_step` then turns graphs off where they cannot run (DDP, fp16, gradient checkpointing)."""
    cfg = settings.finetune
    mode = cfg.compile_mode
    if hardware.devices > 1 and mode == "reduce-overhead":
        mode = "default"  # CUDA graphs around DDP's gradient all-reduce are not supported
    return StepOptions(graph=cfg.cuda_graphs, compile=cfg.compile, compile_mode=mode)


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
        "instance_ids": token_ids(components.tokenizer, req.instance_prompt),
        "class_ids": token_ids(components.tokenizer, req.class_prompt or req.instance_prompt),
    }
    text_encoder = components.text_encoder
    if req.train_text_encoder:
        text_encoder.train()
        if req.gradient_checkpointing:
            text_encoder.gradient_checkpointing_enable()
    else:
        prompts = frozen_prompts(text_encoder, prompts, hardware.device)
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
        max_grad_norm=_MAX_GRAD_NORM,
    )
    return DreamBoothModule(
        unet=unet,
        text_encoder=text_encoder,
        noise_scheduler=components.noise_scheduler,
        prompts=prompts,
        dataset=LatentPairs(instance, class_latents),
        config=config,
        resume=job.resume,
        options=step_options(job.settings, hardware),
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
        # No accumulate_grad_batches / gradient_clip_val: the module optimizes manually and does both itself
        # (LoopConfig.accumulation, LoopConfig.max_grad_norm), which is what lets a CUDA graph hold the backward.
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
    if stop or callback.stopping:
        # Stopped (this rank's signal, or another rank's through the agreement). The save is a no-op when the
        # stop step is already checkpointed, and covers a signal that came after the last check (rank 0 writes).
        callback.save(trainer, callback.step(trainer), barrier=False)
        return False
    return True


def run(job: Job, events: Emitter, stop: StopFlag) -> int:
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
        started = time.monotonic()
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
            batch_size=settings.finetune.class_images_batch_size or None,
            compile=settings.finetune.compile,
            graph=settings.finetune.cuda_graphs,
            should_stop=lambda: bool(stop),
        )
        if result is None:
            events.emit(StoppedEvent(step=job.start_step))
            return EXIT_STOPPED
        seconds = round(time.monotonic() - started, 3) if result.generated else None
        events.emit(
            ClassImagesEvent(
                generated=result.generated, total=result.total, cache_hit=result.cache_hit, seconds=seconds
            )
        )
        class_images = result.images
    if stop:
        events.emit(StoppedEvent(step=job.start_step))
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
        "step_options": vars(module.options) if hardware.device.type == "cuda" else "eager (cpu)",
    }
    callback = JobCallback(job, events, stop, module, config_json)
    events.emit(StartedEvent(resumed_from_step=job.start_step if job.resume is not None else None, attempt=job.attempt))
    trainer = build_trainer(job, hardware, callback)
    log.info("training", extra={"from_step": job.start_step, "max_steps": req.max_train_steps, **config_json})
    if job.start_step < req.max_train_steps:
        if hardware.device.type == "cpu":
            torch.use_deterministic_algorithms(True)  # bitwise-reproducible resumes on CPU
        finished = fit(trainer, module, callback, stop)
        if not finished:
            if not trainer.is_global_zero:
                return EXIT_COMPLETED  # ranks 1.. exit 0; rank 0 speaks for the job (stopped, exit 3)
            events.emit(StoppedEvent(step=callback.step(trainer)))
            return EXIT_STOPPED
        if not trainer.is_global_zero:
            return EXIT_COMPLETED
    elif stop:
        events.emit(StoppedEvent(step=job.start_step))
        return EXIT_STOPPED
    if not export_pipeline(job, module, hardware.device, events, lambda: bool(stop)):
        events.emit(StoppedEvent(step=req.max_train_steps))
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
    events = Emitter(claim_stdout() if out is None else out, enabled=is_rank_zero())
    stop = StopFlag()
    previous = signal.signal(signal.SIGTERM, stop.request) if standalone else None
    try:
        try:
            settings = load_settings()
        except ConfigError as exc:
            events.emit(FailedEvent(code=exc.code, message=str(exc)))
            return EXIT_FAILED
        if standalone:
            from ocrbooth.logs import configure_logging

            configure_logging(settings.log.level, settings.log.format)
            _quiet_libraries()
        job = setup(args.job, settings)
        code = run(job, events, stop)
        log.info("rank %s exits with %d", os.environ.get("LOCAL_RANK", "0"), code)
        return code
    except PoisonError as exc:
        log.warning("job failed: %s", exc, extra={"code": exc.code})
        events.emit(FailedEvent(code=exc.code, message=exc.message))
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
    "Job",
    "fit",
    "main",
    "setup",
    "validate_request",
]


if __name__ == "__main__":
    sys.exit(main())
