"""Regional compilation: each decoder and vision-encoder layer's forward through `torch.compile`.

Why: a profiled H100 decode step (175 slots) spent 16.2 of its 21.4 ms of kernel time in the attention kernel
and 5.2 ms in ~1,640 small elementwise kernels (~59 a layer); a 4-page prefill spent 29.8 ms a page in
elementwise kernels and copies against 13.2 ms in matrix products (`bench/results/traces/kernel_groups.txt`).
Those kernels are the layers' RMSNorms, q/k norms, rotary embeddings, SwiGLU and residual adds, each its own
pass over the activations in eager PyTorch. Inductor fuses them into a few Triton kernels a layer.

What is compiled: the `forward` of every layer of the decoder (Qwen3) and the vision encoder (Pixtral), with
dynamic shapes, so one graph serves any token count (prefill, vision) or slot count (decode). The engine's
attention functions and the paged cache's write stay outside the graphs (attention.py wraps them in
`torch.compiler.disable`: the graph breaks there, and what lies between is compiled), so the measured kernels
keep running as they are. Compiling is paid at load (the engine's first prefill and its decode warm-up run
before the CUDA graphs are captured): Dynamo traces each decoder layer apart (its `layer_idx` is a constant to
it), but their graphs are the same, so Inductor generates the code once (its FX graph cache); the vision
layers share one trace.

Failure: a compile that raises (TorchDynamo or Inductor, e.g. no working Triton) puts every layer back on its
eager forward for good, with a warning; the call that failed is rerun eagerly. Out-of-memory and CUDA errors
are not compile failures and go up as they are.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

BACKEND: str | Callable[..., Any] = "inductor"
"""torch.compile's backend for the layers (a test swaps in one that fails)."""


@dataclass(slots=True)
class CompiledLayers:
    """The layers running compiled, and whether a compile failure has sent them all back to eager."""

    layers: int = 0
    failed: str | None = None
    recompile_limit: int = 8
    """TorchDynamo's limit on cache entries a code object may get, raised for these layers: see `_dynamo_settings`."""
    _originals: list[tuple[torch.nn.Module, Any]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.layers > 0 and self.failed is None

    def fall_back(self, exc: BaseException) -> None:
        """Every layer back on its eager forward (idempotent)."""
        if self.failed is not None:
            return
        cause = getattr(exc, "inner_exception", None) or exc  # BackendCompilerFailed wraps the backend's error
        lines = str(cause).strip().splitlines()
        self.failed = f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"
        for module, original in self._originals:
            module.forward = original
        log.warning("LightOnOCR: compiling the model's layers failed (%s); running them eagerly", self.failed)


def compile_layers(net: Any) -> CompiledLayers:
    """Point the forward of each decoder and vision-encoder layer of `net` (a LightOnOcrForConditionalGeneration)
    at its compiled form; returns the record of what changed."""
    state = CompiledLayers()
    decoder, vision = list(net.model.language_model.layers), list(net.model.vision_encoder.transformer.layers)
    layers: Iterable[torch.nn.Module] = [*decoder, *vision]
    state.recompile_limit = 4 * max(len(decoder), len(vision), 1)
    for module in layers:
        original = module.forward  # the class's, bound (an instance attribute outranks it from here on)
        module.forward = _CompiledForward(state, original)
        state._originals.append((module, original))
        state.layers += 1
    return state


_THREAD = threading.local()


def _dynamo_settings(state: CompiledLayers) -> None:
    """TorchDynamo's settings for the layers, in the calling thread (its settings are per thread, and the engine
    core's thread runs most forwards). Each decoder layer hands its own `layer_idx` (a constant to Dynamo) to
    the cache's write, so each layer gets its own cache entries of the shared code: one per layer and shape
    family. Past `recompile_limit` (default 8) Dynamo runs the remaining layers eagerly with no more than a
    log line: an H100 run of the 28-layer decoder compiled 8 layers for prefill and none for decode."""
    if getattr(_THREAD, "recompile_limit", 0) >= state.recompile_limit:
        return
    config: Any = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, state.recompile_limit)
    _THREAD.recompile_limit = state.recompile_limit


class _CompiledForward:
    """A layer's forward through torch.compile, with the fall-back above."""

    __slots__ = ("_compiled", "_eager", "_state")

    def __init__(self, state: CompiledLayers, eager: Callable[..., Any]) -> None:
        self._state = state
        self._eager = eager
        self._compiled = torch.compile(eager, dynamic=True, backend=BACKEND)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._state.failed is None:
            _dynamo_settings(self._state)
            try:
                return self._compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as exc:  # Inductor's errors derive from it too
                self._state.fall_back(exc)
        return self._eager(*args, **kwargs)


__all__ = ["CompiledLayers", "compile_layers"]
