"""LightOnOcrEngine on CPU with tiny random models built locally and loaded through the engine's own path."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from ocrbooth.errors import ConfigError  # noqa: E402
from ocrbooth.models.ocr.confidence import summarize  # noqa: E402
from ocrbooth.models.ocr.engine import PageInput  # noqa: E402
from ocrbooth.models.ocr.lightonocr import LightOnOcrEngine, RepetitionGuard  # noqa: E402
from ocrbooth.testing.tiny_lightonocr import build_tiny_lightonocr  # noqa: E402

LOOP = {"\n": "a", "a": "b", "b": "c", "c": "a"}  # a model rigged to print "abcabc..." forever
OK_THEN_STOP = {"\n": "O", "O": "K", "K": "<|im_end|>"}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LightOnOCR saved to disk."""
    return build_tiny_lightonocr(tmp_path_factory.mktemp("lightonocr") / "tiny", seed=0)


@pytest.fixture(scope="session")
def engine(tiny_dir: Path) -> LightOnOcrEngine:
    """The tiny model loaded on CPU through the production path."""
    loaded = LightOnOcrEngine(str(tiny_dir), device="cpu")
    loaded.load()
    return loaded


def noise(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def mixed_pages() -> list[PageInput]:
    """Pages of different shapes (so different image-token counts) and different output budgets."""
    sizes = [(100, 60, 20), (60, 100, 30), (300, 280, 25), (30, 50, 16), (112, 40, 12)]
    return [PageInput(noise(w, h, seed=i), max_new_tokens=m) for i, (w, h, m) in enumerate(sizes)]


def test_batch_produces_the_same_tokens_as_single_pages(engine: LightOnOcrEngine) -> None:
    """Pages decoded together (and through fewer slots than pages) yield exactly the ids each yields alone."""
    pages = mixed_pages()
    counts = [engine.image_token_count(p.image) for p in pages]
    assert len(set(counts)) >= 4, counts  # the batch really is ragged
    for page, count in zip(pages, counts, strict=True):
        prep = engine.preprocess(page)
        assert int((prep.input_ids == engine.processor.image_token_id).sum()) == count
        assert engine.prompt_length(page) == prep.prompt_length
        assert engine.cost(page) == count + page.max_new_tokens

    alone = [engine.generate([page])[0] for page in pages]
    together = engine.generate(pages)
    refilled = LightOnOcrEngine(engine.model, device="cpu", max_slots=2)
    refilled.load()
    through_two_slots = refilled.generate(pages)

    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.token_ids for g in through_two_slots] == [g.token_ids for g in alone]
    assert {g.finish_reason for g in alone} >= {"length"}
    assert sum(len(g.token_ids) for g in alone) > 40
    for batched, single in zip(together, alone, strict=True):
        assert batched.token_probs == pytest.approx(single.token_probs, abs=1e-5)
        assert batched.text == single.text


def test_token_probabilities_match_an_independent_forward(engine: LightOnOcrEngine) -> None:
    """Each reported probability is the softmax at the chosen id of a plain full-sequence forward, and that id
    is the argmax there."""
    pages = mixed_pages()[:3]
    net = engine.network
    for page, gen in zip(pages, engine.generate(pages), strict=True):
        prep = engine.preprocess(page)
        generated = torch.tensor([gen.token_ids], dtype=torch.long)
        full = torch.cat([prep.input_ids, generated[:, :-1]], dim=1)
        with torch.no_grad():
            # Embeddings built by hand: a random model may emit the image token id, which input_ids would
            # mistake for an image placeholder.
            features = net.model.get_image_features(prep.pixel_values, prep.image_sizes).pooler_output[0]
            embeds = net.get_input_embeddings()(full)
            embeds[0, : prep.prompt_length][prep.input_ids[0] == engine.processor.image_token_id] = features
            logits = net(inputs_embeds=embeds).logits[0, prep.prompt_length - 1 :]
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = probs.gather(1, generated[0][:, None]).squeeze(1)
        assert probs.argmax(dim=-1).tolist() == gen.token_ids
        assert gen.token_probs == pytest.approx(chosen.tolist(), abs=1e-4)


