"""LightOnOcrEngine with `compile_layers` on CPU (tiny random model): Inductor compiles each decoder and vision
layer once a kind, the attention stays outside the graphs, the pages' tokens are the eager engine's, and a
compile failure falls back to the eager layers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from ocrbooth.models.ocr.engine import PageInput  # noqa: E402
from ocrbooth.models.ocr.lightonocr import (  # noqa: E402
    EngineConfig,
    LightOnOcrEngine,
    compiled_layers,
)
from ocrbooth.testing.tiny_lightonocr import build_tiny_lightonocr  # noqa: E402

# Inductor's CPU backend imports torch.jit's MKLDNN helpers, which warn on import (PyTorch's own deprecation).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # More decoder layers than TorchDynamo's default recompile limit (8): each layer is its own cache entry
    return build_tiny_lightonocr(tmp_path_factory.mktemp("lightonocr-compiled") / "tiny", seed=3, text_layers=10)


def pages() -> list[PageInput]:
    """Ragged pages: different image-token counts and output budgets."""
    generator = torch.Generator().manual_seed(11)
    sizes = [(100, 60, 18), (60, 100, 24), (300, 280, 20), (30, 50, 12)]
    out = []
    for w, h, budget in sizes:
        pixels = torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8)
        out.append(PageInput(Image.fromarray(pixels.numpy()), max_new_tokens=budget))
    return out


def layer_modules(engine: LightOnOcrEngine) -> list[torch.nn.Module]:
    net = engine.runner.net
    return [*net.model.language_model.layers, *net.model.vision_encoder.transformer.layers]


def test_compiled_layers_give_the_eager_engines_tokens(tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every layer runs compiled (Inductor's code shared by the layers of a kind), also past TorchDynamo's
    default recompile limit, the attention functions stay outside the graphs, and every page's tokens are the
    eager engine's, probabilities within 1e-4 (float32)."""
    from torch._dynamo.utils import counters

    eager = LightOnOcrEngine(str(tiny_dir), device="cpu")
    eager.load()
    counters.clear()
    compiled = LightOnOcrEngine(str(tiny_dir), device="cpu", config=EngineConfig(compile_layers=True))
    compiled.load()
    assert compiled.compiled is not None
    assert eager.compiled is None
    layers = layer_modules(compiled)
    assert compiled.compiled.layers == len(layers) == 12  # 10 decoder + 2 vision layers
    assert all(isinstance(vars(m).get("forward"), compiled_layers._CompiledForward) for m in layers)

    batch = pages()
    got, want = compiled.generate(batch), eager.generate(batch)
    assert compiled.compiled.active, compiled.compiled.failed
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert all(len(g.token_ids) > 0 for g in got)
    for a, b in zip(got, want, strict=True):
        assert a.token_probs == pytest.approx(b.token_probs, abs=1e-4)

    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]  # no layer left eager
    # each decoder layer traced for prefill and decode, each vision layer for images
    assert counters["stats"]["unique_graphs"] >= 2 * 10 + 2, counters["stats"]
    breaks = " ".join(counters["graph_break"])
    assert "decoder_attention" in breaks
    assert "vision_attention" in breaks
    assert "PagedKVCache.update" in breaks

    counters.clear()
    again = compiled.generate(batch)  # other batch sizes and token counts: no new compiles
    assert [g.token_ids for g in again] == [g.token_ids for g in want]
    assert counters["stats"]["unique_graphs"] == 0


def test_a_failing_compile_falls_back_to_the_eager_layers(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend that raises (as Inductor does without a working Triton) puts every layer back on its eager
    forward with one warning; the pages still get the eager engine's tokens."""
    calls = []

    def broken_backend(gm: Any, example_inputs: Any) -> Any:
        calls.append(gm)
        raise RuntimeError("no working Triton here")

    monkeypatch.setattr(compiled_layers, "BACKEND", broken_backend)
    eager = LightOnOcrEngine(str(tiny_dir), device="cpu")
    eager.load()
    with caplog.at_level(logging.WARNING, logger=compiled_layers.__name__):
        engine = LightOnOcrEngine(str(tiny_dir), device="cpu", config=EngineConfig(compile_layers=True))
        engine.load()
        batch = pages()
        got = engine.generate(batch)
    assert calls, "the compile was never attempted"
    state = engine.compiled
    assert state is not None
    assert not state.active
    assert state.failed is not None
    assert "no working Triton here" in state.failed
    assert not any(isinstance(vars(m).get("forward"), compiled_layers._CompiledForward) for m in layer_modules(engine))
    assert [r.message for r in caplog.records].count(
        f"LightOnOCR: compiling the model's layers failed ({state.failed}); running them eagerly"
    ) == 1
    assert [g.token_ids for g in got] == [g.token_ids for g in eager.generate(batch)]
