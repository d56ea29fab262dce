"""The model side of the trainer: the base pipeline's parts, precomputed latents, and `DreamBoothModule`.

The step is built for a GPU that a batch of 2 at 512 px does not fill, where launching ~4,000 kernels a step
from Python costs more than running them: everything that does not change during training (VAE latents, frozen
prompt embeddings, token ids) is computed once and kept on the device, and on a single CUDA device the
micro-batch's forward and backward (noising, text encoder when trained, UNet, loss, the gradients, the loss
running sum) are captured once into CUDA graphs (`StepGraphs`, in `step_graphs.py`) and replayed at every
micro-batch: one launch instead of thousands, and no compilation. Gradient clipping and the fused AdamW step run
eagerly after the replay, on the real optimizer and LR scheduler (what checkpoints save). Nothing in a step waits
on the GPU: the loss is summed on the device and read every `progress_every_steps`.

`StepOptions` chooses the step: `graph` (the default on one GPU: `OCRBOOTH_FINETUNE_CUDA_GRAPHS`), `compile`
(torch.compile of forward + loss, the earlier option; its compilation costs minutes) or neither (eager). The
CPU always runs the eager step, for bitwise-reproducible resumes. A capture or compilation that fails falls
back to the eager step with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ocrbooth.errors import PoisonError
from ocrbooth.models.dreambooth.checkpoints import Checkpoint
from ocrbooth.models.dreambooth.data import LatentPairs, StepSampler
from ocrbooth.models.dreambooth.step_graphs import StepGraphs
from ocrbooth.models.dreambooth.text_attention import use_causal_sdpa

log = logging.getLogger(__name__)

_ENCODE_BATCH = 8
CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"]
StepKind = Literal["graph", "compiled", "eager"]


# ---- the base pipeline's parts -------------------------------------------------------------------------------------


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


def token_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """The prompt's token ids, padded to the tokenizer's length: shape (1, 77)."""
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


def frozen_prompts(
    text_encoder: Any, prompts: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """With the text encoder frozen its two outputs are all training needs: the instance and class prompts'
    embeddings (float on CPU) from their token ids."""
    text_encoder.to(device).eval()
    with torch.no_grad():
        return {
            "instance_embeds": text_encoder(prompts["instance_ids"].to(device))[0].cpu(),
            "class_embeds": text_encoder(prompts["class_ids"].to(device))[0].cpu(),
        }


def first_line(exc: BaseException) -> str:
    """An exception's first line, for a one-line warning (compiler and CUDA errors run to pages)."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def capture_attempts() -> list[tuple[str, Callable[[], AbstractContextManager[Any]]]]:
    """The attention kernels to capture CUDA graphs with, in order: PyTorch's own choice first (cuDNN's fused
    attention on Hopper), then flash / memory-efficient / math only, in case cuDNN's cannot be captured."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return [("default attention", nullcontext), ("attention without cuDNN", lambda: sdpa_kernel(backends))]


# ---- the module ----------------------------------------------------------------------------------------------------


def micro_seed(seed: int, micro_batch: int, rank: int) -> int:
    """The noise seed of one micro-batch: a function of (seed, micro-batch, rank) only, so a resumed run draws
    exactly what an uninterrupted one would."""
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
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class StepOptions:
    """How the step runs on a GPU (the CPU always runs it eagerly, for bitwise-reproducible resumes)."""

    graph: bool = True
    """Capture the micro-batch's forward + backward into CUDA graphs and replay them (`StepGraphs`)."""
    compile: bool = False
    """torch.compile the forward + loss (UNet, and the text encoder when trained) instead; no graphs then."""
    compile_mode: CompileMode = "default"
    """Inductor mode; `reduce-overhead` adds Inductor's own CUDA graphs."""
    channels_last: bool = True
    """UNet weights and latents in NHWC, the layout cuDNN's fastest convolutions use."""
    fused_optimizer: bool = True
    """AdamW as one fused CUDA kernel per parameter group instead of a for-each kernel per operation."""

    @classmethod
    def eager(cls) -> StepOptions:
        return cls(graph=False, compile=False, channels_last=False, fused_optimizer=False)


