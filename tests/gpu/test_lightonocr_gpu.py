"""LightOnOcrEngine on CUDA with the tiny model: continuous batching against single pages (float32 and
bfloat16), the Triton decode kernel against the reference, CUDA graphs against eager, memory sizing."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from ocrbooth.models.ocr.engine import PageInput  # noqa: E402
from ocrbooth.models.ocr.lightonocr import EngineConfig, LightOnOcrEngine, PageGeneration, RepetitionGuard  # noqa: E402
from ocrbooth.models.ocr.lightonocr.attention import (  # noqa: E402
    DecodeKernel,
    paged_decode_reference,
    paged_decode_triton,
)
from ocrbooth.models.ocr.lightonocr.launch_pacing import LaunchPacer  # noqa: E402
from ocrbooth.models.ocr.lightonocr.tuning import DECODE_CANDIDATES  # noqa: E402
from ocrbooth.testing.tiny_lightonocr import build_tiny_lightonocr  # noqa: E402

pytestmark = pytest.mark.gpu
SMALL_KV = EngineConfig(kv_cache_tokens=65_536, max_new_tokens=1024)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LightOnOCR saved to disk."""
    return build_tiny_lightonocr(tmp_path_factory.mktemp("lightonocr-gpu") / "tiny", seed=0)


def load(path: Path, **options: object) -> LightOnOcrEngine:
    options.setdefault("config", SMALL_KV)
    engine = LightOnOcrEngine(str(path), device="cuda", **options)  # type: ignore[arg-type]
    engine.load()
    return engine


def pages() -> list[PageInput]:
    """Ragged: different image-token counts and budgets."""
    sizes = [(100, 60, 40), (60, 100, 64), (300, 280, 50), (30, 50, 33), (112, 40, 24), (70, 70, 48)]
    out = []
    for i, (w, h, m) in enumerate(sizes):
        pixels = torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        out.append(PageInput(Image.fromarray(pixels.numpy()), max_new_tokens=m))
    return out


def first_difference(a: list[PageGeneration], b: list[PageGeneration]) -> str:
    for page, (x, y) in enumerate(zip(a, b, strict=True)):
        for i, (s, t) in enumerate(zip(x.token_ids, y.token_ids, strict=False)):
            if s != t:
                return f"page {page} token {i}: {s} (p={x.token_probs[i]:.4f}) vs {t} (p={y.token_probs[i]:.4f})"
        if len(x.token_ids) != len(y.token_ids):
            return f"page {page}: {len(x.token_ids)} vs {len(y.token_ids)} tokens"
    return "none"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_continuous_batch_matches_single_pages(tiny_dir: Path, dtype: str) -> None:
    """Pages decoded together, and through 2 slots (so later pages join mid-decode), yield exactly the ids
    each yields alone on the same engine; in float32 the probabilities agree within 1e-4. Each engine is
    compared with itself: two engines may tune different decode kernels at load, whose bfloat16 roundings
    differ (an H100 run, 2026-12-08, flipped a near tie, p 0.1547 against 0.1544, comparing across them)."""
    batch = pages()
    wide = load(tiny_dir, dtype=dtype)
    narrow = load(tiny_dir, dtype=dtype, config=EngineConfig(kv_cache_tokens=65_536, max_new_tokens=1024, max_slots=2))
    for engine in (wide, narrow):
        alone = [engine.generate([page])[0] for page in batch]
        result = engine.generate(batch)
        assert [g.token_ids for g in result] == [g.token_ids for g in alone], first_difference(result, alone)
        if dtype == "float32":
            for g, a in zip(result, alone, strict=True):
                assert g.token_probs == pytest.approx(a.token_probs, abs=1e-4)


