"""The model side of the trainer: the base pipeline's parts, precomputed latents, and `DreamBoothModule`.

The step is built for a GPU that a batch of 2 at 512 px does not fill: everything that does not change during
training (VAE latents, frozen prompt embeddings, token ids) is computed once and kept on the device; the UNet
(and the text encoder when trained) forward and the loss run as one `torch.compile`d function with static shapes;
AdamW is the fused CUDA kernel; nothing in a step waits on the GPU (the loss is summed on the device and read
every `progress_every_steps`). On the CPU, or with `StepOptions.compile` off, the same step runs eagerly, and a
compilation that fails falls back to it with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
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

log = logging.getLogger(__name__)

_ENCODE_BATCH = 8
CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"]


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

    compile: bool = True
    """torch.compile the forward + loss (UNet, and the text encoder when trained)."""
    compile_mode: CompileMode = "default"
    """Inductor mode; `reduce-overhead` adds CUDA graphs."""
    channels_last: bool = True
    """UNet weights and latents in NHWC, the layout cuDNN's and Inductor's fastest convolutions use."""
    fused_optimizer: bool = True
    """AdamW as one fused CUDA kernel per parameter group instead of a for-each kernel per operation."""

    @classmethod
    def eager(cls) -> StepOptions:
        return cls(compile=False, channels_last=False, fused_optimizer=False)


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
        options: StepOptions | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
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
        self.compiled = False
        self._step_fn: Any = self._forward_loss

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

    def _inputs(
        self, index: torch.Tensor, micro_batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noisy latents, timesteps, conditioning and target of one micro-batch. The noise comes from a generator
        seeded by (seed, micro-batch, rank) on the training device, with no host round trip."""
        cfg = self.config
        generator = torch.Generator(device=self.device).manual_seed(micro_seed(cfg.seed, micro_batch, self.global_rank))
        mean, std = self._gather(index)
        shape, n = mean.shape, mean.shape[0]
        sample_noise = torch.randn(shape, generator=generator, device=self.device)
        noise = torch.randn(shape, generator=generator, device=self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (n,), generator=generator, device=self.device)
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

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        cfg = self.config
        micro_batch = cfg.start_step * cfg.accumulation + batch_idx
        loss: torch.Tensor = self._step_fn(*self._inputs(batch, micro_batch))
        # Summed on the device: the host reads it only for a progress line.
        self.loss_sum.add_(loss.detach())
        self.loss_count += 1
        return loss

    def take_mean_loss(self) -> float | None:
        """The mean loss since the last call (a host sync: call it every few steps only)."""
        if self.loss_count == 0:
            return None
        value = float(self.loss_sum.item()) / self.loss_count
        self.loss_sum.zero_()
        self.loss_count = 0
        return value

    # ---- compilation -----------------------------------------------------------------------------------------------

    def prepare_fast_step(self, autocast: Callable[[], AbstractContextManager[Any]]) -> None:
        """On a GPU: compile the step and run it once on dummy inputs under `autocast` (the Trainer's precision
        context), so that compilation happens here, and if it fails, training goes on eagerly with a warning."""
        if self.device.type != "cuda" or not self.options.compile:
            return
        compiled: Any = torch.compile(self._forward_loss, mode=self.options.compile_mode, dynamic=False)
        index = torch.arange(self.config.batch_size, device=self.device) % len(self.dataset)
        try:
            for _ in range(3 if self.options.compile_mode == "reduce-overhead" else 1):  # CUDA graphs record at 3rd
                with autocast():
                    loss = compiled(*self._inputs(index, micro_batch=-1))
                loss.backward()
        except Exception as exc:  # Dynamo/Inductor/Triton raise many types; any of them means "run eagerly"
            log.warning("torch.compile failed; training runs eagerly: %s", str(exc).splitlines()[0][:300])
            torch._dynamo.reset()
            compiled = None
        finally:
            for p in self.trainable_parameters():
                p.grad = None
        if compiled is not None:
            self._step_fn = compiled
            self.compiled = True

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
        # Stepped once per optimizer step by Lightning, so no scaling by the number of processes.
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
        )
        if self.resume is not None:
            optimizer.load_state_dict(self.resume.optimizer())
            scheduler.load_state_dict(self.resume.lr_scheduler())
            _match_layouts(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        # Lightning refuses to clip for a fused optimizer under any AMP precision; with bf16 (no scaler) the
        # gradients are already unscaled, and with fp16 the optimizer is not fused and Lightning unscaled them.
        torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.max_grad_norm, foreach=True)


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
    "StepOptions",
    "encode_latents",
    "load_components",
    "micro_seed",
    "token_ids",
]
