"""LightOnOcrEngine on CPU with tiny random models built locally and loaded through the engine's own path:
continuous batching gives every page the tokens it gets alone, whenever it joins."""

from __future__ import annotations

import dataclasses
import itertools
from concurrent.futures import Future
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from ocrbooth.errors import ConfigError  # noqa: E402
from ocrbooth.models.ocr.confidence import summarize  # noqa: E402
from ocrbooth.models.ocr.engine import PageInput, StepStats  # noqa: E402
from ocrbooth.models.ocr.lightonocr import EngineConfig, LightOnOcrEngine, PageGeneration, RepetitionGuard  # noqa: E402
from ocrbooth.models.ocr.lightonocr.tuning import AttentionChoice  # noqa: E402
from ocrbooth.models.ocr.lightonocr.varlen import VarlenAttention  # noqa: E402
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
    refilled = LightOnOcrEngine(engine.model, device="cpu", config=EngineConfig(max_slots=2))
    refilled.load()
    through_two_slots = refilled.generate(pages)

    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.token_ids for g in through_two_slots] == [g.token_ids for g in alone]
    assert {g.finish_reason for g in alone} >= {"length"}
    assert sum(len(g.token_ids) for g in alone) > 40
    for batched, single in zip(together, alone, strict=True):
        assert batched.token_probs == pytest.approx(single.token_probs, abs=1e-4)
        assert batched.text == single.text


def test_token_probabilities_match_an_independent_forward(engine: LightOnOcrEngine) -> None:
    """Each reported probability is the softmax at the chosen id of a plain full-sequence forward, and that id
    is the argmax there."""
    pages = mixed_pages()[:3]
    net = engine.network
    for page, gen in zip(pages, engine.generate(pages), strict=True):
        prep = engine.preprocess(page)
        generated = torch.tensor([gen.token_ids], dtype=torch.long)
        full = torch.cat([prep.input_ids[None], generated[:, :-1]], dim=1)
        with torch.no_grad():
            # Embeddings built by hand: a random model may emit the image token id, which input_ids would
            # mistake for an image placeholder.
            features = net.model.get_image_features(prep.pixel_values[None], [prep.image_size]).pooler_output[0]
            embeds = net.get_input_embeddings()(full)
            embeds[0, : prep.prompt_length][prep.input_ids == engine.processor.image_token_id] = features
            logits = net(inputs_embeds=embeds).logits[0, prep.prompt_length - 1 :]
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = probs.gather(1, generated[0][:, None]).squeeze(1)
        assert probs.argmax(dim=-1).tolist() == gen.token_ids
        assert gen.token_probs == pytest.approx(chosen.tolist(), abs=1e-4)


def test_vision_encoder_batches_images_without_mixing_them(engine: LightOnOcrEngine) -> None:
    """Images encoded together as one flat sequence (attention per image) give the features each gives alone
    through transformers' own encoder."""
    preps = [engine.preprocess(PageInput(noise(w, h, seed=9), max_new_tokens=1)) for w, h in [(84, 56), (56, 84)]]
    net = engine.network
    with torch.no_grad():
        alone = [net.model.get_image_features(p.pixel_values[None], [p.image_size]).pooler_output[0] for p in preps]
        together = engine.runner.encode_images(preps)
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def segmentwise_varlen(calls: list[tuple[int, bool]]) -> VarlenAttention:
    """A variable-length kernel in plain torch with flash-attn-4's signature (flat [tokens, heads, dim], K/V
    heads not repeated, cumulative lengths), standing in for the package on the CPU; records each call's
    segment count and causality."""

    def varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):  # type: ignore[no-untyped-def]
        assert torch.equal(cu_seqlens_q, cu_seqlens_k)
        assert cu_seqlens_q.dtype == torch.int32
        bounds = cu_seqlens_q.tolist()
        assert max_seqlen_q == max_seqlen_k == max(b - a for a, b in itertools.pairwise(bounds))
        calls.append((len(bounds) - 1, causal))
        groups = q.shape[1] // k.shape[1]
        outs = []
        for start, end in itertools.pairwise(bounds):
            qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
            ks, vs = (t.repeat_interleave(groups, dim=1) for t in (ks, vs))
            out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs), None

    return VarlenAttention(varlen, "cpu-reference")