@pytest.mark.parametrize("mode", ["priority", "serial", "green"])
def test_prefill_overlap_modes_give_the_same_tokens(tiny_dir: Path, mode: str) -> None:
    """Prefill on a prioritised pair of streams, between decode chunks or on a stream limited to part of the
    SMs (a green context) changes when work runs, never what a page gets: through 2 slots (pages join
    mid-decode) the ids and probabilities equal the default mode's on the same engine (another engine may tune
    other kernels, whose bfloat16 roundings differ)."""
    engine = load(tiny_dir, config=EngineConfig(kv_cache_tokens=65_536, max_new_tokens=1024, max_slots=2))
    batch = pages()
    expected = engine.generate(batch)
    engine.runner.set_prefill_overlap(mode)
    got = engine.generate(batch)
    assert [g.token_ids for g in got] == [g.token_ids for g in expected], first_difference(got, expected)
    for g, e in zip(got, expected, strict=True):
        assert g.token_probs == pytest.approx(e.token_probs, abs=1e-3)


def _fits(kernel: DecodeKernel, dtype: torch.dtype, dim: int = 128) -> bool:
    """K and V tiles of every stage in shared memory (float32 tiles of the deepest configurations do not fit;
    the engine's tuning skips what fails to compile, and runs bfloat16 on CUDA by default)."""
    stages = kernel.stages if kernel.pipelined else 1
    return kernel.tile * dim * dtype.itemsize * 2 * stages <= 160 * 1024


@pytest.mark.parametrize(
    ("dtype", "kernel"),
    [(d, k) for d in (torch.float32, torch.bfloat16) for k in DECODE_CANDIDATES if _fits(k, d)],
    ids=str,
)
def test_triton_decode_kernel_matches_reference(dtype: torch.dtype, kernel: DecodeKernel) -> None:
    """Every launch configuration the engine may choose: the split-K paged kernel equals gather + SDPA for
    idle slots, short slots and slots over several splits (lengths off tile boundaries), with shuffled blocks."""
    torch.manual_seed(0)
    slots, heads, kv_heads, dim, block, width = 7, 16, 8, 128, 64, 40
    blocks = slots * width + 1
    k = torch.randn(blocks * block, kv_heads, dim, device="cuda", dtype=dtype)
    v = torch.randn(blocks * block, kv_heads, dim, device="cuda", dtype=dtype)
    table = (torch.randperm(blocks - 1, device="cuda")[: slots * width] + 1).reshape(slots, width).int()
    lengths = torch.tensor([0, 1, 63, 512, 545, 1500, width * block], device="cuda", dtype=torch.int32)
    q = torch.randn(slots, heads, dim, device="cuda", dtype=dtype)
    want = paged_decode_reference(q.float(), k.float(), v.float(), table, lengths, block, dim**-0.5, width * block)
    got = paged_decode_triton(q, k, v, table, lengths, block, dim**-0.5, kernel=kernel).float()
    assert torch.isfinite(got).all()
    error = (got - want).norm() / want.norm()
    assert error < (1e-5 if dtype == torch.float32 else 1e-2), float(error)


@pytest.mark.parametrize("kernel", [k for k in DECODE_CANDIDATES if _fits(k, torch.bfloat16)], ids=str)
def test_triton_decode_kernel_reads_an_fp8_cache_like_the_reference(kernel: DecodeKernel) -> None:
    """With FP8 caches (kv_cache_dtype fp8_e4m3) every launch configuration widens K/V to the query's bfloat16 as
    it reads them and matches the reference over the same FP8 values."""
    torch.manual_seed(1)
    slots, heads, kv_heads, dim, block, width = 7, 16, 8, 128, 64, 40
    blocks = slots * width + 1
    k = torch.randn(blocks * block, kv_heads, dim, device="cuda").to(torch.float8_e4m3fn)
    v = torch.randn(blocks * block, kv_heads, dim, device="cuda").to(torch.float8_e4m3fn)
    table = (torch.randperm(blocks - 1, device="cuda")[: slots * width] + 1).reshape(slots, width).int()
    lengths = torch.tensor([0, 1, 63, 512, 545, 1500, width * block], device="cuda", dtype=torch.int32)
    q = torch.randn(slots, heads, dim, device="cuda", dtype=torch.bfloat16)
    want = paged_decode_reference(q.float(), k, v, table, lengths, block, dim**-0.5, width * block)
    got = paged_decode_triton(q, k, v, table, lengths, block, dim**-0.5, kernel=kernel).float()
    assert torch.isfinite(got).all()
    assert float((got - want).norm() / want.norm()) < 1e-2


