"""The trained text encoder's attention: SDPA's causal kernel in every mode, eager, captured or compiled.

transformers builds CLIP's causal mask as a tensor whenever it considers itself tracing (`is_tracing()`:
TorchDynamo compiling, `torch.jit` tracing, or a CUDA stream capturing) and otherwise leaves it out and asks
SDPA for `is_causal=True`. So the eager training step ran SDPA's causal kernel and the step captured in a CUDA
graph (`step_graphs.py`) the masked one: the same attention, rounded differently, deterministically. That
was the weight gap between the graphed and the eager step whenever the text encoder trained (6.15 % of the
distance the weights moved over 50 steps at accumulation 2, 4.1 % over 30 at accumulation 1; none with it
frozen, when the step does not run it): `tests/gpu/test_graph_step.py`.

The trainer calls the text encoder with token ids alone (no padding mask: SD's prompts are padded to 77
tokens and attend causally over the padding, as in pretraining), so the mask is always the plain causal one.
`causal_sdpa` drops whatever mask it is given and runs transformers' SDPA path with `is_causal=True`; a
module that is not causal, or a query whose length is not the keys', keeps transformers' path unchanged.
"""

from __future__ import annotations

from typing import Any, Final

import torch

NAME: Final = "ocrbooth_causal_sdpa"  # registered with transformers' AttentionInterface


def causal_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention with the causal mask given as `is_causal` rather than as a tensor."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("is_causal") and query.shape[2] == key.shape[2]:
        attention_mask = None
    out: tuple[torch.Tensor, Any] = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out


def use_causal_sdpa(text_encoder: Any) -> None:
    """Run `text_encoder`'s attention through `causal_sdpa` (not saved with the model: configs do not carry
    the attention implementation)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, causal_sdpa)
    text_encoder.set_attn_implementation(NAME)


__all__ = ["NAME", "causal_sdpa", "use_causal_sdpa"]
