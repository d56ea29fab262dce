"""Variable-length flash attention from the optional `flash-attn-4` package (FlashAttention's CuTe-DSL
kernels: FA3's design on Hopper, FA4 on Blackwell), for the vision encoder and the decoder's prefill.

One call covers a whole batch of pages: the flat sequence and the cumulative segment lengths go in, and each
segment attends within itself (non-causal for images, causal for prompts), with grouped-query heads read as
they are (no repeat). PyTorch's SDPA backends run one call per segment with the K/V heads repeated.

The package is optional (`pip install 'ocrbooth[fa4]'`): without it, on a CPU, or on a card it cannot
compile for, `load()` returns None and the engine keeps SDPA. With it, the engine's load-time tuning times it
against the SDPA backends on this card and checks its output first (tuning.py), so it is used only where it
is faster and computes the same attention.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

MIN_CAPABILITY = 9  # Hopper and newer: the kernels this package compiles best (Ampere has PyTorch's FA2)


class VarlenAttention:
    """`flash_attn_varlen_func` over one flat sequence of segments; q [tokens, heads, dim], k/v
    [tokens, kv_heads, dim] -> [tokens, heads, dim]."""

    def __init__(self, fn: Callable[..., Any], version: str) -> None:
        self._fn = fn
        self.version = version

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        causal: bool,
        scale: float,
    ) -> torch.Tensor:
        out = self._fn(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen,
            softmax_scale=scale,
            causal=causal,
        )
        result: torch.Tensor = out[0] if isinstance(out, tuple) else out  # (out, lse)
        return result

    def __repr__(self) -> str:
        return f"VarlenAttention(flash-attn-4 {self.version})"


def cumulative_lengths(segments: Sequence[int], device: torch.device) -> torch.Tensor:
    """[0, s0, s0+s1, ...] as int32 on `device` (the kernels' cu_seqlens)."""
    offsets = [0]
    for length in segments:
        offsets.append(offsets[-1] + int(length))
    return torch.tensor(offsets, dtype=torch.int32).to(device, non_blocking=True)


def load(device: torch.device) -> VarlenAttention | None:
    """The package's kernel on this device, or None (not installed, not CUDA, an older card, or an import
    that fails: the reason is logged)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, _ = torch.cuda.get_device_capability(device)
    if major < MIN_CAPABILITY:
        return None
    try:
        from flash_attn.cute import flash_attn_varlen_func  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    except Exception as exc:  # installed but broken (a CUDA or compiler library it cannot find, say)
        log.warning("flash-attn-4 is installed but does not load (%s); using SDPA", str(exc).splitlines()[0][:200])
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("flash-attn-4")
    except PackageNotFoundError:
        found = "unknown"
    return VarlenAttention(flash_attn_varlen_func, found)
