"""The LightOnOCR engine: per-page vision encoding and prefill, then one batched greedy decode loop.

A batch runs in three stages, so a page's tokens never depend on its batch-mates:

1. each page goes through the processor's chat template on its own (the image is the whole prompt), on
   helper threads that run a few pages ahead of the GPU;
2. each page is vision-encoded alone, its features put at its image tokens, and its prompt prefilled alone
   (batch of one, no padding) into its own slot of a static KV cache, without waiting for the GPU. Pixtral
   would otherwise put the whole batch into one sequence with a dense mask, which grows with the square of
   the batch's patches;
3. all slots decode together, one forward per step, each slot at its own position (per-slot position ids,
   per-slot cache write index, a key mask up to each slot's length). The step is a fixed-shape function of
   `_DecodeState`, so on CUDA it is captured once per key-length bucket as a CUDA graph and replayed; a slot
   that finishes is refilled with the next waiting page while the others keep decoding.

Token choice, probabilities (softmax in float32 at the chosen token), stop/length/repetition checks all
happen on the device inside the step; the host looks at the state every few steps only.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch
import torch.nn.functional as F

from ocrbooth.errors import ConfigError, FatalError
from ocrbooth.models.ocr.confidence import summarize
from ocrbooth.models.ocr.engine import FinishReason, PageInput, PageOutput
from ocrbooth.models.ocr.lightonocr.detokenize import PageGeneration  # the same record as the new engine's

if TYPE_CHECKING:
    from PIL.Image import Image

DEFAULT_MODEL: Final = "lightonai/LightOnOCR-1B-1025"

_ATTENTION: Final = "ocrbooth_grouped_sdpa"  # registered name of the decoder's attention function
_VISION_ATTENTION: Final = "ocrbooth_one_image_sdpa"  # ...and of the vision encoder's
_KV_BUCKET: Final = 256  # decode attends to a multiple of this many cache positions (one CUDA graph each)
_SYNC_EVERY: Final = 8  # decode steps between looks at the device state (a finished page waits at most this)
_PREFETCH_THREADS: Final = 2  # CPU preprocessing (resize, normalize, tokenize, pin) ahead of the GPU
_PREFETCH_PAGES: Final = 4  # ...for at most this many waiting pages (each holds its pixels in pinned memory)
_DTYPES: Final = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Finish codes kept on the device (index into _FINISH).
_RUNNING, _STOP, _LENGTH, _REPETITION = 0, 1, 2, 3
_FINISH: Final[tuple[FinishReason, ...]] = ("error", "stop", "length", "repetition")


@dataclass(frozen=True, slots=True)
class RepetitionGuard:
    """Stops a page whose output has started looping.

    The guard fires when the newest tokens are an exact repeat with some period `p` <= `max_period` (the
    last L tokens equal the L tokens `p` earlier, shifted), and that periodic tail is at least
    `max(min_repeats * p, min_tokens)` tokens long. `min_tokens` keeps legitimate repetition (rows of an
    empty table, dot leaders) from firing early: 256 tokens is some 30 identical 8-token rows in a row.
    """

    enabled: bool = True
    max_period: int = 256
    """Longest loop (in tokens) that is detected."""
    min_repeats: int = 4
    """A loop must have been output this many times over."""
    min_tokens: int = 256
    """...and cover at least this many tokens."""

    def __post_init__(self) -> None:
        if self.max_period < 1 or self.min_repeats < 2 or self.min_tokens < 1:
            raise ConfigError(f"invalid repetition guard {self!r}: need max_period>=1, min_repeats>=2, min_tokens>=1")

    def thresholds(self) -> list[int]:
        """Tail length at which a loop of period p (1-based index) fires."""
        return [max(self.min_repeats * p, self.min_tokens) for p in range(1, self.max_period + 1)]

    def first_trigger(self, tokens: Sequence[int]) -> int | None:
        """Index of the token at which the guard would stop this stream, or None. Runs the device tracker."""
        if not self.enabled:
            return None
        tracker = _RepetitionTracker(self, slots=1, device=torch.device("cpu"))
        active = torch.ones(1, dtype=torch.bool)
        for i, token in enumerate(tokens):
            if bool(tracker.update(torch.tensor([token]), active)[0]):
                return i
        return None


@dataclass(slots=True)
class PreparedPage:
    """A page after the processor: the prompt ids with the image tokens expanded, and its pixels."""

    input_ids: torch.Tensor
    """[1, n] on the engine's device."""
    image_positions: torch.Tensor
    """Indices of the image tokens in `input_ids`, on the engine's device."""
    pixel_values: torch.Tensor
    """[1, 3, H, W] in the model's dtype, on the engine's device."""
    image_sizes: list[tuple[int, int]]
    """[(H, W)] after resizing."""
    max_new_tokens: int

    @property
    def prompt_length(self) -> int:
        return int(self.input_ids.shape[1])


