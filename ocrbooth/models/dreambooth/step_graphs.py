"""`StepGraphs`: the training micro-step (forward and backward) captured once into CUDA graphs and replayed at
every micro-batch: one launch instead of thousands, and no compilation.

`DreamBoothModule` (`module.py`) decides whether to use it (`choose_step`), captures it in `_capture_graphs` (with
the attention kernels of `capture_attempts`, falling back to the eager step when no capture works) and replays it
from `training_step`; clipping and the optimizer step stay eager, in the module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # module.py imports this one to capture the graphs; only the type comes back
    from ocrbooth.models.dreambooth.module import DreamBoothModule

log = logging.getLogger(__name__)

_GRAPH_WARMUP = 3  # eager micro-steps on a side stream before capture (lazy inits, cuDNN/cuBLAS handles)


class StepGraphs:
    """One micro-batch's forward and backward as CUDA graphs: gather and noise the latents, text encoder (when
    trained), UNet, loss, backward into the parameters' gradients, and the loss into the module's running sum.

    PyTorch's whole-network capture recipe: a few eager micro-steps on a side stream first (cuBLAS/cuDNN
    handles, autotuning, the allocator's pool), then the same code captured once. Inputs are static device
    buffers: the example indices (copied from the batch) and the noise and timesteps, drawn before each replay
    from the module's (seed, micro-batch, rank) generator exactly as the eager step draws them, so a replay
    computes what the eager step computes. `first` is captured with no gradients present (backward writes
    them, in the graph's pool, where they stay); under gradient accumulation `accumulate` is captured after
    it, with the gradients present, so that backward adds to them in place. Clipping and the optimizer step
    are not captured: they run eagerly on the gradients after the last micro-batch's replay, so the optimizer
    state and LR schedule are the ordinary ones that checkpoints save and restore.

    The gradient tensors the graphs write are held here too (`grads`) and put back on the parameters after
    every replay: Lightning's `Trainer` calls `zero_grad()` (set to None) between `on_fit_start`, where the
    graphs are captured, and the first training step, and again before validation. Without this the optimizer
    saw no gradient and skipped every parameter (the weights never moved), while the graphs went on writing
    into memory the parameters no longer referenced."""

    def __init__(self, module: DreamBoothModule, autocast: Callable[[], AbstractContextManager[Any]]) -> None:
        self.module = module
        self.autocast = autocast
        device = module.device
        shape = (module.rows, *module.latents["instance_mean"].shape[1:])
        self.index = torch.zeros(module.config.batch_size, dtype=torch.long, device=device)
        self.sample_noise = torch.zeros(shape, device=device)
        self.noise = torch.zeros(shape, device=device)
        self.timesteps = torch.zeros(module.rows, dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)
        self.params = module.trainable_parameters()
        self.first = torch.cuda.CUDAGraph()
        self.accumulate: torch.cuda.CUDAGraph | None = None
        self._capture()

    def _micro_step(self) -> None:
        m = self.module
        with self.autocast():
            loss = m._forward_loss(*m.prepare_inputs(self.index, self.sample_noise, self.noise, self.timesteps))
        (loss / m.config.accumulation if m.config.accumulation > 1 else loss).backward()  # type: ignore[no-untyped-call]
        self.loss.copy_(loss.detach())
        m.loss_sum.add_(self.loss)

    def _capture(self) -> None:
        m = self.module
        m.draw_noise(-1, out=(self.sample_noise, self.noise, self.timesteps))
        for p in self.params:
            p.grad = None
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_GRAPH_WARMUP):  # the first writes the gradients, the others add to them
                self._micro_step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        for p in self.params:
            p.grad = None  # captured with none, so that the graph's backward allocates them in its pool
        with torch.cuda.graph(self.first):  # (empties the allocator's cache first: no warm-up memory is kept)
            self._micro_step()
        if m.config.accumulation > 1:
            self.accumulate = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.accumulate, pool=self.first.pool()):
                self._micro_step()
        self.grads: list[torch.Tensor | None] = [p.grad for p in self.params]
        missing = [i for i, g in enumerate(self.grads) if g is None]
        if missing:
            log.info("%d trainable tensors get no gradient from the step", len(missing))
        m.loss_sum.zero_()  # the warm-up's losses

    def replay(self, index: torch.Tensor, micro_batch: int, *, first: bool) -> torch.Tensor:
        """Run one micro-batch; the returned loss tensor is overwritten by the next replay."""
        self.index.copy_(index, non_blocking=True)
        self.module.draw_noise(micro_batch, out=(self.sample_noise, self.noise, self.timesteps))
        (self.first if first or self.accumulate is None else self.accumulate).replay()
        self._bind_grads()
        return self.loss

    def _bind_grads(self) -> None:
        """Put the graphs' gradient tensors back on the parameters if anything (a `zero_grad()`) removed them."""
        if all(p.grad is g for p, g in zip(self.params, self.grads, strict=True)):
            return
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g


__all__ = ["StepGraphs"]
