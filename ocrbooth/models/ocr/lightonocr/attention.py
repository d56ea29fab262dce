"""Attention for the engine: the paged KV cache the decoder layers write into, and the attention functions
registered with transformers for the decoder and the vision encoder.

- Decode (one new token per slot): each slot attends to its own positions only, read through its block
  table. On CUDA a Triton split-K kernel (flash-decoding) reads each slot's K/V once, with the query heads
  that share a KV head folded into one program; a slot's sequence is cut into fixed `SPLIT_TOKENS` pieces, so
  its reduction order depends on its own length only, never on its batch-mates. Idle slots read nothing.
  Elsewhere a gather + SDPA reference does the same arithmetic.
- Prefill (many pages in one flat sequence): causal attention within each page's segment, by SDPA per
  segment (no mask, so the flash kernel runs), or by one variable-length flash-attention call over all
  segments where the engine measured that faster (varlen.py, an optional package).
- Vision encoder (many images in one flat sequence): the same per image, non-causal. Pixtral would otherwise
  build a dense block-diagonal mask that grows with the square of the batch's patches.

The runner says which case a forward is by setting the forward context (vLLM's `set_forward_context`); with
no context (a plain `model(...)` call) every function falls back to transformers' SDPA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import torch
import torch.nn.functional as F

from ocrbooth.models.ocr.lightonocr.varlen import VarlenAttention

DECODER_ATTENTION: Final = "ocrbooth_paged"  # registered names of the attention functions
VISION_ATTENTION: Final = "ocrbooth_varlen_vision"
SPLIT_TOKENS: Final = 512  # positions per split-K program

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the reference path
    import triton  # type: ignore[import-not-found,unused-ignore]
    import triton.language as tl  # type: ignore[import-not-found,unused-ignore]

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False


@dataclass(frozen=True, slots=True)
class DecodeKernel:
    """Launch configuration of the Triton decode kernel: positions per tile (a divisor of the KV block size),
    warps per program and tiles kept in flight. It changes speed only: the reduction order is fixed by
    `SPLIT_TOKENS` and the tile, and one engine uses one configuration for all its pages."""

    tile: int = 64
    warps: int = 4
    stages: int = 2
    """Tiles of K/V in flight (pipelined loop only)."""
    pipelined: bool = False
    """The loop bounded by the slot's own end, software-pipelined over `stages` tiles (tile <= block size);
    otherwise a fixed trip count over the split with finished tiles skipped (the first kernel, measured on
    the H200 at 3.6 TB/s)."""


@dataclass(slots=True)
class ForwardContext:
    """What the attention functions need besides q/k/v for the forward being run."""

    mode: str
    """"decode", "prefill" (decoder over flat pages) or "vision" (encoder over flat images)."""
    segments: list[int] | None = None
    """prefill/vision: tokens of each page or image, in order."""
    write_index: torch.Tensor | None = None
    """Flat cache row of each new token (decode: one per slot; prefill: one per prompt token)."""
    block_table: torch.Tensor | None = None
    """decode: [slots, blocks] int32."""
    seq_lens: torch.Tensor | None = None
    """decode: [slots] int32 positions to attend to (0 for idle slots)."""
    max_seq_len: int = 0
    """decode on the reference path: positions to gather (the longest slot's length, or the capacity)."""
    use_triton: bool = False
    kernel: DecodeKernel | None = None
    """decode on the Triton path: its launch configuration."""
    sdpa_backends: tuple[Any, ...] | None = None
    """prefill/vision: SDPA backends in priority order (None: PyTorch's default order)."""
    varlen: VarlenAttention | None = None
    """prefill/vision: one variable-length flash-attention call over all segments instead of SDPA per
    segment (the engine's measured choice, varlen.py)."""
    cu_seqlens: torch.Tensor | None = None
    """prefill/vision with `varlen`: cumulative segment lengths on the device (int32)."""
    cache: PagedKVCache | None = None
    """decode: the cache the attention reads."""
    pacer: Callable[[], None] | None = None
    """prefill/vision: called after each layer's attention is launched (launch_pacing.py: keeps the launching
    thread from filling the driver's launch queue while holding the GIL)."""


_CONTEXT: ContextVar[ForwardContext | None] = ContextVar("ocrbooth_lightonocr_forward", default=None)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    token = _CONTEXT.set(ctx)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class PagedKVCache:
    """Per layer, K and V as [num_blocks * block_size, kv_heads, head_dim]: row = block * block_size + offset.
    Stands in for a transformers Cache: the decoder layers only call `update`, which writes the new tokens at
    the rows the forward context names and hands the new K/V on to the attention function."""

    def __init__(
        self, *, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, **kw: Any
    ) -> None:
        rows = num_blocks * block_size
        # zeros, not empty: a masked position multiplied by 0 must not be NaN on the reference path
        self.keys = [torch.zeros(rows, kv_heads, head_dim, **kw) for _ in range(layers)]
        self.values = [torch.zeros(rows, kv_heads, head_dim, **kw) for _ in range(layers)]
        self.block_size = block_size

    def _store(self, cache: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Write `rows` at `index`; into an FP8 cache saturated to its range (no NaN from an outlier) and
        through a byte view (PyTorch has no `index_copy_` for FP8)."""
        if rows.dtype == cache.dtype:
            cache.index_copy_(0, index, rows)
            return
        limit = torch.finfo(cache.dtype).max
        stored = rows.clamp(-limit, limit).to(cache.dtype)
        cache.view(torch.uint8).index_copy_(0, index, stored.view(torch.uint8))

    @torch.compiler.disable  # type: ignore[untyped-decorator]  # outside compiled layers' graphs; ~0.5 µs a call
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = _CONTEXT.get()
        if ctx is None or ctx.write_index is None:
            return key_states, value_states
        # [batch, heads, tokens, dim] -> one row per token
        keys = key_states.permute(0, 2, 1, 3).reshape(-1, *key_states.shape[1:2], key_states.shape[3])
        values = value_states.permute(0, 2, 1, 3).reshape(-1, *value_states.shape[1:2], value_states.shape[3])
        self._store(self.keys[layer_idx], ctx.write_index, keys)
        self._store(self.values[layer_idx], ctx.write_index, values)
        return key_states, value_states


def _sdpa_fallback(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out, None


def decoder_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [batch, heads, tokens, dim]; returns [batch, tokens, heads, dim]."""
    ctx = _CONTEXT.get()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if ctx is None:
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if ctx.mode == "prefill":
        assert ctx.segments is not None
        return _segments(query, key, value, ctx, causal=True, scale=scale), None
    layer = int(getattr(module, "layer_idx"))  # noqa: B009  # transformers' attention modules carry it
    cache = ctx.cache
    assert cache is not None
    assert ctx.block_table is not None
    assert ctx.seq_lens is not None
    q = query[:, :, 0]  # [slots, heads, dim]
    k_cache, v_cache = cache.keys[layer], cache.values[layer]
    if ctx.use_triton:
        out = paged_decode_triton(
            q, k_cache, v_cache, ctx.block_table, ctx.seq_lens, cache.block_size, scale, kernel=ctx.kernel
        )
    else:
        out = paged_decode_reference(
            q, k_cache, v_cache, ctx.block_table, ctx.seq_lens, cache.block_size, scale, ctx.max_seq_len
        )
    return out[:, None], None


def vision_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    ctx = _CONTEXT.get()
    if ctx is None or ctx.mode != "vision" or ctx.segments is None:
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _segments(query, key, value, ctx, causal=False, scale=scale), None


def _segments(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: ForwardContext, *, causal: bool, scale: float
) -> torch.Tensor:
    """Attention within each of `ctx.segments` of a flat [1, heads, tokens, dim] sequence; [1, tokens, heads,
    dim]. One variable-length call when the context carries one, else SDPA per segment with the context's
    backends in priority order (the engine's measured choice) or PyTorch's default."""
    assert ctx.segments is not None
    if ctx.varlen is not None:
        assert ctx.cu_seqlens is not None
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim] views
        out = ctx.varlen(q, k, v, cu_seqlens=ctx.cu_seqlens, max_seqlen=max(ctx.segments), causal=causal, scale=scale)
        out = out[None]
    elif ctx.sdpa_backends is not None:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(list(ctx.sdpa_backends), set_priority=True):
            out = _segments_sdpa(query, key, value, ctx.segments, causal=causal, scale=scale)
    else:
        out = _segments_sdpa(query, key, value, ctx.segments, causal=causal, scale=scale)
    if ctx.pacer is not None:
        ctx.pacer()
    return out


def _segments_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: list[int], *, causal: bool, scale: float
) -> torch.Tensor:
    """SDPA per segment of a flat [1, heads, tokens, dim] sequence (K/V heads repeated for grouped-query
    attention); [1, tokens, heads, dim]."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    outs = []
    start = 0
    for length in segments:
        q, k, v = (t[:, :, start : start + length] for t in (query, key, value))
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale))
        start += length
    return torch.cat(outs, dim=2).transpose(1, 2)


def paged_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    max_seq_len: int,
) -> torch.Tensor:
    """Gather each slot's first `max_seq_len` positions through its block table, mask past its length, and
    run SDPA with the query heads of a KV head folded into its rows: q [slots, heads, dim] -> same shape."""
    slots, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    positions = torch.arange(max_seq_len, device=q.device)
    rows = block_table.long().gather(1, (positions // block_size)[None].expand(slots, -1)) * block_size
    rows = rows + positions % block_size
    keys = k_cache[rows].to(q.dtype).permute(0, 2, 1, 3)  # [slots, kv_heads, positions, dim]; FP8 widened
    values = v_cache[rows].to(q.dtype).permute(0, 2, 1, 3)
    mask = (positions[None, :] < seq_lens[:, None])[:, None, None, :]
    grouped = q.reshape(slots, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    # an idle slot (length 0) masks everything: SDPA gives NaN there, which must not leak into the logits
    return torch.nan_to_num(out, nan=0.0).reshape(slots, heads, dim)


if HAVE_TRITON:

    @triton.jit  # type: ignore[untyped-decorator,unused-ignore]
    def _paged_decode_split(  # type: ignore[no-untyped-def]
        Q,
        K,
        V,
        BlockTable,
        SeqLens,
        PartOut,
        PartLse,
        stride_qs,
        stride_qh,
        stride_kr,
        stride_kh,
        stride_bt,
        stride_ps,
        stride_ph,
        stride_pk,
        stride_ls,
        stride_lh,
        scale,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr,
        SPLIT: tl.constexpr,
        STAGES: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        slot = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(SeqLens + slot)
        start = split * SPLIT
        if start < seq_len:
            end = tl.minimum(start + SPLIT, seq_len)
            g = tl.arange(0, GROUP_PAD)
            d = tl.arange(0, DIM)
            heads = kv_head * GROUP + g
            q = tl.load(
                Q + slot * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0
            )
            m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
            total = tl.zeros([GROUP_PAD], tl.float32)
            acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
            # A loop bounded by the slot's own end (no skipped iterations), so Triton can keep STAGES tiles of
            # K and V in flight; a tile never crosses a KV block (TILE divides BLOCK_SIZE), so its rows are
            # one contiguous run found with one block-table read.
            for t0 in tl.range(start, end, TILE, num_stages=STAGES):
                t = t0 + tl.arange(0, TILE)
                valid = t < end
                block = tl.load(BlockTable + slot * stride_bt + t0 // BLOCK_SIZE).to(tl.int64)
                rows = block * BLOCK_SIZE + (t0 % BLOCK_SIZE) + tl.arange(0, TILE)
                offsets = rows[:, None] * stride_kr + kv_head * stride_kh + d[None, :]
                k = tl.load(K + offsets, mask=valid[:, None], other=0.0).to(Q.dtype.element_ty)  # FP8: widened
                v = tl.load(V + offsets, mask=valid[:, None], other=0.0).to(Q.dtype.element_ty)
                # the query heads of this KV head are the rows of one tensor-core product (padded to 16)
                if IEEE:
                    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                else:
                    scores = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, TILE], float32
                scores = tl.where(valid[None, :], scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, axis=1))
                alpha = tl.exp(m - m_new)
                p = tl.exp(scores - m_new[:, None])
                total = total * alpha + tl.sum(p, axis=1)
                if IEEE:  # noqa: SIM108  # Triton prunes a constexpr branch only in an if statement
                    update = tl.dot(p, v, input_precision="ieee")
                else:
                    update = tl.dot(p.to(v.dtype), v)
                acc = acc * alpha[:, None] + update
                m = m_new
            out_ptr = PartOut + slot * stride_ps + heads[:, None] * stride_ph + split * stride_pk + d[None, :]
            tl.store(out_ptr, acc / total[:, None], mask=(g < GROUP)[:, None])
            lse_ptr = PartLse + slot * stride_ls + heads * stride_lh + split
            tl.store(lse_ptr, m + tl.log(total), mask=g < GROUP)

    @triton.jit  # type: ignore[untyped-decorator,unused-ignore]
    def _paged_decode_split_masked(  # type: ignore[no-untyped-def]
        Q,
        K,
        V,
        BlockTable,
        SeqLens,
        PartOut,
        PartLse,
        stride_qs,
        stride_qh,
        stride_kr,
        stride_kh,
        stride_bt,
        stride_ps,
        stride_ph,
        stride_pk,
        stride_ls,
        stride_lh,
        scale,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr,
        SPLIT: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        slot = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(SeqLens + slot)
        start = split * SPLIT
        if start < seq_len:
            end = tl.minimum(start + SPLIT, seq_len)
            g = tl.arange(0, GROUP_PAD)
            d = tl.arange(0, DIM)
            heads = kv_head * GROUP + g
            q = tl.load(
                Q + slot * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0
            )
            m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
            total = tl.zeros([GROUP_PAD], tl.float32)
            acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
            for i in range(0, SPLIT // TILE):  # constant trip count; tiles past the end are skipped
                t0 = start + i * TILE
                if t0 < end:
                    t = t0 + tl.arange(0, TILE)
                    valid = t < end
                    block = tl.load(BlockTable + slot * stride_bt + t // BLOCK_SIZE, mask=valid, other=0)
                    rows = block.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE
                    offsets = rows[:, None] * stride_kr + kv_head * stride_kh + d[None, :]
                    k = tl.load(K + offsets, mask=valid[:, None], other=0.0).to(Q.dtype.element_ty)  # FP8: widened
                    # the query heads of this KV head are the rows of one tensor-core product (padded to 16)
                    if IEEE:
                        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                    else:
                        scores = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, TILE], float32
                    scores = tl.where(valid[None, :], scores, float("-inf"))
                    m_new = tl.maximum(m, tl.max(scores, axis=1))
                    alpha = tl.exp(m - m_new)
                    p = tl.exp(scores - m_new[:, None])
                    total = total * alpha + tl.sum(p, axis=1)
                    v = tl.load(V + offsets, mask=valid[:, None], other=0.0).to(Q.dtype.element_ty)
                    if IEEE:  # noqa: SIM108  # Triton prunes a constexpr branch only in an if statement
                        update = tl.dot(p, v, input_precision="ieee")
                    else:
                        update = tl.dot(p.to(v.dtype), v)
                    acc = acc * alpha[:, None] + update
                    m = m_new
            out_ptr = PartOut + slot * stride_ps + heads[:, None] * stride_ph + split * stride_pk + d[None, :]
            tl.store(out_ptr, acc / total[:, None], mask=(g < GROUP)[:, None])
            lse_ptr = PartLse + slot * stride_ls + heads * stride_lh + split
            tl.store(lse_ptr, m + tl.log(total), mask=g < GROUP)

    @triton.jit  # type: ignore[untyped-decorator,unused-ignore]
    def _paged_decode_merge(  # type: ignore[no-untyped-def]
        PartOut,
        PartLse,
        SeqLens,
        Out,
        stride_ps,
        stride_ph,
        stride_pk,
        stride_ls,
        stride_lh,
        stride_os,
        stride_oh,
        DIM: tl.constexpr,
        MAX_SPLITS: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        slot = tl.program_id(0)
        head = tl.program_id(1)
        seq_len = tl.load(SeqLens + slot)
        splits = tl.cdiv(seq_len, SPLIT)
        k = tl.arange(0, MAX_SPLITS)
        d = tl.arange(0, DIM)
        used = k < splits
        lse = tl.load(PartLse + slot * stride_ls + head * stride_lh + k, mask=used, other=float("-inf"))
        top = tl.max(lse, axis=0)
        top = tl.where(splits > 0, top, 0.0)
        weights = tl.where(used, tl.exp(lse - top), 0.0)
        parts = tl.load(
            PartOut + slot * stride_ps + head * stride_ph + k[:, None] * stride_pk + d[None, :],
            mask=used[:, None],
            other=0.0,
        )
        out = tl.sum(parts * weights[:, None], axis=0) / tl.maximum(tl.sum(weights, axis=0), 1e-30)
        tl.store(Out + slot * stride_os + head * stride_oh + d, out.to(Out.dtype.element_ty))


def paged_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    *,
    kernel: DecodeKernel | None = None,
) -> torch.Tensor:
    """Split-K paged decode attention: q [slots, heads, dim] -> [slots, heads, dim] in q's dtype; the caches in
    q's dtype or FP8 (widened as they are read). `kernel`: the launch configuration (default `DecodeKernel()`;
    the engine measures candidates at load)."""
    kernel = kernel or DecodeKernel()
    if kernel.pipelined and block_size % kernel.tile:
        raise ValueError(f"decode kernel tile {kernel.tile} must divide the KV block size {block_size}")
    slots, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    max_splits = -(-block_table.shape[1] * block_size // SPLIT_TOKENS)
    part_out = torch.empty(slots, heads, max_splits, dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(slots, heads, max_splits, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    split_kernel = _paged_decode_split if kernel.pipelined else _paged_decode_split_masked
    options = {"STAGES": kernel.stages} if kernel.pipelined else {}
    split_kernel[(slots, kv_heads, max_splits)](
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        part_out,
        part_lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_table.stride(0),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        scale,
        GROUP=group,
        GROUP_PAD=max(16, 1 << (group - 1).bit_length()),  # tl.dot needs 16 rows
        DIM=dim,
        BLOCK_SIZE=block_size,
        TILE=kernel.tile,
        SPLIT=SPLIT_TOKENS,
        IEEE=q.dtype == torch.float32,
        num_warps=kernel.warps,
        **options,
    )
    _paged_decode_merge[(slots, heads)](
        part_out,
        part_lse,
        seq_lens,
        out,
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        DIM=dim,
        MAX_SPLITS=max(1, 1 << (max_splits - 1).bit_length()),
        SPLIT=SPLIT_TOKENS,
    )
    return out


def register() -> None:
    from transformers import AttentionInterface

    # Outside compiled layers' graphs (compiled_layers.py): the graph breaks at the call, the kernels run as
    # measured. Uncompiled, the wrapper costs ~0.5 µs a call.
    AttentionInterface.register(DECODER_ATTENTION, torch.compiler.disable(decoder_attention))  # type: ignore[no-untyped-call]
    AttentionInterface.register(VISION_ATTENTION, torch.compiler.disable(vision_attention))  # type: ignore[no-untyped-call]
