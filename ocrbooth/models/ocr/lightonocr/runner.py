"""The model runner: the only code that touches the GPU.

It owns the weights, the paged KV cache and the decode state, and executes what the scheduler decided:

- `launch_prefill(batch)`: vision-encodes a batch of pages as one flat sequence (attention per image) and
  prefills their prompts as one flat sequence (causal attention per page) into their KV blocks, on a second
  CUDA stream, so the decode loop on the main stream never waits for it. All prompt tokens but the last are
  prefilled: the last is fed to the page's first decode step, so every generated token comes out of the same
  step function.
- `activate(prefill)`: once that stream's event has fired, the pages' slots start decoding (a few small
  copies on the main stream, ordered after the prefill by an event wait).
- `launch_chunk(rows, steps)`: `steps` decode steps over the first `rows` slots (replays of a CUDA graph
  captured per power-of-two row count), then an asynchronous copy of each slot's (done, generated, reason)
  to pinned host memory. The host reads it one chunk later (`collect`), so the GPU always has the next
  chunk queued while the host decides: host syncs happen once per chunk and never drain the GPU.

Token choice, probabilities (softmax in float32 at the chosen token), and stop/length/repetition checks run
on the device inside the step.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from ocrbooth.models.ocr.lightonocr.attention import (
    DECODER_ATTENTION,
    HAVE_TRITON,
    VISION_ATTENTION,
    ForwardContext,
    PagedKVCache,
    forward_context,
    register,
)
from ocrbooth.models.ocr.lightonocr.inputs import PreparedPage
from ocrbooth.models.ocr.lightonocr.kv_cache import TRASH_BLOCK, KVCacheSpec
from ocrbooth.models.ocr.lightonocr.launch_pacing import LaunchPacer
from ocrbooth.models.ocr.lightonocr.repetition import RepetitionGuard, RepetitionTracker
from ocrbooth.models.ocr.lightonocr.sm_partition import PartitionedStream, partitioned_stream, sm_count
from ocrbooth.models.ocr.lightonocr.tuning import AttentionChoice, Tuning, describe, tune_decode_kernel, tune_sdpa
from ocrbooth.models.ocr.lightonocr.varlen import VarlenAttention, cumulative_lengths
from ocrbooth.models.ocr.lightonocr.varlen import load as load_varlen

log = logging.getLogger(__name__)

# Finish codes kept on the device (index into FINISH).
RUNNING, STOP, LENGTH, REPETITION = 0, 1, 2, 3
FINISH: Final = ("error", "stop", "length", "repetition")
_MIN_GRAPH_ROWS: Final = 8
PREFILL_OVERLAP: Final = ("stream", "priority", "serial", "green")
"""Prefill against decoding: "stream" a second CUDA stream of equal priority; "priority" the same with the
decode loop's stream at the highest priority, so its kernels take SMs first as they free up; "serial"
queued on the decode stream between chunks (no sharing of SMs, decoding waits); "green" a second stream
limited to `prefill_sms` of the SMs (sm_partition.py), decoding free to use all of them."""


@dataclass(slots=True)
class PrefillItem:
    request_id: int
    slot: int
    blocks: tuple[int, ...]
    max_new_tokens: int
    page: PreparedPage


@dataclass(slots=True)
class Prefill:
    """A prefill batch in flight on the prefill stream."""

    items: list[PrefillItem]
    event: Any  # torch.cuda.Event, or None on CPU (already done)

    def done(self) -> bool:
        return self.event is None or bool(self.event.query())


@dataclass(slots=True)
class Snapshot:
    """Each slot's (done, generated tokens, finish code) after a chunk, once `event` has fired."""

    chunk: int
    rows: int
    host: torch.Tensor
    event: Any


@dataclass(slots=True)
class SlotOutput:
    """A finished slot's tokens, copied to the host asynchronously: read them after `event` fires."""

    request_id: int
    reason: str
    count: int
    tokens: torch.Tensor
    probs: torch.Tensor
    row: int
    event: Any

    def wait(self) -> tuple[list[int], list[float]]:
        if self.event is not None:
            self.event.synchronize()
        return self.tokens[self.row, : self.count].tolist(), self.probs[self.row, : self.count].tolist()


