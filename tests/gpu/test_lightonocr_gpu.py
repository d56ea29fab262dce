"""LightOnOcrEngine on CUDA with the tiny model: batched decoding against single pages, CUDA graphs against eager."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from ocrbooth.models.ocr.engine import PageInput  # noqa: E402
from ocrbooth.models.ocr.lightonocr import LightOnOcrEngine, PageGeneration, RepetitionGuard  # noqa: E402
from ocrbooth.testing.tiny_lightonocr import build_tiny_lightonocr  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LightOnOCR saved to disk."""
    return build_tiny_lightonocr(tmp_path_factory.mktemp("lightonocr-gpu") / "tiny", seed=0)


def load(path: Path, **options: object) -> LightOnOcrEngine:
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


def test_float32_batch_matches_single_pages(tiny_dir: Path) -> None:
    """In float32 on CUDA, pages decoded together yield exactly the ids each yields alone."""
    engine = load(tiny_dir, dtype="float32", use_cuda_graphs=False)
    batch = pages()
    alone = [engine.generate([page])[0] for page in batch]
    together = engine.generate(batch)
    assert [g.token_ids for g in together] == [g.token_ids for g in alone], first_difference(together, alone)


def test_bfloat16_batch_matches_single_pages(tiny_dir: Path) -> None:
    """In bfloat16 (production dtype) on CUDA, batching does not change any page's ids either."""
    engine = load(tiny_dir, use_cuda_graphs=False)
    assert engine.dtype == torch.bfloat16
    batch = pages()
    alone = [engine.generate([page])[0] for page in batch]
    together = engine.generate(batch)
    assert [g.token_ids for g in together] == [g.token_ids for g in alone], first_difference(together, alone)


def test_cuda_graphs_match_eager(tiny_dir: Path) -> None:
    """Decoding through captured CUDA graphs (with slot refill, and reusing the state on a second call) gives
    the same ids and probabilities as eager decoding."""
    eager = load(tiny_dir, use_cuda_graphs=False).generate(pages())
    graphed = load(tiny_dir, use_cuda_graphs=True)
    first = graphed.generate(pages())
    second = graphed.generate(pages())
    refilled = load(tiny_dir, use_cuda_graphs=True, max_slots=2).generate(pages())
    for result in (first, second, refilled):
        assert [g.token_ids for g in result] == [g.token_ids for g in eager], first_difference(result, eager)
        for g, e in zip(result, eager, strict=True):
            assert g.token_probs == pytest.approx(e.token_probs, abs=1e-6)
            assert g.finish_reason == e.finish_reason


def test_cuda_graphs_stop_a_loop(tmp_path: Path) -> None:
    """The on-device repetition guard also fires inside the captured step."""
    path = build_tiny_lightonocr(tmp_path / "loop", script={"\n": "a", "a": "b", "b": "c", "c": "a"})
    engine = load(path, repetition=RepetitionGuard(min_tokens=24))
    [out] = engine.recognize([PageInput(Image.new("RGB", (40, 40)), max_new_tokens=300)], span_threshold=0.5)
    assert (out.finish_reason, out.token_count, out.text) == ("repetition", 24, "abc" * 8)
