"""The trained text encoder's attention (`models/dreambooth/text_attention.py`): SDPA's causal kernel also when
transformers considers itself tracing (a CUDA graph capturing the training step, or TorchDynamo compiling),
where it would otherwise hand SDPA a materialised mask and so a different kernel than the eager step's."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ocrbooth.models.dreambooth.text_attention import NAME, use_causal_sdpa  # noqa: E402


def tiny_text_encoder() -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    config._attn_implementation = "sdpa"  # what from_pretrained picks on a machine with SDPA
    return CLIPTextModel(config).eval()


def sdpa_calls(monkeypatch: pytest.MonkeyPatch, tracing: bool) -> list[dict[str, Any]]:
    """Record each SDPA call's mask and causal flag; `tracing`: transformers believes it is tracing (as under
    CUDA stream capture)."""
    import transformers.integrations.sdpa_attention as sdpa_module
    import transformers.masking_utils as masking

    calls: list[dict[str, Any]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append({"mask": kwargs.get("attn_mask"), "is_causal": kwargs.get("is_causal")})
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa_module.torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(masking, "is_tracing", lambda *a, **k: tracing)
    return calls


@pytest.mark.parametrize("tracing", [False, True], ids=["eager", "tracing"])
def test_the_text_encoder_runs_the_causal_kernel_in_every_mode(monkeypatch: pytest.MonkeyPatch, tracing: bool) -> None:
    """With `use_causal_sdpa`, every attention call is SDPA with is_causal and no mask, eager or tracing, and the
    output is transformers' own (the causal mask it would build is the same attention)."""
    ids = torch.randint(2, 99, (3, 77), generator=torch.Generator().manual_seed(1))
    reference = tiny_text_encoder()
    with torch.no_grad():
        want = reference(ids)[0]
    encoder = tiny_text_encoder()
    use_causal_sdpa(encoder)
    assert encoder.config._attn_implementation == NAME
    calls = sdpa_calls(monkeypatch, tracing)
    with torch.no_grad():
        got = encoder(ids)[0]
    assert len(calls) == 2  # one per layer
    assert all(c["mask"] is None and c["is_causal"] is True for c in calls), calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_without_it_tracing_hands_sdpa_a_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The behaviour the module works around (if transformers stops it, `text_attention.py` can go): tracing,
    transformers' own path passes a materialised mask and no causal flag."""
    encoder = tiny_text_encoder()
    calls = sdpa_calls(monkeypatch, tracing=True)
    with torch.no_grad():
        encoder(torch.randint(2, 99, (2, 77), generator=torch.Generator().manual_seed(2)))
    assert calls
    assert all(c["mask"] is not None and not c["is_causal"] for c in calls), calls


def test_the_setting_is_not_saved_with_the_model(tmp_path: Any) -> None:
    """An exported text encoder loads anywhere: its config does not name this process's attention function."""
    encoder = tiny_text_encoder()
    use_causal_sdpa(encoder)
    encoder.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