def test_fp8_kv_cache_engine_batches_exactly(tiny_dir: Path) -> None:
    """An FP8 KV cache in CUDA graphs: pages together and through 2 slots get the ids each gets alone on the
    same engine (each engine compared with itself, as above)."""
    options = {"kv_cache_tokens": 65_536, "max_new_tokens": 1024, "kv_cache_dtype": "fp8_e4m3"}
    wide = load(tiny_dir, config=EngineConfig(**options))  # type: ignore[arg-type]
    narrow = load(tiny_dir, config=EngineConfig(**options, max_slots=2))  # type: ignore[arg-type]
    batch = pages()
    for engine in (wide, narrow):
        cache = engine.runner.cache
        assert cache is not None
        assert cache.keys[0].dtype == torch.float8_e4m3fn
        alone = [engine.generate([page])[0] for page in batch]
        result = engine.generate(batch)
        assert [g.token_ids for g in result] == [g.token_ids for g in alone], first_difference(result, alone)


def test_launch_pacer_keeps_at_most_depth_layers_queued() -> None:
    """The prefill thread's pacer: after `depth` calls every further call waits for the oldest queued one,
    so the host is never more than `depth` layers ahead of the GPU."""
    pacer = LaunchPacer(depth=2)
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(6):
        for _ in range(10):
            x = torch.tanh(x @ x)
        pacer()
    assert pacer.waits == 4
    assert len(pacer._queued) == 2
    torch.cuda.synchronize()


def test_cuda_graphs_and_triton_match_eager_reference(tiny_dir: Path) -> None:
    """Decoding through captured CUDA graphs with the Triton kernel gives the ids and (within 1e-4) the
    probabilities of eager decoding with the reference attention, in float32."""
    eager = load(tiny_dir, dtype="float32", use_cuda_graphs=False, decode_attention="reference").generate(pages())
    graphed = load(tiny_dir, dtype="float32")
    assert graphed.runner.config is not None
    assert graphed.runner.config.use_triton
    assert graphed.runner.tuning.measured["decode_kv_gb_s"], "the engine measured its decode kernel at load"
    for result in (graphed.generate(pages()), graphed.generate(pages())):
        assert [g.token_ids for g in result] == [g.token_ids for g in eager], first_difference(result, eager)
        for g, e in zip(result, eager, strict=True):
            assert g.token_probs == pytest.approx(e.token_probs, abs=1e-4)
            assert g.finish_reason == e.finish_reason


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_layers_in_cuda_graphs_match_single_pages_and_eager(tiny_dir: Path, dtype: str) -> None:
    """`compile_layers` on CUDA: Inductor's kernels inside the captured decode steps and in the batched prefill.
    Pages together and through 2 slots get the ids each gets alone on the compiled engine; in float32 those are
    the eager engine's ids with probabilities within 1e-4 (bfloat16: Inductor keeps float32 between fused
    operations where eager rounds, so only the compiled engine's own solo run is the reference)."""
    options = {"kv_cache_tokens": 65_536, "max_new_tokens": 1024, "compile_layers": True}
    engine = load(tiny_dir, dtype=dtype, config=EngineConfig(**options))  # type: ignore[arg-type]
    assert engine.compiled is not None
    batch = pages()
    alone = [engine.generate([page])[0] for page in batch]
    together = engine.generate(batch)
    narrow = load(tiny_dir, dtype=dtype, config=EngineConfig(**options, max_slots=2))  # type: ignore[arg-type]
    refilled = narrow.generate(batch)
    assert engine.compiled.active, engine.compiled.failed
    assert narrow.compiled is not None
    assert narrow.compiled.active, narrow.compiled.failed
    for result in (together, refilled):
        assert [g.token_ids for g in result] == [g.token_ids for g in alone], first_difference(result, alone)
    if dtype == "float32":
        eager = load(tiny_dir, dtype=dtype).generate(batch)
        assert [g.token_ids for g in together] == [g.token_ids for g in eager], first_difference(together, eager)
        for g, e in zip(together, eager, strict=True):
            assert g.token_probs == pytest.approx(e.token_probs, abs=1e-4)


