"""Load-time choices measured on this card (vLLM and TensorRT-LLM tune their kernels the same way):

- the Triton decode kernel's launch configuration (positions per tile, warps, tiles in flight), timed on a
  synthetic paged cache of the engine's slot count at a full page's context;
- the attention for the vision encoder (non-causal, head dim 64, ~9,000 patches a page) and for the
  decoder's prefill (causal, head dim 128): flash, cuDNN or memory-efficient SDPA per segment, or, where the
  optional flash-attn-4 package loads, one variable-length call over all segments (varlen.py).

Each candidate's output is checked before its time counts (decode: against the gather + SDPA reference;
SDPA: against flash), so a configuration that computes something else is never chosen; a candidate that fails
to compile or run is skipped, and with none left the defaults stay. It takes a few seconds
and runs before the KV cache is allocated; the caller gives its buffers back (`torch.cuda.empty_cache()`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ocrbooth.models.ocr.lightonocr.attention import DecodeKernel, paged_decode_reference, paged_decode_triton
from ocrbooth.models.ocr.lightonocr.varlen import VarlenAttention, cumulative_lengths

log = logging.getLogger(__name__)

DECODE_CANDIDATES: Final = (
    DecodeKernel(),  # the first kernel's loop (the default when not tuned)
    DecodeKernel(128, 8),
    DecodeKernel(64, 4, 2, pipelined=True),
    DecodeKernel(64, 4, 3, pipelined=True),
    DecodeKernel(64, 4, 4, pipelined=True),
    DecodeKernel(32, 4, 3, pipelined=True),
    DecodeKernel(32, 2, 4, pipelined=True),
    DecodeKernel(64, 8, 3, pipelined=True),
)
SDPA_CANDIDATES: Final = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
VARLEN_NAME: Final = "FLASH_ATTN_4_VARLEN"  # the optional package's kernel in timings and logs
_FALLBACKS: Final = (
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)
_TOLERANCE: Final = 2e-2  # bf16 outputs of the same attention in another order differ by ~1e-3
_RELATIVE_TOLERANCE: Final = 1e-2  # bf16 kernel against the float32 reference (the GPU test's bound)


@dataclass(frozen=True, slots=True)
class AttentionChoice:
    """What runs the prefill's or the vision encoder's attention."""

    backends: tuple[SDPBackend, ...] | None = None
    """SDPA backends in priority order, per segment (None: PyTorch's default order)."""
    varlen: bool = False
    """One variable-length flash-attention call over all segments instead (varlen.py), measured faster."""


@dataclass(slots=True)
class Tuning:
    """What the engine uses, and what was measured to choose it (for logs and benchmarks)."""

    decode_kernel: DecodeKernel = field(default_factory=DecodeKernel)
    vision: AttentionChoice = field(default_factory=AttentionChoice)
    """The vision encoder's attention (per image)."""
    prefill: AttentionChoice = field(default_factory=AttentionChoice)
    """The decoder prefill's attention (per page, causal)."""
    measured: dict[str, Any] = field(default_factory=dict)


def describe(choice: AttentionChoice) -> str:
    """How a choice reads in logs and benchmark results."""
    if choice.varlen:
        return VARLEN_NAME
    return choice.backends[0].name if choice.backends else "default"


def priority(backend: SDPBackend) -> tuple[SDPBackend, ...]:
    """`backend` first, then PyTorch's usual ones, for inputs the chosen backend does not take."""
    return (backend, *(b for b in _FALLBACKS if b != backend))


def _median_ms(fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(float(start.elapsed_time(end)))
    return sorted(times)[len(times) // 2]


def tune_decode_kernel(
    *,
    device: torch.device,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    max_blocks_per_slot: int,
    kv_dtype: torch.dtype | None = None,
    slots: int,
    context: int,
    candidates: Sequence[DecodeKernel] = DECODE_CANDIDATES,
) -> tuple[DecodeKernel, dict[str, float]]:
    """The fastest correct candidate at `slots` slots of `context` positions each; GB/s of K/V per candidate."""
    blocks_per_slot = -(-context // block_size)
    rows = (slots * blocks_per_slot + 1) * block_size
    generator = torch.Generator(device=device).manual_seed(0)
    kv_dtype = kv_dtype or dtype
    k_cache = torch.randn(rows, kv_heads, head_dim, device=device, dtype=dtype, generator=generator).to(kv_dtype)
    v_cache = torch.randn(rows, kv_heads, head_dim, device=device, dtype=dtype, generator=generator).to(kv_dtype)
    order = torch.randperm(slots * blocks_per_slot, device=device, generator=generator).to(torch.int32) + 1
    table = torch.zeros(slots, max(max_blocks_per_slot, blocks_per_slot), dtype=torch.int32, device=device)
    table[:, :blocks_per_slot] = order.view(slots, blocks_per_slot)
    lengths = torch.full((slots,), context, dtype=torch.int32, device=device)
    q = torch.randn(slots, heads, head_dim, device=device, dtype=dtype, generator=generator)
    scale = head_dim**-0.5
    kv_bytes = slots * context * kv_heads * head_dim * kv_dtype.itemsize * 2
    # the gather + SDPA reference is what every candidate must compute (checked on a few slots)
    checked = min(slots, 8)
    expected = paged_decode_reference(
        q[:checked], k_cache, v_cache, table[:checked], lengths[:checked], block_size, scale, context
    ).float()
    rates: dict[str, float] = {}
    best, best_ms = DecodeKernel(), float("inf")
    for kernel in candidates:
        if kernel.pipelined and block_size % kernel.tile:
            continue
        name = f"{'pipelined' if kernel.pipelined else 'masked'}_tile{kernel.tile}_w{kernel.warps}"
        name += f"_s{kernel.stages}" if kernel.pipelined else ""
        try:
            got = paged_decode_triton(q, k_cache, v_cache, table, lengths, block_size, scale, kernel=kernel)
            error = float((got[:checked].float() - expected).norm() / expected.norm())
            if not error < _RELATIVE_TOLERANCE:  # NaN too
                log.warning("decode kernel %s differs from the reference by %.3g; not used", name, error)
                continue

            def launch(k: DecodeKernel = kernel) -> torch.Tensor:
                return paged_decode_triton(q, k_cache, v_cache, table, lengths, block_size, scale, kernel=k)

            ms = _median_ms(launch)
        except Exception as exc:  # a configuration this card or Triton build cannot compile or run
            log.info("decode kernel %s skipped: %s", name, str(exc).splitlines()[0][:200])
            continue
        rates[name] = kv_bytes / ms / 1e6
        if ms < best_ms:
            best, best_ms = kernel, ms
    return best, rates


def tune_sdpa(
    *,
    device: torch.device,
    dtype: torch.dtype,
    heads: int,
    tokens: int,
    head_dim: int,
    causal: bool,
    kv_heads: int | None = None,
    varlen: VarlenAttention | None = None,
    candidates: Sequence[SDPBackend] = SDPA_CANDIDATES,
) -> tuple[AttentionChoice, dict[str, float]]:
    """The fastest correct way to attend within one segment of `tokens` (the layout the model hands over:
    heads transposed out of [tokens, heads, dim]; K/V with `kv_heads`, repeated for SDPA as the engine does):
    each SDPA backend, and `varlen` where given; milliseconds per candidate."""
    generator = torch.Generator(device=device).manual_seed(0)
    kv_heads = kv_heads or heads

    def layout(n: int) -> torch.Tensor:
        return torch.randn(1, tokens, n, head_dim, device=device, dtype=dtype, generator=generator).transpose(1, 2)

    q, k, v = layout(heads), layout(kv_heads), layout(kv_heads)
    k_rep, v_rep = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    scale = head_dim**-0.5

    def attend() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=causal, scale=scale)

    timings: dict[str, float] = {}
    reference: torch.Tensor | None = None
    best: SDPBackend | None = None
    best_ms = float("inf")
    with torch.inference_mode():
        for backend in candidates:
            try:
                with sdpa_kernel([backend]):
                    got = attend().float()
                    if reference is None:
                        reference = got
                    elif float((got - reference).abs().max()) > _TOLERANCE:
                        log.warning("SDPA backend %s differs from %s; not used", backend.name, candidates[0].name)
                        continue
                    ms = _median_ms(attend, repeats=5, warmup=1)
            except Exception as exc:  # not available for these inputs on this card
                log.info("SDPA backend %s skipped: %s", backend.name, str(exc).splitlines()[0][:200])
                continue
            timings[backend.name] = ms
            if ms < best_ms:
                best, best_ms = backend, ms
        use_varlen = False
        if varlen is not None and reference is not None:
            cu_seqlens = cumulative_lengths([tokens], device)
            flat = [t[0].transpose(0, 1) for t in (q, k, v)]

            def attend_varlen() -> torch.Tensor:
                return varlen(*flat, cu_seqlens=cu_seqlens, max_seqlen=tokens, causal=causal, scale=scale)

            try:  # the first call compiles the kernel (seconds): outside the timing
                got = attend_varlen().float()
                error = float((got - reference[0].transpose(0, 1)).abs().max())
                if not error <= _TOLERANCE:  # NaN too
                    log.warning("%s differs from SDPA by %.3g; not used", varlen, error)
                else:
                    ms = _median_ms(attend_varlen, repeats=5, warmup=1)
                    timings[VARLEN_NAME] = ms
                    use_varlen = ms < best_ms
            except Exception as exc:  # a shape or card this build cannot compile for
                log.info("%s skipped: %s", varlen, str(exc).splitlines()[0][:200])
    return AttentionChoice(priority(best) if best is not None else None, use_varlen), timings
