"""The LightOnOCR engine: `LightOnOcrEngine` (load the model, tune and size the KV cache, recognise pages) and its
settings (`EngineConfig`, and the `Capacity` that `load()` sized).

The pages run through an `EngineCore` (`core.py`), vLLM v1's step loop on one thread per device: `worker()`
gives the daemon one to keep, `generate()` and `recognize()` start one for a call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import torch

from ocrbooth.errors import ConfigError, FatalError
from ocrbooth.models.ocr.engine import PageInput, PageOutput, StepStats
from ocrbooth.models.ocr.lightonocr.compiled_layers import CompiledLayers, compile_layers
from ocrbooth.models.ocr.lightonocr.core import EngineCore
from ocrbooth.models.ocr.lightonocr.detokenize import Detokenizer, PageGeneration, to_output
from ocrbooth.models.ocr.lightonocr.fused_norms import fuse_rms_norms
from ocrbooth.models.ocr.lightonocr.inputs import PreparedPage, PromptBuilder
from ocrbooth.models.ocr.lightonocr.kv_cache import kv_budget_bytes
from ocrbooth.models.ocr.lightonocr.repetition import RepetitionGuard
from ocrbooth.models.ocr.lightonocr.runner import PREFILL_OVERLAP, ModelRunner, RunnerConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL: Final = "lightonai/LightOnOCR-1B-1025"
_DTYPES: Final = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_CPU_KV_TOKENS: Final = 32_768  # KV cache size without a GPU to size it from (tests, CPU runs)
_GIB: Final = 1 << 30
KV_CACHE_DTYPES: Final = ("auto", "fp8_e4m3")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Capacity and pacing of the engine (OcrSettings' engine fields)."""

    max_slots: int = 256
    """Pages decoding at once, at most (KV memory may allow fewer)."""
    gpu_memory_fraction: float = 0.90
    """Share of the card's memory the engine may hold: weights, activations and the KV cache."""
    kv_cache_tokens: int | None = None
    """Fixed KV cache size in token positions; None sizes it from GPU memory (CPU: 32768)."""
    block_size: int = 64
    """Token positions per KV block."""
    max_prefill_tokens: int = 16_384
    """Prompt tokens prefilled per step (about 7 full-size pages)."""
    steps_per_sync: int = 8
    """Decode steps between the host's looks at the device (a finished page waits at most this long)."""
    max_new_tokens: int = 8192
    """Largest output budget a page may have (sizes the output buffers and block tables)."""
    prefetch_pages: int = 32
    """Waiting pages preprocessed ahead of admission (each holds its pixels in host memory)."""
    preprocess_threads: int = 4
    """Threads running the processor (resize, normalize, tokenize) ahead of the GPU."""
    autotune: bool = True
    """On CUDA, time the decode kernel's launch configurations and the attention backends at load (a few
    seconds) and use the fastest; off: the defaults."""
    prefill_overlap: str = "stream"
    """How prefill shares the GPU with decoding (runner.PREFILL_OVERLAP): "stream", "priority", "serial" or
    "green" (half the SMs; not measured on a GPU yet, so the daemon's settings do not offer it)."""
    prefill_thread: bool = False
    """Launch prefill batches from a thread of their own, paced a few layers ahead of the GPU
    (launch_pacing.py), so that the host's part of a prefill never holds up the decode loop's launches; off
    (the default): the engine core's thread launches them after each step's decode chunk. On an H100 an
    inline launch held the engine thread 0.39 s an admission, and a thread without the pacing was far slower
    (2.89 against 8.02 pages/s: it blocked in the driver holding the GIL); the paced thread is not measured
    yet. "serial" always launches inline."""
    fused_norms: bool = True
    """Run the model's RMSNorm modules as one fused kernel each (fused_norms.py); off: transformers' own
    (measured on an H100: 256 pages x 500 tokens 6.98 -> 7.98 pages/s, bench/results/ocr_throughput_h100_fusion_*)."""
    kv_cache_dtype: str = "auto"
    """Element type of the KV cache: "auto" (the model's) or "fp8_e4m3" (half the bytes every decode step reads
    and twice the positions in the same memory; keys and values rounded to FP8 as they are written, saturated
    at its range, unscaled: the outputs change, so it is a choice, not a default)."""
    compile_layers: bool = False
    """Run each decoder and vision-encoder layer through torch.compile, attention kernels outside the graphs
    (compiled_layers.py; compiled at load); off: eager (the default until a GPU run has measured it)."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_slots < 1:
            problems.append(f"max_slots must be >= 1, got {self.max_slots}")
        if not 0 < self.gpu_memory_fraction <= 1:
            problems.append(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            problems.append(f"kv_cache_tokens must be >= block_size ({self.block_size}), got {self.kv_cache_tokens}")
        if self.block_size < 32 or self.block_size & (self.block_size - 1):
            problems.append(f"block_size must be a power of two >= 32, got {self.block_size}")
        for name in ("max_prefill_tokens", "steps_per_sync", "max_new_tokens", "prefetch_pages", "preprocess_threads"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            problems.append(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.prefill_overlap not in PREFILL_OVERLAP:
            modes = ", ".join(PREFILL_OVERLAP)
            problems.append(f"prefill_overlap must be one of {modes}, got {self.prefill_overlap!r}")
        if problems:
            raise ConfigError("invalid LightOnOCR engine settings: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class Capacity:
    """What `load()` sized, for logs, benchmarks and tests."""

    num_blocks: int
    block_size: int
    max_slots: int
    max_page_tokens: int
    kv_cache_bytes: int
    activation_bytes: int

    @property
    def kv_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size


class LightOnOcrEngine:
    """LightOnOCR through transformers with continuous batching: greedy decoding with token confidences."""

    name = "lightonocr"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str | None = None,
        dtype: str | None = None,
        repetition: RepetitionGuard | None = None,
        use_cuda_graphs: bool = True,
        eos_token_ids: Sequence[int] | None = None,
        config: EngineConfig | None = None,
        decode_attention: Literal["auto", "triton", "reference"] = "auto",
    ) -> None:
        """`model`: hub id or local directory. `device`: default cuda when available, else cpu. `dtype`:
        bfloat16 on CUDA and float32 on CPU by default. `repetition`: None for the default guard. `use_cuda_graphs`:
        replay decode steps as CUDA graphs (CUDA only). `eos_token_ids`: stop tokens, default the model's
        generation config (empty: never stop). `decode_attention`: the Triton kernel on CUDA (`auto`) or the
        gather + SDPA reference."""
        self.model = model
        self.device = torch.device(device) if device else _default_device()
        if dtype is not None and dtype not in _DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r} for the LightOnOCR engine; use one of {sorted(_DTYPES)}")
        self.dtype = _DTYPES[dtype] if dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.repetition = repetition if repetition is not None else RepetitionGuard()
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.config = config or EngineConfig()
        self.decode_attention = decode_attention
        self._eos_override = None if eos_token_ids is None else tuple(eos_token_ids)
        self._runner: ModelRunner | None = None
        self._builder: PromptBuilder | None = None
        self._detokenizer: Detokenizer | None = None
        self._processor: Any = None
        self.capacity: Capacity | None = None
        self.compiled: CompiledLayers | None = None
        self._core_lock = threading.Lock()
        self._core_guard = threading.Lock()
        self._active_core: EngineCore | None = None

    # ---- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        """Load processor and weights, size and allocate the KV cache; ConfigError when the model cannot be
        loaded, FatalError when the device cannot take it."""
        location = Path(self.model).expanduser()
        looks_local = self.model.startswith((".", "/", "~")) or self.model.count("/") > 1
        if looks_local and not location.is_dir():
            raise ConfigError(f"LightOnOCR model directory {str(location)!r} does not exist")
        source = str(location) if location.is_dir() else self.model
        try:
            from transformers import LightOnOcrProcessor

            processor: Any = LightOnOcrProcessor.from_pretrained(source)
            net = ModelRunner.load(source, device=torch.device("cpu"), dtype=self.dtype)
        except Exception as exc:  # any failure to read the model is a configuration problem (hub down, bad path)
            raise ConfigError(
                f"cannot load LightOnOCR model {self.model!r} ({type(exc).__name__}: {exc}); for an offline "
                "machine, point the model setting at a local directory or set HF_HUB_OFFLINE=1 with a warm cache"
            ) from exc
        try:
            net.to(self.device)
        except RuntimeError as exc:
            raise FatalError(f"cannot move LightOnOCR to {self.device}: {exc}") from exc
        if self.config.fused_norms:
            log.info("LightOnOCR: %d RMSNorm modules run as one fused kernel each", fuse_rms_norms(net))
        if self.config.compile_layers:
            self.compiled = compile_layers(net)
            log.info("LightOnOCR: %d layers compiled with torch.compile (at their first forward)", self.compiled.layers)
        self._processor = processor
        self._builder = PromptBuilder(processor, pin_memory=self.device.type == "cuda")
        self._detokenizer = Detokenizer(processor.tokenizer)
        eos = self._eos_override if self._eos_override is not None else _eos_ids(net, processor)
        kv_dtype = torch.float8_e4m3fn if self.config.kv_cache_dtype == "fp8_e4m3" else self.dtype
        runner = ModelRunner(net, device=self.device, dtype=self.dtype, kv_dtype=kv_dtype)
        runner.set_prefill_overlap(self.config.prefill_overlap)
        try:
            if self.config.autotune:
                self._tune(runner)
            self.capacity = self._size(runner)
            runner.allocate(
                RunnerConfig(
                    max_slots=self.capacity.max_slots,
                    num_blocks=self.capacity.num_blocks,
                    block_size=self.config.block_size,
                    max_blocks_per_slot=-(-self.capacity.max_page_tokens // self.config.block_size),
                    max_new_tokens=self.config.max_new_tokens,
                    use_cuda_graphs=self.use_cuda_graphs,
                    use_triton=self._use_triton(),
                    eos_ids=eos,
                    guard=self.repetition,
                )
            )
        except torch.OutOfMemoryError as exc:
            raise FatalError(f"LightOnOCR cannot allocate its KV cache on {self.device}: {exc}") from None
        self._runner = runner
        cap = self.capacity
        log.info(
            "LightOnOCR engine: %d KV blocks of %d tokens (%.1f GiB, %d tokens), %d slots, pages up to %d tokens, "
            "prefill activations %.1f GiB",
            cap.num_blocks,
            cap.block_size,
            cap.kv_cache_bytes / _GIB,
            cap.kv_tokens,
            cap.max_slots,
            cap.max_page_tokens,
            cap.activation_bytes / _GIB,
        )

    def _tune(self, runner: ModelRunner) -> None:
        longest = int(self.processor.image_processor.size["longest_edge"])
        from PIL import Image

        largest = PageInput(Image.new("RGB", (longest, longest), "white"), max_new_tokens=1)
        merge = int(runner.net.config.spatial_merge_size)
        try:
            self._run_tuning(runner, largest, merge)
        except Exception as exc:  # out of memory on a small card, a Triton build that fails: keep the defaults
            log.warning("LightOnOCR tuning failed, using the default kernels: %s", str(exc).splitlines()[0][:300])
            torch.cuda.empty_cache()

    def _run_tuning(self, runner: ModelRunner, largest: PageInput, merge: int) -> None:
        cfg = self.config
        runner.tune(
            slots=cfg.max_slots,
            block_size=cfg.block_size,
            max_blocks_per_slot=-(-(self.builder.prompt_length(largest) + cfg.max_new_tokens) // cfg.block_size),
            prompt_tokens=self.builder.prompt_length(largest),
            patches=self.builder.image_token_count(largest.image) * merge * merge,
        )

    def _use_triton(self) -> bool:
        from ocrbooth.models.ocr.lightonocr.runner import triton_usable

        if self.decode_attention == "reference":
            return False
        usable = triton_usable(self.device)
        if self.decode_attention == "triton" and not usable:
            raise ConfigError("decode_attention=triton needs CUDA and the triton package")
        return usable

    def _size(self, runner: ModelRunner) -> Capacity:
        """KV blocks from the card's memory (after a profiling prefill of a full step), or from the setting."""
        cfg = self.config
        builder = self.builder
        spec = runner.kv_spec(cfg.block_size)
        longest = int(self.processor.image_processor.size["longest_edge"])
        from PIL import Image

        largest = PageInput(Image.new("RGB", (longest, longest), "white"), max_new_tokens=1)
        max_prompt = builder.prompt_length(largest)
        max_page_tokens = max_prompt + cfg.max_new_tokens
        activation = 0
        if cfg.kv_cache_tokens is not None:
            num_blocks = spec.blocks_for(cfg.kv_cache_tokens) + 1
        elif self.device.type == "cuda":
            prepared = builder.prepare(largest)
            activation = runner.profile_prefill([prepared] * max(1, cfg.max_prefill_tokens // max_prompt))
            free, total = torch.cuda.mem_get_info(self.device)
            rows = max(cfg.max_slots, 8)
            # decode-step temporaries: float32 logits and softmax over the vocabulary, split-K partials
            decode_bytes = rows * runner.vocab * 4 * 4 + rows * 32 * 64 * runner.head_dim * 4 * 2
            budget = kv_budget_bytes(
                total_bytes=total,
                free_bytes=free,
                used_bytes=torch.cuda.memory_reserved(self.device),
                activation_bytes=activation,
                fraction=cfg.gpu_memory_fraction,
                margin_bytes=decode_bytes + _GIB // 2,
            )
            num_blocks = budget // spec.bytes_per_block
        else:
            num_blocks = spec.blocks_for(_CPU_KV_TOKENS) + 1
        if num_blocks < spec.blocks_for(max_prompt + 1) + 1:
            raise FatalError(
                f"LightOnOCR's KV cache would hold {max(0, num_blocks - 1) * cfg.block_size} tokens, less than one "
                f"full-size page ({max_prompt} prompt tokens); free GPU memory or raise ocr.gpu_memory_fraction"
            )
        return Capacity(
            num_blocks=num_blocks,
            block_size=cfg.block_size,
            max_slots=cfg.max_slots,
            max_page_tokens=max_page_tokens,
            kv_cache_bytes=num_blocks * spec.bytes_per_block,
            activation_bytes=activation,
        )

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise RuntimeError("LightOnOcrEngine.load() has not been called")
        return self._runner

    @property
    def network(self) -> Any:
        """The loaded LightOnOcrForConditionalGeneration (for tests and benchmarks)."""
        return self.runner.net

    @property
    def processor(self) -> Any:
        if self._processor is None:
            raise RuntimeError("LightOnOcrEngine.load() has not been called")
        return self._processor

    @property
    def builder(self) -> PromptBuilder:
        if self._builder is None:
            raise RuntimeError("LightOnOcrEngine.load() has not been called")
        return self._builder

    @property
    def detokenizer(self) -> Detokenizer:
        if self._detokenizer is None:
            raise RuntimeError("LightOnOcrEngine.load() has not been called")
        return self._detokenizer

    # ---- costs -------------------------------------------------------------------------------------

    def image_token_count(self, image: Any) -> int:
        return self.builder.image_token_count(image)

    def prompt_length(self, page: PageInput) -> int:
        return self.builder.prompt_length(page)

    def cost(self, page: PageInput) -> int:
        """Image tokens + output budget: what the page holds in the KV cache at most."""
        return self.image_token_count(page.image) + page.max_new_tokens

    def preprocess(self, page: PageInput) -> PreparedPage:
        return self.builder.prepare(page)

    def detokenize(self, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
        return self.detokenizer.detokenize(ids)

    # ---- serving ---------------------------------------------------------------------------------

    def worker(self, *, span_threshold: float, on_step: Callable[[StepStats], None] | None = None) -> EngineCore:
        """The engine core serving this engine's pages (start it; one per engine)."""
        return EngineCore(self, span_threshold=span_threshold, on_step=on_step)

    def recognize(self, pages: list[PageInput], *, span_threshold: float) -> list[PageOutput]:
        """Recognise pages (all in flight together); one output per page, same order."""
        return [to_output(gen, span_threshold=span_threshold) for gen in self.generate(pages)]

    def generate(
        self, pages: Sequence[PageInput], *, on_step: Callable[[StepStats], None] | None = None
    ) -> list[PageGeneration]:
        """Run pages through a core started for this call: token ids, probabilities, text and spans."""
        with self._core_lock:
            core = EngineCore(self, span_threshold=0.5, on_step=on_step)
            core.start()
            try:
                futures = [core.submit_generation(page) for page in pages]
                return [future.result() for future in futures]
            finally:
                core.stop()


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