class DecodeState:
    """Everything the decode step reads and writes, one row per slot, in fixed-size device tensors."""

    def __init__(
        self,
        *,
        rows: int,
        max_blocks: int,
        max_new: int,
        guard: RepetitionGuard,
        eos_ids: Sequence[int],
        device: torch.device,
    ) -> None:
        self.rows = rows
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        """Token fed to the next step."""
        self.write_pos = torch.zeros(rows, dtype=torch.long, device=device)
        """Its position."""
        self.n_generated = torch.zeros(rows, dtype=torch.long, device=device)
        self.max_new = torch.zeros(rows, dtype=torch.long, device=device)
        self.done = torch.ones(rows, dtype=torch.bool, device=device)
        self.reason = torch.zeros(rows, dtype=torch.long, device=device)
        self.block_table = torch.full((rows, max_blocks), TRASH_BLOCK, dtype=torch.int32, device=device)
        # One spare column: a finished slot keeps writing at index n_generated, past its last token.
        self.out_tokens = torch.zeros((rows, max_new + 1), dtype=torch.long, device=device)
        self.out_probs = torch.zeros((rows, max_new + 1), dtype=torch.float32, device=device)
        self.eos_ids = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        self.tracker = RepetitionTracker(guard, slots=rows, device=device)


@dataclass(slots=True)
class RunnerConfig:
    max_slots: int
    num_blocks: int
    block_size: int
    max_blocks_per_slot: int
    max_new_tokens: int
    use_cuda_graphs: bool
    use_triton: bool
    eos_ids: tuple[int, ...]
    guard: RepetitionGuard = field(default_factory=RepetitionGuard)