def choose_step(
    options: StepOptions, *, device_type: str, world_size: int, grad_scaler: bool, gradient_checkpointing: bool
) -> tuple[StepKind, str]:
    """Which step runs, and why (the reason is logged)."""
    if device_type != "cuda":
        return "eager", "not a CUDA device"
    if options.compile:
        return "compiled", "torch.compile asked for"
    if not options.graph:
        return "eager", "CUDA graphs switched off"
    if world_size > 1:
        return "eager", "DDP reduces gradients in backward hooks, which a captured graph cannot hold"
    if grad_scaler:
        return "eager", "fp16's grad scaler reads found-inf on the host before every optimizer step"
    if gradient_checkpointing:
        return "eager", "gradient checkpointing saves and restores RNG states on the host in backward"
    return "graph", "one CUDA device, no grad scaler, no gradient checkpointing"


class DreamBoothModule(pl.LightningModule):
    """UNet (and optionally the text encoder) trained on precomputed latents with the DreamBooth loss:
    MSE on the instance half of the batch + prior_loss_weight x MSE on the class half.

    Manual optimization: the step owns backward, gradient accumulation (loss / accumulation, the optimizer
    stepped on the last micro-batch), clipping (`on_before_optimizer_step`, after fp16's unscale) and the LR
    scheduler, which is what lets a CUDA graph hold the backward. So the Trainer takes neither
    `accumulate_grad_batches` nor `gradient_clip_val`."""

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
        options: StepOptions | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.unet = unet
        self.text_encoder = text_encoder
        if text_encoder is not None:  # the same attention kernel eager, captured and compiled (text_attention.py)
            use_causal_sdpa(text_encoder)
        self.noise_scheduler = noise_scheduler
        self.dataset = dataset
        self.config = config
        self.resume = resume
        self.options = options or StepOptions()
        for name, tensor in prompts.items():
            self.register_buffer(name, tensor, persistent=False)
        # Plain attributes, not buffers (DDP would broadcast buffers every step); on_fit_start moves them to the
        # device once, and a batch is then only its example indices.
        self.latents = {"instance_mean": dataset.instance[0], "instance_std": dataset.instance[1]}
        if dataset.class_ is not None:
            self.latents |= {"class_mean": dataset.class_[0], "class_std": dataset.class_[1]}
        self.alphas_cumprod: torch.Tensor = noise_scheduler.alphas_cumprod.float().clone()
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.loss_count = 0
        self.step_kind: StepKind = "eager"
        self._step_fn: Any = self._forward_loss
        self._graphs: StepGraphs | None = None
        self._generator: torch.Generator | None = None

    @property
    def compiled(self) -> bool:
        return self.step_kind == "compiled"

    @property
    def rows(self) -> int:
        """Rows of a micro-batch: the instance examples, and as many class examples under prior preservation."""
        return self.config.batch_size * (2 if self.config.with_prior else 1)

    # ---- data ----------------------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader[int]:
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
        # Only example indices: the latents are on the device already. Its own generator: a DataLoader iterator
        # otherwise draws a seed from the global RNG.
        return DataLoader(
            _Indices(len(self.dataset)), batch_size=cfg.batch_size, sampler=sampler, generator=torch.Generator()
        )

    def on_fit_start(self) -> None:
        self.latents = {name: t.to(self.device) for name, t in self.latents.items()}
        self.alphas_cumprod = self.alphas_cumprod.to(self.device)
        self.loss_sum = self.loss_sum.to(self.device)
        self.prepare_fast_step(self.trainer.precision_plugin.train_step_context)

    def on_fit_end(self) -> None:
        self.release_graphs()

    def _gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (mean, std) of the batch: instance rows, then class rows under prior preservation (example i
        is instance i mod N and class image i mod M, as `LatentPairs` pairs them)."""
        lat = self.latents
        n = lat["instance_mean"].shape[0]
        mean, std = lat["instance_mean"][index % n], lat["instance_std"][index % n]
        if self.config.with_prior:
            m = lat["class_mean"].shape[0]
            mean = torch.cat([mean, lat["class_mean"][index % m]])
            std = torch.cat([std, lat["class_std"][index % m]])
        return mean, std

    # ---- the step ------------------------------------------------------------------------------------------------

    def _conditioning(self, n_instance: int, n_class: int) -> torch.Tensor:
        """Token ids (text encoder trained) or prompt embeddings (frozen): instance rows, then class rows."""
        if self.text_encoder is not None:
            instance, class_ = self.get_buffer("instance_ids"), self.get_buffer("class_ids")
            return torch.cat([instance.expand(n_instance, -1), class_.expand(n_class, -1)])
        instance, class_ = self.get_buffer("instance_embeds"), self.get_buffer("class_embeds")
        return torch.cat([instance.expand(n_instance, -1, -1), class_.expand(n_class, -1, -1)])

    def _forward_loss(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """Text encoder (when trained), UNet and the DreamBooth loss: the part that is compiled."""
        cfg = self.config
        if self.text_encoder is not None:
            hidden: torch.Tensor = self.text_encoder(conditioning, return_dict=False)[0]
        else:
            hidden = conditioning
        pred: torch.Tensor = self.unet(noisy, timesteps, hidden, return_dict=False)[0]
        n = cfg.batch_size
        loss = F.mse_loss(pred[:n].float(), target[:n].float())
        if cfg.with_prior:
            loss = loss + cfg.prior_loss_weight * F.mse_loss(pred[n:].float(), target[n:].float())
        return loss

    def draw_noise(
        self, micro_batch: int, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The micro-batch's sampling noise, diffusion noise and timesteps (into `out` when given), from a
        generator seeded by (seed, micro-batch, rank) on the training device, with no host round trip."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
        generator = self._generator.manual_seed(micro_seed(self.config.seed, micro_batch, self.global_rank))
        shape = (self.rows, *self.latents["instance_mean"].shape[1:])
        steps = self.noise_scheduler.config.num_train_timesteps
        if out is None:
            return (
                torch.randn(shape, generator=generator, device=self.device),
                torch.randn(shape, generator=generator, device=self.device),
                torch.randint(0, steps, (self.rows,), generator=generator, device=self.device),
            )
        torch.randn(shape, generator=generator, out=out[0])
        torch.randn(shape, generator=generator, out=out[1])
        torch.randint(0, steps, (self.rows,), generator=generator, out=out[2])
        return out

    def prepare_inputs(
        self, index: torch.Tensor, sample_noise: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noisy latents, timesteps, conditioning and target of one micro-batch (all on the device)."""
        cfg = self.config
        mean, std = self._gather(index)
        n = mean.shape[0]
        latents = mean + std * sample_noise
        if cfg.latent_shift is not None:
            latents = latents - cfg.latent_shift
        latents = latents * cfg.latent_scale
        alpha = self.alphas_cumprod[timesteps].view(n, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        if cfg.prediction_type == "epsilon":
            target = noise
        elif cfg.prediction_type == "v_prediction":
            target = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
        else:  # "sample"
            target = latents
        if self.options.channels_last and self.device.type == "cuda":
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        return noisy, timesteps, self._conditioning(cfg.batch_size, n - cfg.batch_size), target

    def _inputs(
        self, index: torch.Tensor, micro_batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.prepare_inputs(index, *self.draw_noise(micro_batch))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        cfg = self.config
        micro_batch = cfg.start_step * cfg.accumulation + batch_idx
        first = batch_idx % cfg.accumulation == 0
        last = (batch_idx + 1) % cfg.accumulation == 0
        optimizer: Any = self.optimizers()
        if self._graphs is not None:
            loss = self._graphs.replay(batch, micro_batch, first=first)  # adds to loss_sum on the device
        else:
            # Under DDP, only the last micro-batch's backward all-reduces the gradients.
            sync = nullcontext() if last or self.trainer.world_size == 1 else optimizer.toggle_model(sync_grad=False)
            with sync:
                loss = self._step_fn(*self._inputs(batch, micro_batch))
                self.manual_backward(loss / cfg.accumulation if cfg.accumulation > 1 else loss)
            # Summed on the device: the host reads it only for a progress line.
            self.loss_sum.add_(loss.detach())
        self.loss_count += 1
        if last:
            optimizer.step()  # on_before_optimizer_step clips first
            if self._graphs is None:
                optimizer.zero_grad(set_to_none=True)
            # else: the gradients are the graphs' static outputs, overwritten by the next micro-batch's replay
            scheduler: Any = self.lr_schedulers()
            scheduler.step()
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Called by Lightning's precision plugin after the fp16 grad scaler unscaled the gradients (Lightning's
        # own clipping does not run under manual optimization; with a fused optimizer it refuses AMP anyway).
        torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.max_grad_norm, foreach=True)

    def take_mean_loss(self) -> float | None:
        """The mean loss since the last call (a host sync: call it every few steps only)."""
        if self.loss_count == 0:
            return None
        value = float(self.loss_sum.item()) / self.loss_count
        self.loss_sum.zero_()
        self.loss_count = 0
        return value

    # ---- the fast step -------------------------------------------------------------------------------------------

    def prepare_fast_step(self, autocast: Callable[[], AbstractContextManager[Any]]) -> None:
        """Pick the step (`choose_step`) and build it: capture the CUDA graphs, or compile and run once on dummy
        inputs, under `autocast` (the Trainer's precision context). Either one failing means a warning and the
        eager step, not a failed job."""
        te = self.text_encoder
        kind, reason = choose_step(
            self.options,
            device_type=self.device.type,
            world_size=self.trainer.world_size,
            grad_scaler=getattr(self.trainer.precision_plugin, "scaler", None) is not None,
            gradient_checkpointing=bool(getattr(self.unet, "is_gradient_checkpointing", False))
            or (te is not None and bool(getattr(te, "is_gradient_checkpointing", False))),
        )
        if kind == "graph":
            self._graphs = self._capture_graphs(autocast)
            if self._graphs is None:
                kind, reason = "eager", "CUDA graph capture failed"
        elif kind == "compiled" and not self._compile(autocast):
            kind, reason = "eager", "torch.compile failed"
        self.step_kind = kind
        log.info("training step: %s (%s)", kind, reason)

    def _capture_graphs(self, autocast: Callable[[], AbstractContextManager[Any]]) -> StepGraphs | None:
        """`StepGraphs`, captured with the default attention kernels or else without cuDNN's; None if neither
        capture works (a warning each time: the job then trains eagerly)."""
        for label, attention in capture_attempts():
            try:
                with torch.enable_grad(), attention():
                    return StepGraphs(self, autocast)
            except Exception as exc:  # capture errors come as RuntimeError, torch.AcceleratorError, OOM...
                log.warning("CUDA graph capture (%s) failed: %s", label, first_line(exc))
                self.release_graphs()
        log.warning("no CUDA graph could be captured: training runs eagerly")
        return None

    def _compile(self, autocast: Callable[[], AbstractContextManager[Any]]) -> bool:
        compiled: Any = torch.compile(self._forward_loss, mode=self.options.compile_mode, dynamic=False)
        index = torch.arange(self.config.batch_size, device=self.device) % len(self.dataset)
        try:
            for _ in range(3 if self.options.compile_mode == "reduce-overhead" else 1):  # CUDA graphs record at 3rd
                with autocast():
                    loss = compiled(*self._inputs(index, micro_batch=-1))
                loss.backward()
        except Exception as exc:  # Dynamo/Inductor/Triton raise many types; any of them means "run eagerly"
            log.warning("torch.compile failed; training runs eagerly: %s", first_line(exc))
            torch._dynamo.reset()
            return False
        finally:
            for p in self.trainable_parameters():
                p.grad = None
        self._step_fn = compiled
        return True

    def release_graphs(self) -> None:
        """Drop the CUDA graphs, their memory pool and the gradients that live in it."""
        if self._graphs is None and self.device.type != "cuda":
            return
        self._graphs = None
        for p in self.trainable_parameters():
            p.grad = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- optimizer -------------------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.unet.parameters())
        if self.text_encoder is not None:
            params += list(self.text_encoder.parameters())
        return params

    def configure_optimizers(self) -> Any:
        from diffusers.optimization import get_scheduler

        cfg = self.config
        if self.options.channels_last and self.device.type == "cuda":  # before the optimizer sees the weights
            self.unet.to(memory_format=torch.channels_last)
        # Fused AdamW unscales fp16 gradients itself, after clipping would have run: only without a grad scaler.
        fused = (
            self.options.fused_optimizer
            and self.device.type == "cuda"
            and getattr(self.trainer.precision_plugin, "scaler", None) is None
        )
        optimizer = torch.optim.AdamW(
            self.trainable_parameters(),
            lr=cfg.learning_rate,
            betas=(0.9, 0.999),
            weight_decay=1e-2,
            eps=1e-8,
            fused=fused or None,
        )
        # Stepped once per optimizer step by training_step, so no scaling by the number of processes.
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
        )
        if self.resume is not None:
            optimizer.load_state_dict(self.resume.optimizer())
            scheduler.load_state_dict(self.resume.lr_scheduler())
            _match_layouts(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give resumed moment estimates their parameter's memory layout (a checkpoint from an eager run is NCHW,
    channels-last weights are NHWC): the fused kernel walks all of them in the parameter's order."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


class _Indices(torch.utils.data.Dataset[int]):
    """Example i is just i: the module gathers latents on the device."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


__all__ = [
    "Components",
    "DreamBoothModule",
    "LoopConfig",
    "StepKind",
    "StepOptions",
    "capture_attempts",
    "choose_step",
    "encode_latents",
    "first_line",
    "load_components",
    "micro_seed",
    "token_ids",
]