def test_varlen_attention_path_gives_the_per_segment_path_results(engine: LightOnOcrEngine) -> None:
    """With a variable-length kernel chosen for the vision encoder and the prefill, the engine hands it the
    whole batch in one call per layer (K/V heads as they are, causal for the prompts only) and gets the same
    image features and tokens as SDPA per segment: what the GPU test then checks flash-attn-4 against."""
    pages = mixed_pages()[:3]
    preps = [engine.preprocess(p) for p in pages]
    runner = engine.runner
    with torch.no_grad():
        features = runner.encode_images(preps)
    expected = [g.token_ids for g in engine.generate(pages)]
    calls: list[tuple[int, bool]] = []
    saved = runner.tuning.vision, runner.tuning.prefill, runner.varlen_kernel
    try:
        runner.varlen_kernel = segmentwise_varlen(calls)
        runner.tuning.vision = runner.tuning.prefill = AttentionChoice(varlen=True)
        with torch.no_grad():
            varlen_features = runner.encode_images(preps)
        for a, b in zip(features, varlen_features, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        vision_layers = engine.network.config.vision_config.num_hidden_layers
        assert calls == [(3, False)] * vision_layers
        got = [g.token_ids for g in engine.generate(pages)]
    finally:
        runner.tuning.vision, runner.tuning.prefill, runner.varlen_kernel = saved
    assert got == expected
    decoder_layers = engine.network.config.text_config.num_hidden_layers
    prompts = sum(segments for segments, causal in calls if causal)  # however the core batched them
    assert prompts == len(pages) * decoder_layers


def test_a_varlen_kernel_that_refuses_an_input_falls_back_to_sdpa(
    engine: LightOnOcrEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A measured attention choice that fails on a later input is dropped with a warning and the batch runs on
    PyTorch's default; out of memory and CUDA errors are not a kernel's refusal and go up."""
    pages = mixed_pages()[:2]
    expected = [g.token_ids for g in engine.generate(pages)]

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("head dimension not supported")

    runner = engine.runner
    saved = runner.tuning.vision, runner.tuning.prefill, runner.varlen_kernel
    try:
        runner.varlen_kernel = VarlenAttention(refuse, "refusing")
        runner.tuning.vision = runner.tuning.prefill = AttentionChoice(varlen=True)
        with caplog.at_level("WARNING"):
            got = [g.token_ids for g in engine.generate(pages)]
        assert runner.tuning.vision == runner.tuning.prefill == AttentionChoice()
    finally:
        runner.tuning.vision, runner.tuning.prefill, runner.varlen_kernel = saved
    assert got == expected
    assert sum("attention (FLASH_ATTN_4_VARLEN) failed" in r.getMessage() for r in caplog.records) == 2
    chosen = AttentionChoice(varlen=True)
    for exc in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUDA error: illegal address")):
        with pytest.raises(type(exc)):
            runner._fall_back("vision", chosen, exc)
    with pytest.raises(ValueError, match="bad page"):  # nothing measured to drop: the input itself is at fault
        runner._fall_back("vision", AttentionChoice(), ValueError("bad page"))


def test_prefill_overlap_is_checked_and_switchable_while_idle(engine: LightOnOcrEngine) -> None:
    """The setting names one of the four modes; a CPU engine takes any of them (it has no streams) and
    decodes the same."""
    with pytest.raises(ConfigError, match="prefill_overlap must be one of stream, priority, serial, green"):
        EngineConfig(prefill_overlap="parallel")
    with pytest.raises(ValueError, match="prefill overlap must be one of"):
        engine.runner.set_prefill_overlap("parallel")
    with pytest.raises(ValueError, match="prefill SMs must be >= 0"):
        engine.runner.set_prefill_overlap("green", -8)
    pages = mixed_pages()[:2]
    expected = [g.token_ids for g in engine.generate(pages)]
    try:
        for mode in ("serial", "green"):
            engine.runner.set_prefill_overlap(mode)
            assert [g.token_ids for g in engine.generate(pages)] == expected, mode
    finally:
        engine.runner.set_prefill_overlap("stream")


@pytest.mark.parametrize("prefill_thread", [True, False], ids=["launcher-thread", "inline"])
def test_pages_admitted_mid_decode_get_their_solo_tokens(engine: LightOnOcrEngine, prefill_thread: bool) -> None:
    """Pages of other sizes and budgets submitted while a long page decodes join free slots at once (not
    after it ends) and still produce exactly their solo tokens; the long page is unaffected. Both where
    prefill batches are launched from their own thread and from the engine core's (the default)."""
    default = engine.config
    engine.config = dataclasses.replace(default, prefill_thread=prefill_thread)
    try:
        _admit_mid_decode(engine, expect_launcher=prefill_thread)
    finally:
        engine.config = default


def _admit_mid_decode(engine: LightOnOcrEngine, *, expect_launcher: bool) -> None:
    first = PageInput(noise(90, 110, seed=20), max_new_tokens=60)
    shapes = [(40, 30, 9), (120, 70, 14)]
    later = [PageInput(noise(w, h, seed=21 + i), max_new_tokens=m) for i, (w, h, m) in enumerate(shapes)]
    alone = [engine.generate([page])[0] for page in [first, *later]]

    futures: list[Future[PageGeneration]] = []
    joined_at: list[int] = []
    finished_at: list[int] = []
    core = engine.worker(span_threshold=0.5)

    def on_step(stats: StepStats) -> None:
        if stats.step == 2 and stats.pages == 1:  # the first page is decoding: submit the others now
            futures.extend(core.submit_generation(page) for page in later)
        if stats.admitted and futures:
            joined_at.append(stats.step)
        if stats.finished:
            finished_at.append(stats.step)

    core._on_step = on_step
    core.start()
    assert (core._launcher is not None) is expect_launcher
    try:
        head = core.submit_generation(first)
        together = [head.result(timeout=60), *(f.result(timeout=60) for f in futures)]
    finally:
        core.stop()
    assert len(futures) == 2, "the later pages were not submitted while the first decoded"
    assert joined_at, "the later pages were never admitted"
    assert joined_at[0] < finished_at[0], "the later pages waited for the first page to finish"
    for got, want in zip(together, alone, strict=True):
        assert got.token_ids == want.token_ids
        assert got.token_probs == pytest.approx(want.token_probs, abs=1e-4)
        assert got.finish_reason == want.finish_reason == "length"


def test_pages_over_the_kv_cache_or_budget_fail_alone_with_a_code(tiny_dir: Path) -> None:
    """A page that could never fit a slot's KV reserve, or asks more tokens than the engine allows, fails
    with page_too_large while the others decode."""
    small = LightOnOcrEngine(str(tiny_dir), device="cpu", config=EngineConfig(kv_cache_tokens=256, max_new_tokens=512))
    small.load()
    pages = [
        PageInput(noise(50, 50, seed=5), max_new_tokens=6),
        PageInput(noise(50, 50, seed=6), max_new_tokens=400),  # prompt + 400 > 256 positions of cache
        PageInput(noise(50, 50, seed=7), max_new_tokens=600),  # over the engine's max_new_tokens
        PageInput(noise(60, 40, seed=8), max_new_tokens=5),
    ]
    outputs = small.recognize(pages, span_threshold=0.5)
    assert [o.error_code for o in outputs] == [None, "page_too_large", "page_too_large", None]
    assert [o.token_count for o in outputs] == [6, 0, 0, 5]


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


def test_fused_norms_replace_every_rms_norm_and_keep_the_outputs(engine: LightOnOcrEngine) -> None:
    """With fused norms (the default), every RMSNorm of the model runs `F.rms_norm`; the pages' tokens are those
    of transformers' own norms (`fused_norms=False`) and their probabilities agree within 1e-4 (float32, CPU)."""
    from ocrbooth.models.ocr.lightonocr.fused_norms import fuse_rms_norms

    fused = engine
    plain = LightOnOcrEngine(engine.model, device="cpu", config=EngineConfig(fused_norms=False))
    plain.load()
    norms = [m for m in fused.runner.net.modules() if type(m).__name__.endswith("RMSNorm")]
    # Qwen3: 4 a layer x 2 + the final one; Pixtral: 2 a layer x 2 + ln_pre; the projector's one
    assert len(norms) == 15
    assert all("forward" in vars(m) for m in norms)  # each points at the fused one
    assert not any("forward" in vars(m) for m in plain.runner.net.modules())  # off keeps transformers'
    pages = mixed_pages()
    fused_out, plain_out = fused.generate(pages), plain.generate(pages)
    assert [g.token_ids for g in fused_out] == [g.token_ids for g in plain_out]
    for a, b in zip(fused_out, plain_out, strict=True):
        assert a.token_probs == pytest.approx(b.token_probs, abs=1e-4)
    assert fuse_rms_norms(torch.nn.Linear(2, 2)) == 0  # nothing else is touched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_rms_norm_matches_transformers_within_one_rounding(dtype: torch.dtype) -> None:
    """One module: the fused forward against transformers' on the same input (float32: to rounding; bfloat16: at
    most one unit in the last place, the one rounding transformers does twice); an input of another dtype than
    the weight takes transformers' own path exactly."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from ocrbooth.models.ocr.lightonocr.fused_norms import fuse_rms_norms

    generator = torch.Generator().manual_seed(5)
    norm = Qwen3RMSNorm(256, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256, generator=generator) * 0.5 + 1)
    x = (torch.randn(64, 256, generator=generator) * 3).to(dtype)
    reference = Qwen3RMSNorm(256, eps=1e-6).to(dtype)
    reference.load_state_dict(norm.state_dict())
    expected = norm(x)
    assert fuse_rms_norms(norm) == 1
    got = norm(x)
    assert got.dtype == expected.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        ulp = torch.finfo(dtype).eps * expected.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert bool(((got.float() - expected.float()).abs() <= ulp).all())
        assert not torch.equal(got, x)
    other = x.float() if dtype == torch.bfloat16 else x.bfloat16()
    with torch.no_grad():
        assert torch.equal(norm(other), reference(other))
