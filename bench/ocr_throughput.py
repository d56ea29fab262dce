"""OCR throughput of the LightOnOCR engine core on LightOnOCR-1B's architecture, against the floor of each
workload measured in the same run.

The model is the default `LightOnOcrConfig()` (Qwen3 decoder: 1024 hidden, 28 layers, 8 KV heads of 128, vocab
151936; Pixtral encoder: 1024 hidden, 24 layers) with random bfloat16 weights, saved to local disk and loaded
through `LightOnOcrEngine(path)`: it costs what the real model costs, without a model hub. Stop token and
repetition guard are off, so every page decodes exactly its `max_new_tokens`.

Sections (one process, one GPU; the JSON is rewritten after each, so a run cut short keeps what it has):

1. `ceilings`: device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 matmul on random data.
2. `attention`: one decode attention call over B slots of L positions (8 KV heads x 128, 16 query heads):
   the engine's Triton split-K paged kernel, SDPA over a padded dense cache with a mask (the old engine's
   way), and SDPA's flash kernel over a dense cache without a mask (only possible when all lengths are equal).
3. `fixed`: B pages of 1176x1540 (2,310 image tokens) x N tokens, all submitted at once: the engine core, and
   the old wave engine (`bench/wave_engine.py`, the code this engine replaced) in the same run.
4. `stream`: >= 1,000 pages, two page sizes, output lengths from a seeded distribution (15 % 5-100 tokens,
   60 % 300-900, 25 % 1,200-2,500), submitted with a fixed number outstanding (as the daemon's
   `max_in_flight` single-page documents would): steady-state pages/s (10th to 90th percentile of
   completions), p50/p95 page latency, GPU memory.
5. `floor` of each workload: K/V bytes every decode step must read plus the weights read once per step
   (at the engine's concurrency), at the measured copy bandwidth, plus vision-encoder and prefill FLOPs at
   the measured matmul rate. `fraction` = measured pages/s over floor pages/s.
6. `profile`: where the time goes: a decode chunk's time per step at given slot counts and contexts (graph
   replays over synthetic slots), a prefill batch's time per page alone and its kernels (torch.profiler),
   and the engine's own step log.
7. `overlap`: the first fixed length at each batch size once per `prefill_overlap` mode (a second stream,
   the same with decoding at the highest priority, serial, or a green context of N SMs), each optionally
   with prefill launched from a paced thread of its own (`/thread`) or inline (`/inline`), on one engine.

Every engine run also records `host`: the seconds the engine's threads spent inside each runner call
(launch_prefill, launch_chunk, collect, activate) and the caching allocator's flush-and-retry count.
`--sync-debug` prints each place that makes the host wait for the GPU (torch's sync debug mode), once.

Usage (device):  PYTHONPATH=. python3 bench/ocr_throughput.py --out bench/results/ocr_throughput.json
Plot (anywhere): PYTHONPATH=. python bench/ocr_throughput.py --plot-only bench/results/ocr_throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

VLLM_REFERENCE_PAGES_PER_S = 5.71  # LightOnOCR-1B model card: vLLM on one H100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/ocr_throughput.json"))
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="only draw the PNG for an existing result")
    parser.add_argument("--png", type=Path, help="plot path (default: the JSON path with .png)")
    parser.add_argument("--batches", default="32,128,256", help="engine batch sizes, comma-separated")
    parser.add_argument("--wave-batches", default="32,128", help="old engine batch sizes ('' to skip)")
    parser.add_argument("--new-tokens", default="500,1000", help="fixed output lengths, comma-separated")
    parser.add_argument("--stream-pages", type=int, default=1000)
    parser.add_argument("--outstanding", type=int, default=512, help="stream: pages submitted and not finished")
    parser.add_argument("--stream-deadline-s", type=float, default=1800, help="stream: stop waiting after this")
    parser.add_argument("--sections", default="ceilings,attention,wave,fixed,profile,stream")
    parser.add_argument(
        "--fused-norms", choices=("on", "off"), default="on", help="the engine's fused_norms (RMSNorm in one kernel)"
    )
    parser.add_argument(
        "--compile-layers",
        choices=("on", "off"),
        default="off",
        help="the engine's compile_layers (each layer through torch.compile, attention outside)",
    )
    parser.add_argument(
        "--kv-cache-dtype", choices=("auto", "fp8_e4m3"), default="auto", help="the engine's kv_cache_dtype"
    )
    parser.add_argument(
        "--max-slots", type=int, default=256, help="the engine's max_slots (pages decoding at once, if the KV fits)"
    )
    parser.add_argument(
        "--sync-debug",
        action="store_true",
        help="print each place where the engine makes the host wait for the GPU (torch's sync debug mode), once",
    )
    parser.add_argument("--trace-dir", type=Path, help="section `profile`: also write its Chrome traces here")
    parser.add_argument("--workdir", type=Path, help="where the random model is saved (default: a temp dir)")
    parser.add_argument(
        "--prefill-overlap", default="stream", help="the engine's prefill_overlap for every section but `overlap`"
    )
    parser.add_argument(
        "--overlap-modes",
        default="stream,priority,serial",
        help="section `overlap`: the fixed-length runs (first of --new-tokens) once per prefill_overlap mode "
        "(`green:N`: prefill limited to N SMs; a `/thread` or `/inline` suffix launches prefill from a paced thread "
        "of its own or from the engine core's thread; none: the engine's default)",
    )
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.png or args.plot_only.with_suffix(".png"))
        return 0
    with tempfile.TemporaryDirectory(prefix="ocr-bench-") as tmp:
        run(args, args.workdir or Path(tmp))
    plot(json.loads(args.out.read_text()), args.png or args.out.with_suffix(".png"))
    return 0


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run(args: argparse.Namespace, workdir: Path) -> None:
    import torch
    import transformers

    from ocrbooth.testing.ocr_workload import noise_pages
    from ocrbooth.testing.tiny_lightonocr import build_full_size_lightonocr

    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    sections = set(args.sections.split(","))
    result: dict[str, Any] = {
        "benchmark": "ocr_throughput",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": "LightOnOCR-1B architecture (default LightOnOcrConfig), random bfloat16 weights",
        "reference": {"vllm_h100_pages_per_s": VLLM_REFERENCE_PAGES_PER_S, "source": "LightOnOCR-1B model card"},
        "errors": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    def section(name: str, fn: Any) -> None:
        if name not in sections:
            return
        started = time.perf_counter()
        try:
            result[name] = fn()
        except Exception:  # keep the other sections' numbers; say what broke
            result["errors"].append({"section": name, "traceback": traceback.format_exc()})
            print(traceback.format_exc(), flush=True)
        print(f"[{name}: {time.perf_counter() - started:.0f} s]", flush=True)
        save()

    images = noise_pages()
    if args.sync_debug:
        report_host_syncs()
    section("ceilings", ceilings)
    section("attention", attention_microbench)
    started = time.perf_counter()
    path = build_full_size_lightonocr(workdir / "lightonocr-1b-random")
    gc.collect()
    torch.cuda.empty_cache()
    print(f"built and saved the random model in {time.perf_counter() - started:.0f} s", flush=True)
    lengths = ints(args.new_tokens)

    from ocrbooth.models.ocr.lightonocr import EngineConfig, LightOnOcrEngine, RepetitionGuard
    from ocrbooth.models.ocr.lightonocr.tuning import describe

    engine = LightOnOcrEngine(
        str(path),
        repetition=RepetitionGuard(enabled=False),
        eos_token_ids=(),
        config=EngineConfig(
            max_new_tokens=4096,
            preprocess_threads=8,
            prefill_overlap=args.prefill_overlap,
            fused_norms=args.fused_norms == "on",
            compile_layers=args.compile_layers == "on",
            kv_cache_dtype=args.kv_cache_dtype,
            max_slots=args.max_slots,
        ),
    )
    started = time.perf_counter()
    engine.load()
    load_s = time.perf_counter() - started
    cap = engine.capacity
    assert cap is not None
    result["engine"] = {
        "kv_blocks": cap.num_blocks,
        "block_size": cap.block_size,
        "kv_tokens": cap.kv_tokens,
        "kv_gib": cap.kv_cache_bytes / 2**30,
        "max_slots": cap.max_slots,
        "prefill_activation_gib": cap.activation_bytes / 2**30,
        "settings": {k: getattr(engine.config, k) for k in engine.config.__dataclass_fields__},
        "load_seconds": load_s,  # compile_layers: the compiles run inside it
        "compiled_layers": None
        if engine.compiled is None
        else {"layers": engine.compiled.layers, "failed": engine.compiled.failed},
        "memory_allocated_gib": torch.cuda.memory_allocated() / 2**30,
        "tuning": {
            "decode_kernel": str(engine.runner.tuning.decode_kernel),
            "vision_attention": describe(engine.runner.tuning.vision),
            "prefill_attention": describe(engine.runner.tuning.prefill),
            "vision_backends": [b.name for b in engine.runner.tuning.vision.backends or ()],
            "prefill_backends": [b.name for b in engine.runner.tuning.prefill.backends or ()],
            "varlen_kernel": repr(engine.runner.varlen_kernel) if engine.runner.varlen_kernel is not None else None,
            "measured": engine.runner.tuning.measured,
        },
    }
    print(f"engine: {result['engine']}", flush=True)
    save()
    model = model_costs(engine)
    result["model_costs"] = model
    ceil = result.get("ceilings") or ceilings()
    section("profile", lambda: profile(engine, images["portrait"], args.trace_dir))
    section(
        "stream",
        lambda: stream(engine, images, args.stream_pages, args.outstanding, model, ceil, args.stream_deadline_s),
    )
    section("fixed", lambda: fixed_lengths(engine, images["portrait"], lengths, ints(args.batches), model, ceil))

    def overlap() -> dict[str, Any]:
        """The same fixed-length runs with prefill sharing the GPU each way (one engine, switched while idle)."""
        out: dict[str, Any] = {}
        result["overlap"] = out  # saved after each mode: a run cut short keeps the modes it finished
        config = engine.config
        try:
            for mode in args.overlap_modes.split(","):
                spec, _, launch = mode.partition("/")  # "/thread" or "/inline": where prefill is launched from
                name, _, sms = spec.partition(":")  # "green:64": prefill on a stream limited to 64 SMs
                engine.runner.set_prefill_overlap(name, int(sms or 0))
                thread = {"thread": True, "inline": False}.get(launch, config.prefill_thread)
                engine.config = dataclasses.replace(config, prefill_thread=thread)
                runs = fixed_lengths(engine, images["portrait"], lengths[:1], ints(args.batches), model, ceil)
                sms_used = engine.runner.prefill_sms
                out[mode] = [{**run, "prefill_sms": sms_used, "prefill_thread": thread} for run in runs]
                save()
        finally:
            engine.config = config
            engine.runner.set_prefill_overlap(args.prefill_overlap)
        return out

    section("overlap", overlap)
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    runner = engine.runner
    runner._graphs.clear()  # the old engine needs the memory back
    runner.cache = runner.state = None
    engine._runner = None
    engine = runner = None
    gc.collect()
    torch.cuda.empty_cache()
    section("wave", lambda: wave_engine(path, images["portrait"], lengths, ints(args.wave_batches)))
    save()
    print(f"wrote {args.out}", flush=True)
    summary(result)


def report_host_syncs() -> None:
    """Torch's sync debug mode on: the first time each place makes the host wait for the GPU (a pageable copy,
    `.item()`, `nonzero`, ...), print the warning with the Python stack that led there."""
    import warnings

    import torch

    seen: set[tuple[str, int]] = set()

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if (filename, lineno) in seen:
            return
        seen.add((filename, lineno))
        stack = "".join(traceback.format_stack(limit=8)[:-1])
        print(f"HOST SYNC {filename}:{lineno}: {message}\n{stack}", flush=True)

    warnings.showwarning = show
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")


def timed_cuda(fn: Any, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of `fn` by CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def ceilings() -> dict[str, float]:
    import torch

    size = 4 << 30
    src = torch.randint(0, 255, (size,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = timed_cuda(lambda: dst.copy_(src), repeats=10)
    src = dst = torch.empty(0)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_s = timed_cuda(lambda: a @ b, repeats=10)
    a = b = torch.empty(0)
    torch.cuda.empty_cache()
    out = {"copy_bandwidth_gb_s": 2 * size / copy_s / 1e9, "bf16_matmul_tflop_s": 2 * 8192**3 / mm_s / 1e12}
    print(f"ceilings: {out}", flush=True)
    return out


def attention_microbench() -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from ocrbooth.models.ocr.lightonocr.attention import paged_decode_triton
    from ocrbooth.models.ocr.lightonocr.tuning import DECODE_CANDIDATES

    rows = []
    heads, kv_heads, dim, block = 16, 8, 128, 64
    for slots, length in [(32, 2810), (128, 2810), (256, 2810), (128, 4800)]:
        width = -(-length // block)
        blocks = slots * width + 1
        k = torch.randn(blocks * block, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        table = (torch.randperm(blocks - 1, device="cuda")[: slots * width] + 1).reshape(slots, width).int()
        lengths = torch.full((slots,), length, device="cuda", dtype=torch.int32)
        q = torch.randn(slots, heads, dim, device="cuda", dtype=torch.bfloat16)
        kv_bytes = 2 * slots * length * kv_heads * dim * 2
        row: dict[str, Any] = {"slots": slots, "positions": length, "kv_bytes": kv_bytes}
        for kernel in DECODE_CANDIDATES:
            call = (q, k, v, table, lengths, block, dim**-0.5)
            seconds = timed_cuda(lambda c=call, kn=kernel: paged_decode_triton(*c, kernel=kn))
            row[f"triton_tile{kernel.tile}_w{kernel.warps}_s{kernel.stages}_gb_s"] = kv_bytes / seconds / 1e9
        k = v = torch.empty(0)
        dense_k = torch.randn(slots, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16)
        dense_v = torch.randn_like(dense_k)
        grouped = q.reshape(slots, kv_heads, heads // kv_heads, dim)
        mask = torch.ones(slots, 1, 1, length, dtype=torch.bool, device="cuda")
        args = (grouped, dense_k, dense_v)
        seconds = timed_cuda(lambda a=args, m=mask: F.scaled_dot_product_attention(*a, attn_mask=m))
        row["sdpa_masked_dense_gb_s"] = kv_bytes / seconds / 1e9
        q4 = q[:, :, None]  # [slots, heads, 1, dim] against K/V expanded per query head is what flash needs
        ek = dense_k.repeat_interleave(2, dim=1)
        ev = dense_v.repeat_interleave(2, dim=1)
        args = (q4, ek, ev)
        seconds = timed_cuda(lambda a=args: F.scaled_dot_product_attention(*a))
        row["sdpa_flash_dense_repeated_gb_s"] = 2 * kv_bytes / seconds / 1e9
        dense_k = dense_v = ek = ev = torch.empty(0)
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"attention: {row}", flush=True)
    return rows


def model_costs(engine: Any) -> dict[str, Any]:
    """Parameter counts and per-token sizes for the floor."""
    net = engine.network
    text = net.config.text_config
    vision = net.model.vision_encoder
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    decoder = count(net.model.language_model) - net.model.language_model.embed_tokens.weight.numel()
    return {
        "decoder_params": decoder,
        "lm_head_params": net.lm_head.weight.numel(),
        "vision_params": count(vision),
        "projector_params": count(net.model.vision_projection),
        "vision_layers": vision.config.num_hidden_layers,
        "vision_hidden": vision.config.hidden_size,
        "decoder_layers": text.num_hidden_layers,
        "attention_width": text.num_attention_heads * text.head_dim,
        # the cache's own element size: 2 in bfloat16, 1 with kv_cache_dtype fp8_e4m3 (the floor counts the bytes
        # this engine must read, so an FP8 cache raises its floor too)
        "kv_bytes_per_token": text.num_hidden_layers
        * 2
        * text.num_key_value_heads
        * text.head_dim
        * engine.runner.kv_dtype.itemsize,
        "patch": vision.config.patch_size,
        "text_tokens": engine.builder.text_tokens,
        "kv_tokens": engine.capacity.kv_tokens,
        "max_slots": engine.capacity.max_slots,
    }


def floor(pages: list[tuple[int, int, int]], model: dict[str, Any], ceil: dict[str, float]) -> dict[str, Any]:
    """pages: (prompt tokens P, new tokens N, vision patches). Bytes at copy bandwidth + FLOPs at matmul rate."""
    bw = ceil["copy_bandwidth_gb_s"] * 1e9
    rate = ceil["bf16_matmul_tflop_s"] * 1e12
    kv = model["kv_bytes_per_token"] * sum(n * p + n * (n - 1) / 2 for p, n, _ in pages)
    tokens = sum(n for _, n, _ in pages)
    mean_reserve = sum(p + n for p, n, _ in pages) / len(pages)
    concurrency = max(1.0, min(model["max_slots"], model["kv_tokens"] / mean_reserve, len(pages)))
    weight_bytes = 2 * (model["decoder_params"] + model["lm_head_params"]) * tokens / concurrency
    vision = sum(
        2 * model["vision_params"] * v + 4 * v * v * model["vision_hidden"] * model["vision_layers"]
        for _, _, v in pages
    )
    prefill = sum(
        2 * model["decoder_params"] * p + 2 * p * p * model["attention_width"] * model["decoder_layers"]
        for p, _, _ in pages
    )
    decode_flops = 2 * (model["decoder_params"] + model["lm_head_params"]) * tokens
    seconds = (kv + weight_bytes) / bw + (vision + prefill) / rate
    return {
        "kv_read_s": kv / bw,
        "weight_read_s": weight_bytes / bw,
        "vision_s": vision / rate,
        "prefill_s": prefill / rate,
        "decode_matmul_s_not_in_floor": decode_flops / rate,
        "concurrency": concurrency,
        "seconds": seconds,
        "pages_per_s": len(pages) / seconds,
    }


def page_shape(engine: Any, image: Any) -> tuple[int, int]:
    from ocrbooth.models.ocr.engine import PageInput

    image_tokens = engine.image_token_count(image)
    prompt = engine.prompt_length(PageInput(image))
    return prompt, image_tokens * 4  # patches before the 2x2 merge


def wave_engine(path: Path, image: Any, lengths: list[int], batches: list[int]) -> list[dict[str, Any]]:
    """The old engine (waves, per-page prefill) on the same pages."""
    import torch

    from bench.wave_engine import LightOnOcrEngine as WaveEngine
    from bench.wave_engine import RepetitionGuard as WaveGuard
    from ocrbooth.models.ocr.engine import PageInput

    engine = WaveEngine(str(path), repetition=WaveGuard(enabled=False), eos_token_ids=())
    engine.load()
    engine.recognize([PageInput(image, max_new_tokens=16)] * 2, span_threshold=0.5)
    rows = []
    for n in lengths:
        for batch in batches:
            pages = [PageInput(image, max_new_tokens=n) for _ in range(batch)]
            engine.recognize(pages[:2], span_threshold=0.5)  # state and graphs for this size
            engine.release()
            torch.cuda.synchronize()
            started = time.perf_counter()
            outs = engine.recognize(pages, span_threshold=0.5)
            seconds = time.perf_counter() - started
            assert all(o.token_count == n for o in outs)
            rows.append({"new_tokens": n, "batch": batch, "seconds": seconds, "pages_per_s": batch / seconds})
            print(f"wave engine N={n} B={batch}: {batch / seconds:.2f} pages/s", flush=True)
    engine.release()
    del engine
    return rows


class StepLog:
    def __init__(self) -> None:
        self.rows: list[tuple[float, int, int, int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, stats: Any) -> None:
        with self.lock:
            self.rows.append((stats.seconds, stats.pages, stats.admitted, stats.finished, stats.tokens))

    def summary(self) -> dict[str, Any]:
        rows = self.rows
        if not rows:
            return {}
        decode = [r for r in rows if r[4] and not r[2]]
        admit = [r for r in rows if r[2]]
        idle = [r for r in rows if not r[4]]
        return {
            "steps": len(rows),
            "seconds_total": sum(r[0] for r in rows),
            "decode_steps_per_chunk": max(r[4] for r in rows),
            "chunks_without_admission": len(decode),
            "chunk_s_without_admission_mean": sum(r[0] for r in decode) / max(1, len(decode)),
            "chunks_with_admission": len(admit),
            "chunk_s_with_admission_mean": sum(r[0] for r in admit) / max(1, len(admit)),
            "pages_admitted_per_admission": sum(r[2] for r in admit) / max(1, len(admit)),
            "steps_without_decoding": len(idle),
            "seconds_without_decoding": sum(r[0] for r in idle),
            "mean_pages_decoding": sum(r[1] for r in rows if r[4]) / max(1, len(rows) - len(idle)),
        }


class HostProbe:
    """Host seconds the engine's threads spend inside the runner's calls, and the caching allocator's
    flush-and-retry count (each a `cudaFree`, which waits for the whole device) over one run: a launch that
    returns only after its GPU work is done makes prefill and decoding run one after the other."""

    CALLS = ("launch_prefill", "launch_chunk", "collect", "activate")

    def __init__(self, runner: Any, cuda: bool) -> None:
        import torch

        self.runner, self.cuda = runner, cuda
        self.seconds = dict.fromkeys(self.CALLS, 0.0)
        self.calls = dict.fromkeys(self.CALLS, 0)
        self.longest = dict.fromkeys(self.CALLS, 0.0)
        self.retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0
        for name in self.CALLS:
            setattr(runner, name, self._timed(name, getattr(runner, name)))

    def _timed(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - started
                self.seconds[name] += took
                self.calls[name] += 1
                self.longest[name] = max(self.longest[name], took)

        return timed

    def remove(self) -> None:
        for name in self.CALLS:
            self.runner.__dict__.pop(name, None)

    def summary(self) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {
            name: {"seconds": self.seconds[name], "calls": self.calls[name], "longest_s": self.longest[name]}
            for name in self.CALLS
        }
        if self.cuda:
            out["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0) - self.retries
        return out


def run_pages(
    engine: Any,
    pages: list[Any],
    outstanding: int,
    log: StepLog,
    deadline_s: float = 1800,
    *,
    keep_times: bool = False,
) -> dict[str, Any]:
    """Submit pages keeping at most `outstanding` unfinished; per-page latency and completion times. Past
    `deadline_s` the figures cover the pages finished by then (`completed`). `keep_times`: also return every
    completion time (seconds from the first submission, sorted) as `completion_s`. Runs on CPU engines too
    (no memory figures there)."""
    import torch

    cuda = torch.cuda.is_available() and engine.device.type == "cuda"

    core = engine.worker(span_threshold=0.5, on_step=log)
    probe = HostProbe(engine.runner, cuda)
    core.start()
    done_at: list[float] = [0.0] * len(pages)
    latency: list[float] = [0.0] * len(pages)
    slots = threading.Semaphore(outstanding)
    finished = threading.Event()
    remaining = [len(pages)]
    lock = threading.Lock()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        for index, page in enumerate(pages):
            if not slots.acquire(timeout=max(0.0, deadline_s - (time.perf_counter() - started))):
                break
            submitted = time.perf_counter()

            def resolve(future: Any, index: int = index, submitted: float = submitted) -> None:
                now = time.perf_counter()
                done_at[index] = now - started
                latency[index] = now - submitted
                slots.release()
                with lock:
                    remaining[0] -= 1
                    if not remaining[0]:
                        finished.set()

            core.submit_generation(page).add_done_callback(resolve)
        finished.wait(timeout=max(0.0, deadline_s - (time.perf_counter() - started)))
    finally:
        core.stop(timeout_s=1 if remaining[0] else 30)
        probe.remove()
    wall = time.perf_counter() - started
    completed = [i for i, t in enumerate(done_at) if t > 0]
    order = sorted(done_at[i] for i in completed)
    finished_latency = [latency[i] for i in completed]  # callbacks still running may write `latency`
    if len(completed) < len(pages):
        wall = order[-1]
    lo, hi = order[len(order) // 10], order[len(order) * 9 // 10]
    steady = (len(order) * 9 // 10 - len(order) // 10) / max(hi - lo, 1e-9)
    lat = sorted(finished_latency)
    out: dict[str, Any] = {
        "pages": len(pages),
        "completed": len(completed),
        "seconds": wall,
        "pages_per_s": len(completed) / wall,
        "steady_pages_per_s": steady,
        "latency_p50_s": lat[len(lat) // 2],
        "latency_p95_s": lat[int(len(lat) * 0.95)],
    }
    if cuda:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["reserved_memory_gib"] = torch.cuda.memory_reserved() / 2**30
    out["steps"] = log.summary()
    out["host"] = probe.summary()
    if keep_times:
        out["completion_s"] = order
    return out


def fixed_lengths(
    engine: Any, image: Any, lengths: list[int], batches: list[int], model: dict[str, Any], ceil: dict[str, float]
) -> list[dict[str, Any]]:
    from ocrbooth.models.ocr.engine import PageInput

    prompt, patches = page_shape(engine, image)
    engine.generate([PageInput(image, max_new_tokens=16)] * 4)  # warm-up: threads, allocator, clocks
    rows = []
    for n in lengths:
        for batch in batches:
            pages = [PageInput(image, max_new_tokens=n) for _ in range(batch)]
            out = run_pages(engine, pages, batch, StepLog())
            out["floor"] = floor([(prompt, n, patches)] * batch, model, ceil)
            out |= {
                "new_tokens": n,
                "batch": batch,
                "fraction_of_floor": out["pages_per_s"] / out["floor"]["pages_per_s"],
            }
            rows.append(out)
            print(
                f"engine N={n} B={batch}: {out['pages_per_s']:.2f} pages/s, floor {out['floor']['pages_per_s']:.2f} "
                f"({out['fraction_of_floor']:.0%}); steps {out['steps']}; host {out['host']}",
                flush=True,
            )
    return rows


def stream(
    engine: Any,
    images: dict[str, Any],
    count: int,
    outstanding: int,
    model: dict[str, Any],
    ceil: dict[str, float],
    deadline_s: float,
) -> dict[str, Any]:
    import numpy as np

    from ocrbooth.models.ocr.engine import PageInput
    from ocrbooth.testing.ocr_workload import SIZES, STREAM_SEED, stream_workload

    workload = stream_workload(count)
    kinds = np.array([p.kind for p in workload])
    lengths = [p.max_new_tokens for p in workload]
    which = [p.size for p in workload]
    names = list(images)
    pages = [PageInput(images[w], max_new_tokens=n) for w, n in zip(which, lengths, strict=True)]
    shapes = {name: page_shape(engine, images[name]) for name in names}
    out = run_pages(engine, pages, outstanding, StepLog(), deadline_s)
    out["floor"] = floor([(shapes[w][0], n, shapes[w][1]) for w, n in zip(which, lengths, strict=True)], model, ceil)
    out["fraction_of_floor"] = out["steady_pages_per_s"] / out["floor"]["pages_per_s"]
    out["distribution"] = {
        "seed": STREAM_SEED,
        "short_5_100": int((kinds == 0).sum()),
        "medium_300_900": int((kinds == 1).sum()),
        "long_1200_2500": int((kinds == 2).sum()),
        "mean_tokens": float(np.mean(lengths)),
        "page_sizes": {name: {"pixels": SIZES[name], "prompt_tokens": shapes[name][0]} for name in names},
        "outstanding": outstanding,
    }
    print(f"stream: {out}", flush=True)
    return out


def profile(engine: Any, image: Any, trace_dir: Path | None = None) -> dict[str, Any]:
    """Decode chunk time per step over synthetic slots at a given context, and prefill time per page alone."""
    import torch

    from bench.gpu_profile import profile_call
    from ocrbooth.models.ocr.engine import PageInput
    from ocrbooth.models.ocr.lightonocr.kv_cache import BlockAllocator
    from ocrbooth.models.ocr.lightonocr.runner import Prefill, PrefillItem

    runner = engine.runner
    prepared = engine.preprocess(PageInput(image, max_new_tokens=1))
    steps = engine.config.steps_per_sync
    out: dict[str, Any] = {"decode": [], "prefill": []}
    alloc = BlockAllocator(engine.capacity.num_blocks)
    for rows in (32, 128, 256):
        budget = 1000
        items = []
        for slot in range(rows):
            blocks = alloc.allocate(-(-(prepared.prompt_length + budget) // engine.capacity.block_size))
            if blocks is None:
                break
            items.append(PrefillItem(slot, slot, tuple(blocks), budget, prepared))
        runner.activate(Prefill(items, None), runner.chunk)
        for _ in range(3):  # advance into the page and warm up
            runner.launch_chunk(len(items), steps)
            runner.collect()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(8):
            runner.launch_chunk(len(items), steps)
        end.record()
        end.synchronize()
        while runner.chunks_in_flight:
            runner.collect()
        ms = start.elapsed_time(end) / (8 * steps)
        if rows == 256:  # the kernels of a decode step at the most slots (graph replays show their kernels)

            def chunk(n: int = len(items)) -> None:
                runner.launch_chunk(n, steps)
                torch.cuda.synchronize()
                while runner.chunks_in_flight:
                    runner.collect()

            label = f"decode, {len(items)} slots, per step"
            trace = trace_dir / "decode_chunk.json" if trace_dir else None
            out["decode_kernels"] = profile_call(chunk, label, steps, torch.cuda.synchronize, trace)
        context = prepared.prompt_length + 4 * steps
        kv = len(items) * context * engine.network.config.text_config.num_hidden_layers * 2 * 8 * 128
        kv *= runner.kv_dtype.itemsize
        out["decode"].append({"slots": len(items), "context": context, "ms_per_step": ms, "kv_gb_s": kv / ms / 1e6})
        print(f"profile decode: {out['decode'][-1]}", flush=True)
        for item in items:  # finish them: a budget of 0 ends each slot at its next step
            alloc.release(list(item.blocks))
        runner.state.done.fill_(True)
        runner._slot_request.clear()
        runner._active_from.clear()
    for batch in (1, 4, 7):
        items = [PrefillItem(i, i, tuple(range(1, 40)), 1, prepared) for i in range(batch)]
        for _ in range(2):
            runner.launch_prefill(items[:1]).event.synchronize()
        start_t = time.perf_counter()
        for _ in range(3):
            runner.launch_prefill(items).event.synchronize()
        seconds = (time.perf_counter() - start_t) / 3
        out["prefill"].append({"pages": batch, "seconds": seconds, "ms_per_page": seconds / batch * 1e3})
        print(f"profile prefill: {out['prefill'][-1]}", flush=True)
    pages4 = [prepared] * 4
    with torch.inference_mode():
        vision_s = timed_cuda(lambda: runner.encode_images(pages4), repeats=3, warmup=1)
    out["vision_ms_per_page"] = vision_s / 4 * 1e3  # the encoder alone, batches of 4 pages, tuned backend
    print(f"profile vision alone: {out['vision_ms_per_page']:.1f} ms/page", flush=True)
    # Where an admission's time goes: kernels of a 4-page prefill (vision + decoder) and the host's ops.
    items4 = [PrefillItem(i, i, tuple(range(1, 40)), 1, prepared) for i in range(4)]
    out["prefill_kernels"] = profile_call(
        lambda: runner.launch_prefill(items4),
        "prefill of 4 pages, per page",
        4,
        torch.cuda.synchronize,
        trace_dir / "prefill_4_pages.json" if trace_dir else None,
    )
    print(f"profile prefill kernels: {out['prefill_kernels']['gpu_kernel_ms_per_step']} ms/page", flush=True)
    return out


def summary(result: dict[str, Any]) -> None:
    print("\n| case | pages/s | floor | fraction |")
    for row in result.get("wave", []):
        print(f"| wave engine {row['batch']} x {row['new_tokens']} | {row['pages_per_s']:.2f} | | |")
    for row in result.get("fixed", []):
        f = row["floor"]["pages_per_s"]
        print(
            f"| engine {row['batch']} x {row['new_tokens']} | {row['pages_per_s']:.2f} | {f:.2f} | "
            f"{row['fraction_of_floor']:.0%} |"
        )
    s = result.get("stream")
    if s:
        print(
            f"| stream {s['pages']} pages | {s['steady_pages_per_s']:.2f} (p50 {s['latency_p50_s']:.1f} s, p95 "
            f"{s['latency_p95_s']:.1f} s) | {s['floor']['pages_per_s']:.2f} | {s['fraction_of_floor']:.0%} |"
        )


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), dpi=110)
    colors = {500: "tab:blue", 1000: "tab:orange"}
    for n in sorted({r["new_tokens"] for r in result.get("fixed", [])}):
        rows = sorted((r for r in result["fixed"] if r["new_tokens"] == n), key=lambda r: r["batch"])
        left.plot(
            [r["batch"] for r in rows],
            [r["pages_per_s"] for r in rows],
            "o-",
            color=colors.get(n),
            label=f"engine core, {n} tokens",
        )
        left.plot(
            [r["batch"] for r in rows],
            [r["floor"]["pages_per_s"] for r in rows],
            ":",
            color=colors.get(n),
            label=f"floor, {n} tokens",
        )
        waves = sorted((r for r in result.get("wave", []) if r["new_tokens"] == n), key=lambda r: r["batch"])
        if waves:
            left.plot(
                [r["batch"] for r in waves],
                [r["pages_per_s"] for r in waves],
                "s--",
                color=colors.get(n),
                alpha=0.6,
                label=f"wave engine (before), {n} tokens",
            )
    if result.get("fixed") or not (result.get("profile") or _host_runs(result.get("overlap") or {})):
        left.axhline(
            result["reference"]["vllm_h100_pages_per_s"], color="grey", linestyle="-.", label="vLLM, H100 (model card)"
        )
        left.set_xscale("log", base=2)
        left.set_xlabel("pages submitted together")
        left.set_ylabel("pages/s")
        left.set_title("fixed output length, 1176x1540 pages")
        left.grid(True, alpha=0.3)
        left.legend(fontsize=7)
    elif result.get("profile"):  # no fixed-length runs: the profile on the left
        _plot_profile(left, result["profile"])
    else:  # overlap runs only: where each run's time went on the host
        _plot_host(left, result["overlap"])
    s = result.get("stream")
    if s:
        names = ["measured (steady)", "floor"]
        right.bar(names, [s["steady_pages_per_s"], s["floor"]["pages_per_s"]], color=["tab:green", "lightgrey"])
        f = s["floor"]
        parts = {k: f[k] for k in ("kv_read_s", "weight_read_s", "vision_s", "prefill_s")}
        right.set_title(
            f"stream of {s['pages']} pages: {s['fraction_of_floor']:.0%} of floor\n"
            + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in parts.items()),
            fontsize=9,
        )
        right.set_ylabel("pages/s")
    elif result.get("overlap"):
        _plot_overlap(right, result["overlap"])
    elif result.get("profile") and result.get("fixed"):
        _plot_profile(right, result["profile"])
    else:
        _plot_engine(right, result.get("engine") or {}, result.get("errors") or [])
    fig.suptitle(f"LightOnOCR-1B architecture on {result['card']}")
    fig.tight_layout()
    fig.savefig(png)
    print(f"wrote {png}")


def _host_runs(overlap: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(mode, run) for mode, rows in overlap.items() for run in rows if run.get("host")]


def _plot_host(ax: Any, overlap: dict[str, list[dict[str, Any]]]) -> None:
    """Per overlap run: its wall time beside the seconds the engine's threads spent in each runner call."""
    runs = _host_runs(overlap)
    calls = [("launch_prefill", "tab:red"), ("launch_chunk", "tab:blue"), ("collect", "tab:grey")]
    width = 0.8 / (len(calls) + 1)
    for i, (_, run) in enumerate(runs):
        ax.bar(i, run["seconds"], width, color="black", label="wall" if i == 0 else None)
        for j, (call, color) in enumerate(calls, start=1):
            ax.bar(i + j * width, run["host"][call]["seconds"], width, color=color, label=call if i == 0 else None)
    ax.set_xticks([i + width * len(calls) / 2 for i in range(len(runs))])
    ax.set_xticklabels([f"{mode}\n{run['pages_per_s']:.2f} pages/s" for mode, run in runs], fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title("host seconds inside the runner's calls, per run (section overlap)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)


def _plot_overlap(ax: Any, overlap: dict[str, list[dict[str, Any]]]) -> None:
    """Section `overlap` without a stream run: pages/s and floor per prefill mode."""
    runs = [(mode, run) for mode, rows in overlap.items() for run in rows]
    names = [f"{mode}\n{run['batch']} x {run['new_tokens']}" for mode, run in runs]
    ax.bar(names, [run["pages_per_s"] for _, run in runs], color="tab:green", label="measured")
    ax.plot(names, [run["floor"]["pages_per_s"] for _, run in runs], "_", color="black", markersize=30, label="floor")
    for i, (_, run) in enumerate(runs):
        st = run["steps"]
        ax.annotate(
            f"{run['fraction_of_floor']:.0%}\nchunk {st['chunk_s_without_admission_mean']:.2f} s,\n"
            f"{st['chunk_s_with_admission_mean']:.2f} s with prefill",
            (i, run["pages_per_s"]),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_ylabel("pages/s")
    ax.set_title("prefill beside decoding, one engine (section overlap)", fontsize=9)
    ax.legend(fontsize=7)


def _plot_profile(ax: Any, profile: dict[str, Any]) -> None:
    """Section `profile` alone: a decode step's ms per slot count, a prefill's ms per page per batch."""
    decode, prefill = profile.get("decode") or [], profile.get("prefill") or []
    names = [f"decode step\n{r['slots']} slots" for r in decode] + [f"prefill\n{r['pages']} pages" for r in prefill]
    values = [r["ms_per_step"] for r in decode] + [r["ms_per_page"] for r in prefill]
    ax.bar(names, values, color=["tab:blue"] * len(decode) + ["tab:orange"] * len(prefill))
    ax.set_ylabel("ms (decode: a step; prefill: a page)")
    ax.set_title("where the time goes (section profile)", fontsize=9)


def _plot_engine(ax: Any, engine: dict[str, Any], errors: list[Any]) -> None:
    """No measured section: what the engine loaded with, in words."""
    lines = [
        f"engine loaded in {engine.get('load_seconds', 0):.0f} s",
        f"KV cache: {engine.get('kv_tokens', 0):,} positions in {engine.get('kv_gib', 0):.1f} GiB",
        f"settings: {engine.get('settings', {})}",
        f"decode kernel: {engine.get('tuning', {}).get('decode_kernel')}",
        f"sections with errors: {[e.get('section') for e in errors]}",
        "no throughput section finished in this run",
    ]
    ax.axis("off")
    ax.text(0, 1, "\n".join(textwrap.fill(line, 70) for line in lines), va="top", fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
