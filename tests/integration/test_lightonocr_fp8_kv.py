"""LightOnOcrEngine with an FP8 KV cache (`kv_cache_dtype="fp8_e4m3"`) on CPU (tiny random model): half the
bytes a position (a quarter of float32's), keys and values rounded to FP8 as written and saturated at its range,
and continuous batching still gives every page the tokens it gets alone."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from ocrbooth.errors import ConfigError  # noqa: E402
from ocrbooth.models.ocr.engine import PageInput  # noqa: E402
from ocrbooth.models.ocr.lightonocr import EngineConfig, LightOnOcrEngine  # noqa: E402
from ocrbooth.models.ocr.lightonocr.attention import (  # noqa: E402
    ForwardContext,
    PagedKVCache,
    forward_context,
    paged_decode_reference,
)
from ocrbooth.testing.tiny_lightonocr import build_tiny_lightonocr  # noqa: E402

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lightonocr(tmp_path_factory.mktemp("lightonocr-fp8") / "tiny", seed=4)


def pages() -> list[PageInput]:
    generator = torch.Generator().manual_seed(21)
    sizes = [(100, 60, 20), (60, 100, 26), (300, 280, 18), (30, 50, 14), (112, 40, 22)]
    out = []
    for w, h, budget in sizes:
        pixels = torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8)
        out.append(PageInput(Image.fromarray(pixels.numpy()), max_new_tokens=budget))
    return out


def test_fp8_cache_holds_the_positions_in_a_quarter_of_float32s_bytes_and_batches_exactly(tiny_dir: Path) -> None:
    """Same positions, a quarter of the bytes (CPU runs float32); pages decoded together and through 2 slots get
    the ids each gets alone on the FP8 engine; their probabilities stay near the float32 cache's."""
    options = {"kv_cache_tokens": 8192}
    plain = LightOnOcrEngine(str(tiny_dir), device="cpu", config=EngineConfig(**options))  # type: ignore[arg-type]
    plain.load()
    fp8 = LightOnOcrEngine(str(tiny_dir), device="cpu", config=EngineConfig(kv_cache_dtype="fp8_e4m3", **options))  # type: ignore[arg-type]
    fp8.load()
    narrow = LightOnOcrEngine(
        str(tiny_dir),
        device="cpu",
        config=EngineConfig(kv_cache_dtype="fp8_e4m3", max_slots=2, **options),  # type: ignore[arg-type]
    )
    narrow.load()
    assert plain.capacity is not None
    assert fp8.capacity is not None
    assert fp8.capacity.num_blocks == plain.capacity.num_blocks
    assert fp8.capacity.kv_cache_bytes * 4 == plain.capacity.kv_cache_bytes
    cache = fp8.runner.cache
    assert cache is not None
    assert {t.dtype for t in cache.keys + cache.values} == {FP8}

    batch = pages()
    alone = [fp8.generate([page])[0] for page in batch]
    for result in (fp8.generate(batch), narrow.generate(batch)):
        assert [g.token_ids for g in result] == [g.token_ids for g in alone]
    reference = plain.generate(batch)
    first = [(a.token_ids[0], a.token_probs[0]) for a in alone]
    want = [(r.token_ids[0], r.token_probs[0]) for r in reference]
    # the first token reads the prompt's keys and values back from the cache: FP8-rounded, close to exact
    assert [t for t, _ in first] == [t for t, _ in want]
    assert [p for _, p in first] == pytest.approx([p for _, p in want], abs=0.05)


def test_fp8_writes_saturate_and_round_like_a_cast() -> None:
    """Values past FP8's range are stored as its largest value (never NaN), others as PyTorch's cast rounds them,
    and the reference decode attention reads them widened to the query's dtype."""
    cache = PagedKVCache(layers=1, num_blocks=2, block_size=4, kv_heads=1, head_dim=4, dtype=FP8)
    keys = torch.tensor([[1000.0, -1000.0, 0.3, 17.7], [1e9, 2.0, -0.001, 5.0]]).view(1, 1, 2, 4)
    values = -keys
    with forward_context(ForwardContext("decode", write_index=torch.tensor([5, 6]))):
        cache.update(keys, values, 0)
    stored = cache.keys[0][5:7, 0].float()
    assert torch.isfinite(stored).all()
    limit = torch.finfo(FP8).max
    want = keys.view(2, 4).clamp(-limit, limit).to(FP8).float()
    assert torch.equal(stored, want)
    assert torch.equal(cache.values[0][5:7, 0].float(), -want)
    q = torch.ones(1, 2, 4)
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    out = paged_decode_reference(q, cache.keys[0], cache.values[0], table, torch.tensor([3]), 4, 0.5, 4)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_unknown_kv_cache_dtype_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, fp8_e4m3"):
        EngineConfig(kv_cache_dtype="int4")