def test_vision_encoder_keeps_masks_between_images(engine: LightOnOcrEngine) -> None:
    """The engine drops Pixtral's mask only when it masks nothing: two images in one call still encode as
    they do alone."""
    preps = [engine.preprocess(PageInput(noise(w, h, seed=9), max_new_tokens=1)) for w, h in [(84, 56), (56, 84)]]
    encoder = engine.network.model
    with torch.no_grad():
        alone = [encoder.get_image_features(p.pixel_values, p.image_sizes).pooler_output[0] for p in preps]
        width = max(p.pixel_values.shape[-1] for p in preps)
        height = max(p.pixel_values.shape[-2] for p in preps)
        padded = torch.zeros(2, 3, height, width)
        for i, p in enumerate(preps):
            padded[i, :, : p.pixel_values.shape[-2], : p.pixel_values.shape[-1]] = p.pixel_values[0]
        sizes = [p.image_sizes[0] for p in preps]
        together = encoder.get_image_features(padded, sizes).pooler_output
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_repetition_guard_on_token_streams() -> None:
    """The guard fires on a loop once it is long enough, and not on repeated table rows or varied text."""
    guard = RepetitionGuard(max_period=64, min_repeats=4, min_tokens=24)
    assert guard.first_trigger([7, 8, 9] * 20) == 23  # period 3 reaches 24 tokens at index 23
    assert guard.first_trigger(list(range(40)) * 4) == 4 * 40 - 1  # period 40 needs 4 repeats
    assert guard.first_trigger(list(range(100))) is None
    assert RepetitionGuard(enabled=False).first_trigger([5] * 1000) is None

    default = RepetitionGuard()
    empty_row = [10, 11, 10, 11, 10, 11, 12]  # "| | |\n"
    assert default.first_trigger(empty_row * 30) is None  # 30 identical empty rows: a legitimate table
    assert default.first_trigger(empty_row * 60) is not None  # 420 tokens of nothing else: a loop
    rows = [token for i in range(60) for token in (10, 100 + i % 7, 10, 200 + i % 5, 12)]
    assert default.first_trigger(rows) is None  # rows that differ in content never form one period


def test_looping_model_stops_with_repetition(tmp_path: Path) -> None:
    """A model rigged to print "abc" forever ends with finish_reason "repetition" well before its budget."""
    path = build_tiny_lightonocr(tmp_path / "loop", script=LOOP)
    looping = LightOnOcrEngine(str(path), device="cpu", repetition=RepetitionGuard(min_tokens=24))
    looping.load()
    page = PageInput(noise(40, 40, seed=1), max_new_tokens=200)
    [out] = looping.recognize([page], span_threshold=0.5)
    assert out.finish_reason == "repetition"
    assert out.token_count == 24
    assert out.text == "abc" * 8

    unguarded = LightOnOcrEngine(str(path), device="cpu", repetition=RepetitionGuard(enabled=False))
    unguarded.load()
    [out] = unguarded.recognize([PageInput(noise(40, 40, seed=1), max_new_tokens=30)], span_threshold=0.5)
    assert (out.finish_reason, out.token_count, out.text) == ("length", 30, ("abc" * 10))


def test_budget_stop_and_confidence_fields(engine: LightOnOcrEngine, tmp_path: Path) -> None:
    """A spent budget ends with "length", a stop token with "stop" (not in the text), and the confidence
    fields are summarize() of the token probabilities over the detokenized character spans."""
    page = PageInput(noise(90, 70, seed=3), max_new_tokens=7)
    [gen] = engine.generate([page])
    [out] = engine.recognize([page], span_threshold=0.5)
    assert gen.finish_reason == out.finish_reason == "length"
    assert out.token_count == len(gen.token_ids) == 7
    assert gen.char_spans is not None
    assert (out.confidence, out.min_token_confidence, out.low_confidence_spans) == summarize(
        gen.token_probs, gen.char_spans, threshold=0.5
    )
    assert out.text == engine.processor.tokenizer.decode(gen.token_ids, skip_special_tokens=True)

    path = build_tiny_lightonocr(tmp_path / "ok", script=OK_THEN_STOP)
    stopping = LightOnOcrEngine(str(path), device="cpu")
    stopping.load()
    [out] = stopping.recognize([PageInput(noise(40, 40, seed=2), max_new_tokens=50)], span_threshold=0.5)
    assert (out.finish_reason, out.text, out.token_count) == ("stop", "OK", 3)
    assert out.confidence == pytest.approx(1.0)
    assert out.low_confidence_spans == []


def test_character_spans_follow_multibyte_tokens(engine: LightOnOcrEngine) -> None:
    """Byte tokens that only together make one character share that character's span."""
    ids = engine.processor.tokenizer.encode("hé → ok", add_special_tokens=False)
    text, spans = engine.detokenize([*ids, engine.processor.image_token_id])
    assert text == "hé → ok"
    assert spans == [(0, 1), (1, 2), (1, 2), (2, 3), (3, 4), (3, 4), (3, 4), (4, 5), (5, 6), (6, 7), (7, 7)]


def test_bad_page_fails_alone_and_missing_model_is_a_config_error(engine: LightOnOcrEngine, tmp_path: Path) -> None:
    """An unusable page gets an error output while its batch-mates decode; a missing model is a ConfigError."""
    good = PageInput(noise(50, 50, seed=4), max_new_tokens=5)
    outputs = engine.recognize([good, PageInput(Image.new("RGB", (0, 0)), max_new_tokens=5)], span_threshold=0.5)
    assert [o.finish_reason for o in outputs] == ["length", "error"]
    assert outputs[1].error_code == "unprocessable_page"

    with pytest.raises(ConfigError, match="does not exist"):
        LightOnOcrEngine(str(tmp_path / "no-such-model")).load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load LightOnOCR model"):
        LightOnOcrEngine(str(tmp_path / "empty")).load()