class ModelRunner:
    """Executes engine steps on one device."""

    def __init__(
        self, net: Any, *, device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype | None = None
    ) -> None:
        self.net = net
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype  # the KV cache's element type: the model's, or FP8
        self.cuda = device.type == "cuda"
        text = net.config.text_config
        self.layers = int(text.num_hidden_layers)
        self.kv_heads = int(text.num_key_value_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        self.vocab = int(text.vocab_size)
        self.image_token_id = int(net.config.image_token_id)
        self.config: RunnerConfig | None = None
        self.cache: PagedKVCache | None = None
        self.state: DecodeState | None = None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._prefill_stream: Any = None
        self._decode_stream: Any = None
        self._partition: PartitionedStream | None = None
        self.set_prefill_overlap("stream")
        self._pending: deque[Snapshot] = deque()
        self._chunk = 0
        self._active_from: dict[int, int] = {}  # slot -> first snapshot that reflects its page
        self._slot_request: dict[int, int] = {}
        self.tuning = Tuning()
        self.varlen_kernel: VarlenAttention | None = None  # the optional flash-attn-4 kernel, loaded by tune()
        register()
        net.model.language_model.set_attn_implementation(DECODER_ATTENTION)
        net.model.vision_encoder.set_attn_implementation(VISION_ATTENTION)

    def set_prefill_overlap(self, mode: str, sms: int = 0) -> None:
        """Where prefill batches run against the decode loop (`PREFILL_OVERLAP`); change it only while idle.
        `sms`: for "green", the SMs prefill may use (0: half the device's, in multiples of 8)."""
        if mode not in PREFILL_OVERLAP:
            raise ValueError(f"prefill overlap must be one of {PREFILL_OVERLAP}, got {mode!r}")
        if sms < 0:
            raise ValueError(f"prefill SMs must be >= 0, got {sms}")
        if not self.cuda:
            self.prefill_overlap, self.prefill_sms = mode, 0
            return
        new_stream: Any = torch.cuda.Stream
        used = 0
        if mode == "green":  # made first: where green contexts are missing, the mode in use stays as it was
            partition = partitioned_stream(self.device, sms or max(8, sm_count(self.device) // 16 * 8))
            self._partition = partition  # holds the green context as long as its stream is in use
            self._prefill_stream, used = partition.stream, partition.sms
        else:
            self._prefill_stream = None if mode == "serial" else new_stream(self.device, priority=0)
        # A lower number is a higher priority; out-of-range values map to the highest the device has.
        self._decode_stream = new_stream(self.device, priority=-100) if mode == "priority" else None
        self.prefill_overlap, self.prefill_sms = mode, used

    def serving(self) -> contextlib.AbstractContextManager[Any]:
        """The stream the decode loop runs on, for one engine step (the engine core's thread enters it)."""
        if self._decode_stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._decode_stream)

    @staticmethod
    def load(source: str, *, device: torch.device, dtype: torch.dtype) -> Any:
        """Weights onto the device (callers turn failures into ConfigError/FatalError)."""
        from transformers import LightOnOcrForConditionalGeneration

        register()
        net: Any = LightOnOcrForConditionalGeneration.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
        net.to(device)
        net.eval()
        return net

    def tune(self, *, slots: int, block_size: int, max_blocks_per_slot: int, prompt_tokens: int, patches: int) -> None:
        """Measure the decode kernel's configurations and the SDPA backends on this card and keep the fastest
        (CUDA with Triton only; run before the KV cache is allocated)."""
        if not self.cuda:
            return
        text = self.net.config.text_config
        vision = self.net.config.vision_config
        tuning = Tuning()
        if HAVE_TRITON:
            tuning.decode_kernel, rates = tune_decode_kernel(
                device=self.device,
                dtype=self.dtype,
                kv_dtype=self.kv_dtype,
                heads=int(text.num_attention_heads),
                kv_heads=self.kv_heads,
                head_dim=self.head_dim,
                block_size=block_size,
                max_blocks_per_slot=max_blocks_per_slot,
                slots=slots,
                context=prompt_tokens + 512,  # a page some way into its output
            )
            tuning.measured["decode_kv_gb_s"] = rates
        self.varlen_kernel = load_varlen(self.device)
        vision_heads = int(vision.num_attention_heads)
        tuning.vision, tuning.measured["vision_sdpa_ms"] = tune_sdpa(
            device=self.device,
            dtype=self.dtype,
            heads=vision_heads,
            tokens=patches,
            head_dim=int(vision.hidden_size) // vision_heads,
            causal=False,
            varlen=self.varlen_kernel,
        )
        tuning.prefill, tuning.measured["prefill_sdpa_ms"] = tune_sdpa(
            device=self.device,
            dtype=self.dtype,
            heads=int(text.num_attention_heads),
            kv_heads=self.kv_heads,
            tokens=prompt_tokens,
            head_dim=self.head_dim,
            causal=True,
            varlen=self.varlen_kernel,
        )
        self.tuning = tuning
        torch.cuda.empty_cache()  # the synthetic caches and inputs are gone: give their memory back for sizing
        log.info(
            "LightOnOCR tuning: decode kernel %s, vision attention %s, prefill attention %s; measured %s",
            tuning.decode_kernel,
            describe(tuning.vision),
            describe(tuning.prefill),
            tuning.measured,
        )

    def kv_spec(self, block_size: int) -> KVCacheSpec:
        return KVCacheSpec(self.layers, self.kv_heads, self.head_dim, self.kv_dtype.itemsize, block_size)

    # ---- memory ----------------------------------------------------------------------------------

    def profile_prefill(self, pages: list[PreparedPage]) -> int:
        """Peak bytes a prefill batch of these pages allocates beyond what is held now (run once at load)."""
        if not self.cuda:
            return 0
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            self._prefill_forward(pages, write_index=None)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        return int(peak)

    def allocate(self, config: RunnerConfig) -> None:
        """KV cache, decode state and (on CUDA) the captured decode steps."""
        self.config = config
        rows = _graph_rows(config.max_slots) if config.use_cuda_graphs else config.max_slots
        self.cache = PagedKVCache(
            layers=self.layers,
            num_blocks=config.num_blocks,
            block_size=config.block_size,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype=self.kv_dtype,
            device=self.device,
        )
        self.state = DecodeState(
            rows=rows,
            max_blocks=config.max_blocks_per_slot,
            max_new=config.max_new_tokens,
            guard=config.guard,
            eos_ids=config.eos_ids,
            device=self.device,
        )
        self._snapshot_buffers = deque(torch.zeros((3, rows), dtype=torch.long, pin_memory=self.cuda) for _ in range(3))
        if config.use_cuda_graphs:
            self._capture(rows)
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _capture(self, rows: int) -> None:
        """Run every row bucket once while all slots are idle (Triton compiles, cuBLAS picks), then capture."""
        sizes = []
        size = _MIN_GRAPH_ROWS
        while size < rows:
            sizes.append(size)
            size *= 2
        sizes.append(rows)
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for size in sizes:
                self._decode_step(size)
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for size in reversed(sizes):  # largest first: later captures reuse its pool
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._decode_step(size)
                self._graphs[size] = graph

    # ---- prefill ---------------------------------------------------------------------------------

    def launch_prefill(self, items: list[PrefillItem], *, paced: bool = False) -> Prefill:
        """Encode and prefill a batch of pages into their blocks, on the prefill stream; returns once it is
        launched. `paced` (CUDA, a prefill stream): launched a few layers ahead of the GPU at most, waiting
        without the GIL (launch_pacing.py), for a thread of its own beside the decode loop's."""
        assert self.config is not None
        block_size = self.config.block_size
        rows = []
        for item in items:
            n = item.page.prompt_length - 1
            positions = torch.arange(n)
            table = torch.tensor(item.blocks, dtype=torch.long)
            rows.append(table[positions // block_size] * block_size + positions % block_size)
        side = self._prefill_stream
        stream = torch.cuda.stream(side) if side is not None else contextlib.nullcontext()  # none: "serial"
        with stream, torch.inference_mode():  # uploads too: on a side stream nothing waits for decode chunks
            write_index = _to_device(torch.cat(rows), self.device)
            pacer = LaunchPacer() if paced and side is not None else None
            self._prefill_forward([item.page for item in items], write_index=write_index, pacer=pacer)
            event = None
            if self.cuda:
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record()
        return Prefill(items, event)

    def _prefill_forward(
        self, pages: list[PreparedPage], *, write_index: torch.Tensor | None, pacer: LaunchPacer | None = None
    ) -> None:
        net = self.net
        try:
            features = self.encode_images(pages, pacer=pacer)
        except Exception as exc:  # a measured choice refusing an input shape it was not timed on
            self.tuning.vision = self._fall_back("vision", self.tuning.vision, exc)
            features = self.encode_images(pages, pacer=pacer)
        embeds = []
        for page, feats in zip(pages, features, strict=True):
            ids = _to_device(page.input_ids, self.device)
            n = page.prompt_length - 1
            embed = net.get_input_embeddings()(ids[:n])
            embed.index_copy_(0, _to_device(page.image_positions, self.device), feats.to(embed.dtype))
            embeds.append(embed)
        segments = [page.prompt_length - 1 for page in pages]
        inputs_embeds = torch.cat(embeds)[None]
        position_ids = _to_device(torch.cat([torch.arange(n) for n in segments]), self.device)[None]

        def prefill() -> None:
            with forward_context(self._attention_context("prefill", self.tuning.prefill, segments, write_index, pacer)):
                net.model.language_model(
                    inputs_embeds=inputs_embeds,
                    attention_mask={"full_attention": None},  # a dict skips transformers' mask building
                    position_ids=position_ids,
                    past_key_values=self.cache,
                    use_cache=True,
                )

        try:
            prefill()
        except Exception as exc:  # as for vision above; a rerun rewrites the same cache rows
            self.tuning.prefill = self._fall_back("prefill", self.tuning.prefill, exc)
            prefill()

    def _attention_context(
        self,
        mode: str,
        choice: AttentionChoice,
        segments: list[int],
        write_index: torch.Tensor | None = None,
        pacer: LaunchPacer | None = None,
    ) -> ForwardContext:
        varlen = self.varlen_kernel if choice.varlen else None
        return ForwardContext(
            mode,
            segments=segments,
            write_index=write_index,
            cache=self.cache if mode == "prefill" else None,
            sdpa_backends=choice.backends,
            varlen=varlen,
            cu_seqlens=cumulative_lengths(segments, self.device) if varlen is not None else None,
            pacer=pacer,
        )

    @staticmethod
    def _fall_back(what: str, choice: AttentionChoice, exc: Exception) -> AttentionChoice:
        """The default attention after the measured `choice` failed on an input. Out of memory is the batch's
        size, not the kernel (the core splits the batch), and a CUDA error poisons the context: both go up."""
        if choice == AttentionChoice() or isinstance(exc, torch.OutOfMemoryError) or "CUDA error" in str(exc):
            raise exc
        log.warning("%s attention (%s) failed (%s); using PyTorch's default order", what, describe(choice), exc)
        return AttentionChoice()

    def encode_images(self, pages: list[PreparedPage], *, pacer: LaunchPacer | None = None) -> list[torch.Tensor]:
        """Image features of each page ([image tokens, hidden]), the whole batch as one flat sequence."""
        net = self.net
        vision = net.model.vision_encoder
        patch = int(vision.patch_size)
        grids = []
        positions = []
        for page in pages:
            pixels = _to_device(page.pixel_values, self.device).to(self.dtype)
            grid = vision.patch_conv(pixels[None])[0]  # [hidden, h, w]; each image at its own size, no padding
            h, w = grid.shape[-2:]
            grids.append(grid.flatten(1).T)
            hpos, wpos = torch.meshgrid(
                torch.arange(h, device=self.device), torch.arange(w, device=self.device), indexing="ij"
            )
            positions.append(torch.stack([hpos.flatten(), wpos.flatten()], dim=-1))
        embeds = vision.ln_pre(torch.cat(grids)[None])
        position_embeddings = vision.patch_positional_embedding(embeds, torch.cat(positions))
        ctx = self._attention_context("vision", self.tuning.vision, [int(g.shape[0]) for g in grids], pacer=pacer)
        with forward_context(ctx):
            hidden = vision.transformer(embeds, attention_mask=None, position_embeddings=position_embeddings)
        sizes = [page.image_size for page in pages]
        projected = net.model.vision_projection(hidden.last_hidden_state[0], sizes)
        merge = patch * int(net.config.spatial_merge_size)
        return list(torch.split(projected, [(h // merge) * (w // merge) for h, w in sizes]))

    def activate(self, prefill: Prefill, chunk: int) -> None:
        """Make the prefilled pages' slots decode, ordered after their prefill on the main stream. Snapshots
        from `chunk` on describe them."""
        state = self.state
        assert state is not None
        assert self.config is not None
        if prefill.event is not None:
            torch.cuda.current_stream(self.device).wait_event(prefill.event)
        items = prefill.items
        slots = _to_device(torch.tensor([i.slot for i in items]), self.device)
        last = _to_device(torch.tensor([int(i.page.input_ids[-1]) for i in items]), self.device)
        positions = _to_device(torch.tensor([i.page.prompt_length - 1 for i in items]), self.device)
        budgets = _to_device(torch.tensor([i.max_new_tokens for i in items]), self.device)
        table = torch.full((len(items), self.config.max_blocks_per_slot), TRASH_BLOCK, dtype=torch.int32)
        for row, item in enumerate(items):
            table[row, : len(item.blocks)] = torch.tensor(item.blocks, dtype=torch.int32)
        state.block_table.index_copy_(0, slots, _to_device(table, self.device))
        state.input_ids.index_copy_(0, slots, last)
        state.write_pos.index_copy_(0, slots, positions)
        state.max_new.index_copy_(0, slots, budgets)
        state.n_generated.index_fill_(0, slots, 0)
        state.reason.index_fill_(0, slots, RUNNING)
        state.tracker.reset(slots)
        state.done.index_fill_(0, slots, False)
        for item in items:
            self._active_from[item.slot] = chunk
            self._slot_request[item.slot] = item.request_id

    # ---- decode ----------------------------------------------------------------------------------

    @property
    def chunk(self) -> int:
        """Index of the next snapshot to be taken."""
        return self._chunk

    def launch_chunk(self, rows: int, steps: int) -> None:
        """Queue `steps` decode steps over the first `rows` slots and a snapshot after them."""
        state = self.state
        assert state is not None
        size = _graph_rows(rows) if self._graphs else rows
        size = min(size, state.rows)
        graph = self._graphs.get(size)
        with torch.inference_mode():
            for _ in range(steps):
                if graph is not None:
                    graph.replay()
                else:
                    self._decode_step(size)
            host = self._snapshot_buffers[0]
            self._snapshot_buffers.rotate(-1)
            summary = torch.stack([state.done[:size].long(), state.n_generated[:size], state.reason[:size]])
            host[:, :size].copy_(summary, non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
        self._pending.append(Snapshot(self._chunk, size, host, event))
        self._chunk += 1

    @property
    def chunks_in_flight(self) -> int:
        return len(self._pending)

    def collect(self) -> list[SlotOutput]:
        """Wait for the oldest queued snapshot; the slots it shows finished, with their tokens on the way to
        the host. Each finished slot is forgotten (it is free for the scheduler to reuse)."""
        state = self.state
        assert state is not None
        snap = self._pending.popleft()
        if snap.event is not None:
            snap.event.synchronize()
        done, generated, reason = snap.host[:, : snap.rows].tolist()
        finished = [
            slot
            for slot, request in self._slot_request.items()
            if slot < snap.rows and snap.chunk >= self._active_from[slot] and done[slot]
        ]
        if not finished:
            return []
        count = max(generated[s] for s in finished)
        with torch.inference_mode():
            index = _to_device(torch.tensor(finished), self.device)
            tokens = state.out_tokens.index_select(0, index)[:, :count]
            probs = state.out_probs.index_select(0, index)[:, :count]
            if self.cuda:
                tokens_host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                probs_host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
                tokens_host.copy_(tokens, non_blocking=True)
                probs_host.copy_(probs, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record()
            else:
                tokens_host, probs_host, event = tokens, probs, None
        outputs = []
        for row, slot in enumerate(finished):
            request = self._slot_request.pop(slot)
            del self._active_from[slot]
            outputs.append(
                SlotOutput(request, FINISH[reason[slot]], generated[slot], tokens_host, probs_host, row, event)
            )
        return outputs

    def forget(self, slot: int) -> None:
        """A slot whose page never started decoding (failed prefill) is free again."""
        self._slot_request.pop(slot, None)
        self._active_from.pop(slot, None)

    def _decode_step(self, rows: int) -> None:
        """One decoder forward for the first `rows` slots, each at its own position, then the greedy choice and
        checks, all in place on the device. Fixed shapes: the same code runs eagerly and as a CUDA graph."""
        state, cache, config = self.state, self.cache, self.config
        assert state is not None
        assert cache is not None
        assert config is not None
        done, write_pos = state.done[:rows], state.write_pos[:rows]
        table = state.block_table[:rows]
        block_size = config.block_size
        seq_lens = torch.where(done, 0, write_pos + 1).to(torch.int32)
        block = table.gather(1, (write_pos // block_size)[:, None]).squeeze(1).long()
        write_index = torch.where(done, TRASH_BLOCK * block_size, block * block_size + write_pos % block_size)
        ctx = ForwardContext(
            "decode",
            write_index=write_index,
            block_table=table,
            seq_lens=seq_lens,
            max_seq_len=(max(1, int(seq_lens.max())) if not self.cuda else table.shape[1] * block_size),
            use_triton=config.use_triton,
            kernel=self.tuning.decode_kernel,
            cache=cache,
        )
        with forward_context(ctx):
            out = self.net.model.language_model(
                input_ids=state.input_ids[:rows, None],
                attention_mask={"full_attention": None},
                position_ids=write_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
        logits = self.net.lm_head(out.last_hidden_state[:, -1]).float()
        self._advance(rows, logits)

    def _advance(self, rows: int, logits: torch.Tensor) -> None:
        """Greedy choice, its probability, and the stop/length/repetition checks."""
        state = self.state
        assert state is not None
        done, n_generated = state.done[:rows], state.n_generated[:rows]
        active = ~done
        tokens = logits.argmax(dim=-1)
        probs = (logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)).exp()
        column = n_generated[:, None]
        state.out_tokens[:rows].scatter_(1, column, tokens[:, None])
        state.out_probs[:rows].scatter_(1, column, probs[:, None])
        n_generated.add_(active.long())
        is_stop = (tokens[:, None] == state.eos_ids[None, :]).any(dim=1)
        looping = state.tracker.update(tokens, active, rows)
        out_of_budget = n_generated >= state.max_new[:rows]
        reason = torch.where(
            is_stop, STOP, torch.where(looping, REPETITION, torch.where(out_of_budget, LENGTH, RUNNING))
        )
        finished = active & (reason != RUNNING)
        state.reason[:rows].copy_(torch.where(finished, reason, state.reason[:rows]))
        done.logical_or_(finished)
        state.input_ids[:rows].copy_(tokens)
        state.write_pos[:rows].add_((active & ~finished).long())


def _graph_rows(rows: int) -> int:
    return max(_MIN_GRAPH_ROWS, 1 << (max(rows, 1) - 1).bit_length())


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without making the host wait for the GPU (from pinned memory when on CUDA)."""
    if device.type != "cuda":
        return tensor
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" and HAVE_TRITON