def test_cuda_graphs_stop_a_loop(tmp_path: Path) -> None:
    """The on-device repetition guard also fires inside the captured step."""
    path = build_tiny_lightonocr(tmp_path / "loop", script={"\n": "a", "a": "b", "b": "c", "c": "a"})
    engine = load(path, repetition=RepetitionGuard(min_tokens=24))
    [out] = engine.recognize([PageInput(Image.new("RGB", (40, 40)), max_new_tokens=300)], span_threshold=0.5)
    assert (out.finish_reason, out.token_count, out.text) == ("repetition", 24, "abc" * 8)


def test_kv_cache_is_sized_from_free_memory(tiny_dir: Path) -> None:
    """Without a fixed size the KV cache takes what `gpu_memory_fraction` leaves, and a page over a slot's
    reserve fails with page_too_large instead of taking the engine down."""
    engine = load(tiny_dir, config=EngineConfig(gpu_memory_fraction=0.05, max_new_tokens=1024))
    cap = engine.capacity
    assert cap is not None
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0.01 * total < cap.kv_cache_bytes < 0.05 * total
    [ok, too_large] = engine.recognize(
        [
            PageInput(Image.new("RGB", (40, 40)), max_new_tokens=8),
            PageInput(Image.new("RGB", (40, 40)), max_new_tokens=5000),
        ],
        span_threshold=0.5,
    )
    assert ok.error_code is None
    assert ok.token_count == 8
    assert too_large.error_code == "page_too_large"


@pytest.mark.parametrize(
    ("segments", "heads", "kv_heads", "dim", "causal"),
    [
        ([9240, 4000, 777], 16, 16, 64, False),  # the vision encoder: a full page's patches and smaller images
        ([2329, 500, 33], 16, 8, 128, True),  # the decoder's prefill: grouped-query heads, causal prompts
    ],
    ids=["vision", "prefill"],
)
def test_flash_attn_4_varlen_matches_attention_per_segment(
    segments: list[int], heads: int, kv_heads: int, dim: int, *, causal: bool
) -> None:
    """The optional variable-length kernel (flash-attn-4), called as the engine calls it over a flat batch of
    segments, equals float32 attention within each segment (relative error under 1e-2 in bfloat16)."""
    from ocrbooth.models.ocr.lightonocr.varlen import cumulative_lengths
    from ocrbooth.models.ocr.lightonocr.varlen import load as load_varlen

    device = torch.device("cuda")
    kernel = load_varlen(device)
    if kernel is None:
        pytest.skip("flash-attn-4 is not installed or does not load on this card")
    torch.manual_seed(0)
    total = sum(segments)
    q = torch.randn(total, heads, dim, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(total, kv_heads, dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    cu = cumulative_lengths(segments, device)
    got = kernel(q, k, v, cu_seqlens=cu, max_seqlen=max(segments), causal=causal, scale=dim**-0.5).float()
    assert got.shape == q.shape
    start = 0
    for length in segments:
        qs, ks, vs = (t[start : start + length].float().transpose(0, 1)[None] for t in (q, k, v))
        ks, vs = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (ks, vs))
        want = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)[0].transpose(0, 1)
        part = got[start : start + length]
        assert torch.isfinite(part).all()
        error = float((part - want).norm() / want.norm())
        assert error < 1e-2, (length, error)
        start += length