class LightOnOcrEngine:
    """LightOnOCR through transformers: greedy decoding with token confidences, batched with a static KV cache."""

    name = "lightonocr"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str | None = None,
        dtype: str | None = None,
        repetition: RepetitionGuard | None = None,
        use_cuda_graphs: bool = True,
        max_slots: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        """`model`: hub id or local directory. `device`: default cuda when available, else cpu. `dtype`:
        bfloat16 on CUDA and float32 on CPU by default. `repetition`: None for the default guard (pass
        `RepetitionGuard(enabled=False)` to turn it off). `use_cuda_graphs`: replay the decode step as a
        CUDA graph (CUDA only). `max_slots`: most pages decoding at once;
        more pages in one call wait for a free slot. `eos_token_ids`: stop tokens, default the model's
        generation config (empty: never stop)."""
        self.model = model
        self.device = torch.device(device) if device else _default_device()
        if dtype is not None and dtype not in _DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r} for the LightOnOCR engine; use one of {sorted(_DTYPES)}")
        self.dtype = _DTYPES[dtype] if dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.repetition = repetition if repetition is not None else RepetitionGuard()
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        if max_slots is not None and max_slots < 1:
            raise ConfigError(f"max_slots must be >= 1, got {max_slots}")
        self.max_slots = max_slots
        self._eos_override = None if eos_token_ids is None else tuple(eos_token_ids)
        self._net: Any = None  # LightOnOcrForConditionalGeneration once loaded
        self._processor: Any = None
        self._eos_ids: tuple[int, ...] = ()
        self._special_ids: frozenset[int] = frozenset()
        self._prompt = ""
        self._text_tokens = 0
        self._state: _DecodeState | None = None  # kept between calls when CUDA graphs are on...
        self._graphs: _CudaGraphs | None = None  # ...with its captured steps (held here: no reference cycle)

    # ---- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        """Load processor and weights; ConfigError when the model cannot be loaded, FatalError when the device
        cannot take it."""
        location = Path(self.model).expanduser()
        looks_local = self.model.startswith((".", "/", "~")) or self.model.count("/") > 1
        if looks_local and not location.is_dir():
            raise ConfigError(f"LightOnOCR model directory {str(location)!r} does not exist")
        source = str(location) if location.is_dir() else self.model
        try:
            from transformers import LightOnOcrForConditionalGeneration, LightOnOcrProcessor

            _register_attention()
            processor: Any = LightOnOcrProcessor.from_pretrained(source)
            net: Any = LightOnOcrForConditionalGeneration.from_pretrained(
                source, dtype=self.dtype, attn_implementation="sdpa"
            )
        except Exception as exc:  # any failure to read the model is a configuration problem (hub down, bad path)
            raise ConfigError(
                f"cannot load LightOnOCR model {self.model!r} ({type(exc).__name__}: {exc}); for an offline "
                "machine, point the model setting at a local directory or set HF_HUB_OFFLINE=1 with a warm cache"
            ) from exc
        try:
            net.to(self.device)
        except RuntimeError as exc:
            raise FatalError(f"cannot move LightOnOCR to {self.device}: {exc}") from exc
        net.eval()
        net.model.language_model.set_attn_implementation(_ATTENTION)
        net.model.vision_encoder.set_attn_implementation(_VISION_ATTENTION)
        self._net, self._processor = net, processor
        self._eos_ids = self._eos_override if self._eos_override is not None else _eos_ids(net, processor)
        added = processor.tokenizer.backend_tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(int(i) for i, token in added.items() if token.special)
        self._prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=True, tokenize=False
        )
        # Prompt tokens besides the image's: the template with its one image placeholder left out.
        self._text_tokens = len(processor.tokenizer(self._prompt, add_special_tokens=False)["input_ids"]) - 1

    @property
    def network(self) -> Any:
        """The loaded LightOnOcrForConditionalGeneration (for tests and benchmarks)."""
        if self._net is None:
            raise RuntimeError("LightOnOcrEngine.load() has not been called")
        return self._net

    @property
    def processor(self) -> Any:
        """The loaded LightOnOcrProcessor."""
        if self._processor is None:
            raise RuntimeError("LightOnOcrEngine.load() has not been called")
        return self._processor

    def release(self) -> None:
        """Drop the decode state kept between calls (KV cache and CUDA graphs), e.g. before a smaller retry."""
        self._state = None
        self._graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- costs -------------------------------------------------------------------------------------

    def image_token_count(self, image: Image) -> int:
        """Image tokens this page's prompt will hold (after the processor's resize), without preprocessing."""
        image_processor = self.processor.image_processor
        longest = int(image_processor.size["longest_edge"])
        patch = image_processor.patch_size
        patch_h, patch_w = (int(patch["height"]), int(patch["width"])) if isinstance(patch, dict) else (patch, patch)
        width, height = image.size
        ratio = max(height / longest, width / longest)
        if ratio > 1:
            height, width = math.floor(height / ratio), math.floor(width / ratio)
        height = ((height - 1) // patch_h + 1) * patch_h
        width = ((width - 1) // patch_w + 1) * patch_w
        merge = int(self.processor.effective_patch_size)
        return (height // merge) * (width // merge)

    def prompt_length(self, page: PageInput) -> int:
        """Tokens of this page's prompt (template + image), without preprocessing."""
        return self._text_tokens + self.image_token_count(page.image)

    def cost(self, page: PageInput) -> int:
        """Image tokens + output budget: what the page holds in the KV cache at most."""
        return self.image_token_count(page.image) + page.max_new_tokens

    # ---- recognition -------------------------------------------------------------------------------

    def recognize(self, pages: list[PageInput], *, span_threshold: float) -> list[PageOutput]:
        """Recognise a batch; one output per page, same order. A page that cannot be preprocessed gets an error
        output; out-of-memory propagates (the batcher splits), a CUDA error that breaks the device is fatal."""
        outputs: list[PageOutput] = []
        for gen in self.generate(pages):
            if gen.error_code is not None:
                outputs.append(
                    PageOutput(
                        text="",
                        finish_reason="error",
                        error_code=gen.error_code,
                        error_message=gen.error_message,
                    )
                )
                continue
            spans = gen.char_spans or []
            confidence, minimum, low = summarize(gen.content_probs, spans, threshold=span_threshold)
            outputs.append(
                PageOutput(
                    text=gen.text,
                    finish_reason=gen.finish_reason,
                    confidence=confidence,
                    min_token_confidence=minimum,
                    low_confidence_spans=low,
                    token_count=len(gen.token_ids),
                )
            )
        return outputs

    def generate(self, pages: Sequence[PageInput]) -> list[PageGeneration]:
        """Decode a batch: token ids, probabilities, text and character spans per page."""
        try:
            with torch.inference_mode():
                return self._generate(pages)
        except torch.OutOfMemoryError as exc:
            self.release()  # give the cache back before the batcher retries smaller halves...
            raise exc.with_traceback(None) from None  # ...and drop the frames below: their locals hold it
        except RuntimeError as exc:
            if _device_broken(exc):
                raise FatalError(f"CUDA failure in LightOnOCR: {exc}") from exc
            raise

    def _generate(self, pages: Sequence[PageInput]) -> list[PageGeneration]:
        results: list[PageGeneration] = [_EMPTY] * len(pages)
        todo: dict[int, tuple[PageInput, int]] = {}
        limit = int(self.network.config.text_config.max_position_embeddings)
        for index, page in enumerate(pages):
            try:
                if page.max_new_tokens < 1:
                    raise ValueError(f"max_new_tokens must be >= 1, got {page.max_new_tokens}")
                length = self.prompt_length(page)
            except (ValueError, TypeError, OSError) as exc:  # the page itself is unusable
                results[index] = _page_error("unprocessable_page", f"{type(exc).__name__}: {exc}")
                continue
            if length + page.max_new_tokens > limit:
                message = f"{length} prompt + {page.max_new_tokens} new tokens > {limit} positions"
                results[index] = _page_error("page_too_large", message)
                continue
            todo[index] = (page, length)
        if todo:
            for index, gen in self._decode(todo).items():
                if gen.error_code is None:
                    gen.text, gen.char_spans = self.detokenize(gen.content_ids)
                results[index] = gen
        return results

    def preprocess(self, page: PageInput) -> PreparedPage:
        """The processor's chat template with the page image as the only content, on the engine's device."""
        return self._upload(self._encode_on_host(page))

    def _encode_on_host(self, page: PageInput) -> PreparedPage:
        """CPU half of `preprocess` (runs on the prefetch threads): processor call, pinned tensors."""
        processor = self.processor
        batch = processor(images=[page.image.convert("RGB")], text=[self._prompt], return_tensors="pt")
        input_ids = batch["input_ids"]
        image_positions = (input_ids[0] == processor.image_token_id).nonzero().squeeze(1)
        if image_positions.numel() == 0 or int(image_positions[-1]) == input_ids.shape[1] - 1:
            raise ValueError("the chat template must put the image inside the prompt, followed by text")
        pin = self.device.type == "cuda"
        return PreparedPage(
            input_ids=input_ids.pin_memory() if pin else input_ids,
            image_positions=image_positions.pin_memory() if pin else image_positions,
            pixel_values=batch["pixel_values"].pin_memory() if pin else batch["pixel_values"],
            image_sizes=[(int(h), int(w)) for h, w in batch["image_sizes"].tolist()],
            max_new_tokens=page.max_new_tokens,
        )

    def _upload(self, host: PreparedPage) -> PreparedPage:
        """Copy to the device without waiting (pinned memory), so the host can go on while the GPU works."""
        blocking = self.device.type != "cuda"
        return PreparedPage(
            input_ids=host.input_ids.to(self.device, non_blocking=not blocking),
            image_positions=host.image_positions.to(self.device, non_blocking=not blocking),
            pixel_values=host.pixel_values.to(self.device, non_blocking=not blocking).to(self.dtype),
            image_sizes=host.image_sizes,
            max_new_tokens=host.max_new_tokens,
        )

    # ---- the decode loop ---------------------------------------------------------------------------

    def _decode(self, todo: dict[int, tuple[PageInput, int]]) -> dict[int, PageGeneration]:
        """Prefill pages into free slots as they open, decode all slots together, collect finished pages."""
        slots = min(len(todo), self.max_slots or len(todo))
        need_positions = max(length + page.max_new_tokens for page, length in todo.values())
        need_new = max(page.max_new_tokens for page, _ in todo.values())
        state = self._decode_state(slots, need_positions, need_new)
        step = self._step_runner(state)

        waiting = deque(todo)
        results: dict[int, PageGeneration] = {}
        slot_page: list[int | None] = [None] * state.slots
        # Host copies of the device state, refreshed at each look: done, write_pos, n_generated, max_new, reason.
        host = [[1] * state.slots, [0] * state.slots, [0] * state.slots, [0] * state.slots, [0] * state.slots]
        # CPU preprocessing runs ahead on helper threads while this thread feeds the GPU.
        prefetch = ThreadPoolExecutor(max_workers=_PREFETCH_THREADS, thread_name_prefix="lightonocr-preprocess")
        encoded: dict[int, Future[PreparedPage]] = {}

        def fill(slot: int) -> None:
            while waiting:
                for ahead in itertools.islice(waiting, _PREFETCH_PAGES):
                    if ahead not in encoded:
                        encoded[ahead] = prefetch.submit(self._encode_on_host, todo[ahead][0])
                index = waiting.popleft()
                page, length = todo[index]
                try:
                    prep = self._upload(encoded.pop(index).result())
                except (ValueError, TypeError, OSError) as exc:  # this page alone is unusable
                    results[index] = _page_error("unprocessable_page", f"{type(exc).__name__}: {exc}")
                    continue
                if prep.prompt_length != length:
                    raise RuntimeError(f"prompt of {prep.prompt_length} tokens, {length} predicted")
                self._prefill(state, slot, prep)
                slot_page[slot] = index
                host[1][slot], host[2][slot], host[3][slot] = length - 1, 0, page.max_new_tokens
                return

        try:
            for slot in range(state.slots):
                fill(slot)
            while active := [s for s, p in enumerate(slot_page) if p is not None]:
                top = max(host[1][s] for s in active)
                # Stop the chunk where the first page runs out of budget: length-bound pages never overshoot.
                steps = max(1, min(_SYNC_EVERY, min(host[3][s] - host[2][s] for s in active)))
                for _ in range(steps):
                    step(_bucket(top + 1, state.capacity))
                    top = min(top + 1, state.capacity - 1)
                # One look at the device per chunk of steps (each look waits for the GPU to drain).
                host[:] = torch.stack(
                    [state.done.long(), state.write_pos, state.n_generated, state.max_new, state.reason]
                ).tolist()
                finished = [s for s in active if host[0][s]]
                if not finished:
                    continue
                rows = torch.tensor(finished, device=state.out_tokens.device)
                tokens = state.out_tokens.index_select(0, rows).tolist()
                probs = state.out_probs.index_select(0, rows).tolist()
                for row, slot in enumerate(finished):
                    owner = slot_page[slot]
                    assert owner is not None
                    n = host[2][slot]
                    results[owner] = PageGeneration(tokens[row][:n], probs[row][:n], _FINISH[host[4][slot]])
                    slot_page[slot] = None
                    fill(slot)
        finally:
            prefetch.shutdown(wait=True, cancel_futures=True)
        return results

    def _decode_state(self, slots: int, need_positions: int, need_new: int) -> _DecodeState:
        if self.use_cuda_graphs:
            slots = 1 << (slots - 1).bit_length()  # a few slot counts, so graphs are reused across batches
        capacity = _bucket(need_positions, 1 << 62)
        if self._state is not None and self._state.fits(slots, capacity, need_new):
            self._state.reset()
            return self._state
        self.release()  # before allocating: two KV caches at once may not fit
        state = _DecodeState(
            self.network,
            slots=slots,
            capacity=capacity,
            max_new=need_new,
            guard=self.repetition,
            eos_ids=self._eos_ids,
            device=self.device,
            dtype=self.dtype,
        )
        if self.use_cuda_graphs:
            self._state = state
        return state

    def _step_runner(self, state: _DecodeState) -> Callable[[int], None]:
        net = self.network

        def eager(kv_len: int) -> None:
            _decode_step(net, state, kv_len)

        if not self.use_cuda_graphs:
            return eager
        if self._graphs is None or self._graphs.state is not state:
            self._graphs = _CudaGraphs(state, eager, warm_lengths=(_KV_BUCKET, state.capacity))
        return self._graphs.replay

    def _prefill(self, state: _DecodeState, slot: int, page: PreparedPage) -> None:
        """Encode one page's image alone, put its features at the image tokens, and prefill all prompt tokens
        but the last into `slot`; the next decode step consumes the last one, so every generated token comes
        out of the same step function. Nothing here waits for the GPU."""
        net = self.network
        n = page.prompt_length
        flag = _ONE_IMAGE.set(True)
        try:
            features = net.model.get_image_features(page.pixel_values, page.image_sizes).pooler_output[0]
        finally:
            _ONE_IMAGE.reset(flag)
        embeds = net.get_input_embeddings()(page.input_ids[:, : n - 1])
        embeds[0].index_copy_(0, page.image_positions, features.to(embeds.dtype))
        state.cache.prefill_slot = slot
        try:
            net.model.language_model(
                inputs_embeds=embeds,
                attention_mask={"full_attention": None},  # a dict skips mask building: plain causal SDPA
                position_ids=torch.arange(n - 1, device=self.device)[None],
                past_key_values=state.cache,
                use_cache=True,
            )
        finally:
            state.cache.prefill_slot = None
        state.start(slot, last_token=page.input_ids[0, n - 1], position=n - 1, max_new=page.max_new_tokens)

    def detokenize(self, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
        """Text of `ids` (special tokens skipped) and each token's [start, end) in it, by streaming decode:
        tokens that only complete a character together share that character's range."""
        from tokenizers.decoders import DecodeStream

        backend = self.processor.tokenizer.backend_tokenizer
        stream = DecodeStream(skip_special_tokens=True)
        pieces: list[str] = []
        spans: list[tuple[int, int]] = [(0, 0)] * len(ids)
        length = 0
        pending: list[int] = []
        for index, token in enumerate(ids):
            if token in self._special_ids:
                spans[index] = (length, length)
                continue
            pending.append(index)
            chunk = stream.step(backend, token)
            if chunk:
                for i in pending:
                    spans[i] = (length, length + len(chunk))
                pieces.append(chunk)
                length += len(chunk)
                pending = []
        text = "".join(pieces)
        if pending:  # bytes that never completed a character: whatever the full decode makes of them
            full = backend.decode(list(ids), skip_special_tokens=True)
            if full.startswith(text) and len(full) > len(text):
                for i in pending:
                    spans[i] = (len(text), len(full))
                text = full
            else:
                for i in pending:
                    spans[i] = (length, length)
        return text, spans


# ---- decode state and step (fixed shapes: the same code runs eagerly and as CUDA graphs) ------------------


class _SlotKVCache:
    """Static K/V storage [slots, kv_heads, capacity, head_dim] per layer. The decoder layers only call
    `update`, so this stands in for a transformers Cache: during a prefill it copies one page's keys into its
    slot; during decode it writes each slot's new key at that slot's own position and returns the first
    `kv_len` positions of every slot."""

    def __init__(self, layers: int, slots: int, heads: int, capacity: int, head_dim: int, **kw: Any) -> None:
        # zeros, not empty: masked positions still enter the matmuls, and 0 * NaN would poison a row
        self.keys = [torch.zeros(slots, heads, capacity, head_dim, **kw) for _ in range(layers)]
        self.values = [torch.zeros(slots, heads, capacity, head_dim, **kw) for _ in range(layers)]
        self.write_pos = torch.zeros(slots, dtype=torch.long, device=kw.get("device"))
        self.kv_len = capacity
        self.prefill_slot: int | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_slot is not None:
            n = key_states.shape[2]
            keys[self.prefill_slot, :, :n].copy_(key_states[0])
            values[self.prefill_slot, :, :n].copy_(value_states[0])
            return key_states, value_states
        index = self.write_pos.view(-1, 1, 1, 1).expand_as(key_states)
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        return keys[:, :, : self.kv_len], values[:, :, : self.kv_len]


class _RepetitionTracker:
    """RepetitionGuard on the device: for every period p, how many consecutive newest tokens equal the token
    p steps before them. history[:, p-1] is the token p steps back."""

    def __init__(self, guard: RepetitionGuard, *, slots: int, device: torch.device) -> None:
        self.enabled = guard.enabled
        periods = guard.max_period
        self.history = torch.full((slots, periods), -1, dtype=torch.long, device=device)
        self.runs = torch.zeros((slots, periods), dtype=torch.long, device=device)
        self.fire_at = torch.tensor(guard.thresholds(), dtype=torch.long, device=device) - torch.arange(
            1, periods + 1, device=device
        )  # runs_p + p >= threshold_p

    def reset(self, slot: int) -> None:
        self.history[slot] = -1
        self.runs[slot] = 0

    def update(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Feed one token per slot; True where that slot's output is now looping."""
        if not self.enabled:
            return torch.zeros_like(active)
        same = self.history == tokens[:, None]
        self.runs.copy_(torch.where(same, self.runs + 1, 0))
        self.history.copy_(torch.cat([tokens[:, None], self.history[:, :-1]], dim=1))
        return (self.runs >= self.fire_at).any(dim=1) & active


class _DecodeState:
    """Everything the decode step reads and writes, in fixed-capacity slot tensors."""

    def __init__(
        self,
        net: Any,
        *,
        slots: int,
        capacity: int,
        max_new: int,
        guard: RepetitionGuard,
        eos_ids: Sequence[int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        text = net.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.slots, self.capacity, self.max_new_capacity = slots, capacity, max_new
        self.cache = _SlotKVCache(
            text.num_hidden_layers, slots, text.num_key_value_heads, capacity, head_dim, dtype=dtype, device=device
        )
        self.write_pos = self.cache.write_pos  # position of the token fed in the next step
        self.positions = torch.arange(capacity, device=device)
        self.input_ids = torch.zeros(slots, dtype=torch.long, device=device)
        self.n_generated = torch.zeros(slots, dtype=torch.long, device=device)
        self.max_new = torch.zeros(slots, dtype=torch.long, device=device)
        self.done = torch.ones(slots, dtype=torch.bool, device=device)
        self.reason = torch.zeros(slots, dtype=torch.long, device=device)
        # One spare column: a finished slot keeps writing at index n_generated, past its last token.
        self.out_tokens = torch.zeros((slots, max_new + 1), dtype=torch.long, device=device)
        self.out_probs = torch.zeros((slots, max_new + 1), dtype=torch.float32, device=device)
        self.eos_ids = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        self.tracker = _RepetitionTracker(guard, slots=slots, device=device)

    def fits(self, slots: int, capacity: int, max_new: int) -> bool:
        return self.slots == slots and self.capacity >= capacity and self.max_new_capacity >= max_new

    def reset(self) -> None:
        """Mark every slot idle (between calls)."""
        self.done.fill_(True)
        self.n_generated.zero_()
        self.write_pos.zero_()

    def start(self, slot: int, *, last_token: torch.Tensor, position: int, max_new: int) -> None:
        """Make a prefilled slot decode from `position`, fed `last_token` first."""
        self.input_ids[slot] = last_token
        self.write_pos[slot] = position
        self.n_generated[slot] = 0
        self.max_new[slot] = max_new
        self.reason[slot] = _RUNNING
        self.done[slot] = False
        self.tracker.reset(slot)


def _forward_step(net: Any, state: _DecodeState, kv_len: int) -> torch.Tensor:
    """One decoder forward for every slot at its own position; logits [slots, vocab] in float32."""
    state.cache.kv_len = kv_len
    mask = (state.positions[None, :kv_len] <= state.write_pos[:, None])[:, None, None, :]
    out = net.model(
        input_ids=state.input_ids[:, None],
        attention_mask={"full_attention": mask},
        position_ids=state.write_pos[:, None],
        past_key_values=state.cache,
        use_cache=True,
    )
    logits: torch.Tensor = net.lm_head(out.last_hidden_state[:, -1])
    return logits.float()


def _decode_step(net: Any, state: _DecodeState, kv_len: int) -> None:
    """The whole decode step: forward, choice, checks. What a CUDA graph captures."""
    _advance(state, _forward_step(net, state, kv_len))


def _advance(state: _DecodeState, logits: torch.Tensor) -> None:
    """Greedy choice, its probability, and the stop/length/repetition checks, all in place on the device."""
    active = ~state.done
    tokens = logits.argmax(dim=-1)
    probs = (logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)).exp()
    column = state.n_generated[:, None]
    state.out_tokens.scatter_(1, column, tokens[:, None])
    state.out_probs.scatter_(1, column, probs[:, None])
    state.n_generated.add_(active.long())
    is_stop = (tokens[:, None] == state.eos_ids[None, :]).any(dim=1)
    looping = state.tracker.update(tokens, active)
    out_of_budget = state.n_generated >= state.max_new
    reason = torch.where(
        is_stop, _STOP, torch.where(looping, _REPETITION, torch.where(out_of_budget, _LENGTH, _RUNNING))
    )
    finished = active & (reason != _RUNNING)
    state.reason.copy_(torch.where(finished, reason, state.reason))
    state.done.logical_or_(finished)
    state.input_ids.copy_(tokens)
    state.write_pos.add_((active & ~finished).long()).clamp_(max=state.positions.shape[0] - 1)


class _CudaGraphs:
    """The decode step captured once per key-length bucket (lazily: capturing runs nothing, so it is safe in
    the middle of a batch). Warm-up does run the step, so it happens while every slot is idle."""

    def __init__(self, state: _DecodeState, step: Callable[[int], None], *, warm_lengths: Sequence[int]) -> None:
        self.state = state
        self._step = step
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch.cuda.Stream is not annotated
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for kv_len in warm_lengths:
                step(kv_len)
        torch.cuda.current_stream().wait_stream(side)

    def replay(self, kv_len: int) -> None:
        graph = self._graphs.get(kv_len)
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step(kv_len)
            self._graphs[kv_len] = graph
        graph.replay()


# ---- helpers ---------------------------------------------------------------------------------------------


def _grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA that, for one query token per sequence, folds the query heads sharing a KV head into that head's
    query rows: K/V are read once instead of being repeated per query head (transformers' SDPA repeats them
    whenever a mask is given). Longer queries (prefill) go to transformers' SDPA unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, head_dim = query.shape
    grouped = query.reshape(batch, key.shape[1], heads // key.shape[1], head_dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, 1, heads, head_dim), None


def _one_image_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Pixtral puts all images of a call into one sequence under a dense block-diagonal mask. When the engine
    encodes a single page (_ONE_IMAGE set) that mask masks nothing; without it SDPA can use a flash kernel."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _ONE_IMAGE.get():
        attention_mask = None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_ONE_IMAGE: Final[ContextVar[bool]] = ContextVar("ocrbooth_lightonocr_one_image", default=False)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION, _grouped_sdpa)
    AttentionInterface.register(_VISION_ATTENTION, _one_image_sdpa)


def _bucket(length: int, capacity: int) -> int:
    return min(capacity, -(-length // _KV_BUCKET) * _KV_BUCKET)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _eos_ids(net: Any, processor: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    configured = net.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if processor.tokenizer.eos_token_id is not None:
        ids.add(int(processor.tokenizer.eos_token_id))
    return tuple(sorted(ids))


def _page_error(code: str, message: str) -> PageGeneration:
    return PageGeneration([], [], "error", error_code=code, error_message=message)


_EMPTY: Final = PageGeneration([], [], "error", error_code="internal_error", error_message="page was not decoded")


def _device_broken(exc: RuntimeError) -> bool:
    """A CUDA error other than out-of-memory leaves the context unusable (sticky errors): restart the process."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    message = str(exc)
    return any(marker in message for marker in ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert"))
