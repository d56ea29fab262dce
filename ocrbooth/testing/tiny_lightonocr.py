"""Random LightOnOCR models saved to disk, for tests and benchmarks that cannot reach a model hub.

Everything is built locally: a byte-level BPE tokenizer (the 256 byte symbols and no merges, plus the special
tokens LightOnOcrProcessor needs), a Pixtral image processor, a chat template with the image as the whole
user turn, and a LightOnOcrForConditionalGeneration with random weights. Engines load the result through
their normal `from_pretrained` path.
"""

# transformers leaves its tokenizer backends, GenerationConfig and `.to()` overloads partly unannotated.
# mypy: disable-error-code="no-untyped-call,union-attr,arg-type"

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
)
QWEN_SPECIAL_IDS = {tok: 151643 + i for i, tok in enumerate(SPECIAL_TOKENS[:3])} | {
    tok: 151652 + i for i, tok in enumerate(SPECIAL_TOKENS[3:])
}
"""Where Qwen's vocabulary (and so LightOnOCR's config, image_token_id=151655) puts these tokens."""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image_pad|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(*, vocab_size: int | None = None, special_ids: Mapping[str, int] | None = None) -> Any:
    """Byte-level BPE without merges. Default: 256 byte symbols then the special tokens. With `vocab_size`,
    the specials sit at `special_ids` and filler symbols (`x123`, decodable, never produced by encoding)
    take every other id, so a full-size model's random ids all decode."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    if vocab_size is None:
        vocab |= {tok: len(symbols) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    else:
        placed = dict(special_ids or QWEN_SPECIAL_IDS)
        taken = set(placed.values())
        vocab |= placed
        vocab |= {f"x{i}": i for i in range(len(symbols), vocab_size) if i not in taken}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",  # token strings, not passwords
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "image_break_token": "<|vision_pad|>",
            "image_end_token": "<|vision_end|>",
        },
    )


def build_processor(tokenizer: Any, *, longest_edge: int) -> Any:
    """LightOnOcrProcessor: Pixtral resizing to `longest_edge`, sides rounded up to 28 (patch 14 x merge 2)."""
    from transformers import LightOnOcrProcessor
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": longest_edge}, patch_size={"height": 28, "width": 28}
    )
    return LightOnOcrProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        spatial_merge_size=2,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_lightonocr(
    path: Path,
    *,
    seed: int = 0,
    longest_edge: int = 112,
    script: Mapping[str, str] | None = None,
    text_layers: int = 2,
) -> Path:
    """Save a tiny random LightOnOCR (Qwen3 64 hidden x `text_layers` layers, Pixtral 32 hidden x 2 layers) with its
    processor to `path`. With `script` ({token text: next token text}), the decoder is rigged so that after
    each key token it emits its value (attention and MLP outputs zeroed, so the output depends only on the
    previous token); the prompt ends with "\\n", so a script starts there."""
    from transformers import LightOnOcrConfig, LightOnOcrForConditionalGeneration

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, longest_edge=longest_edge)
    config = LightOnOcrConfig(
        text_config={
            "model_type": "qwen3",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 4096,
            "rope_theta": 10000.0,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 16,
            "patch_size": 14,
            "image_size": longest_edge,
            "rope_theta": 10000.0,
        },
        image_token_id=tokenizer.image_token_id,
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LightOnOcrForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Logits spread wider than the default init gives, so greedy choices are clear-cut rather than near-ties.
        model.lm_head.weight.normal_(0.0, 0.3)
        if script is not None:
            _rig(model, tokenizer, script)
    return _save(model, processor, tokenizer, path)


def _rig(model: Any, tokenizer: Any, script: Mapping[str, str]) -> None:
    def token_id(text: str) -> int:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens, not one")
        return int(ids[0])

    language = model.model.language_model
    for layer in language.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    embed = language.embed_tokens.weight
    head = model.lm_head.weight
    head.normal_(0.0, 0.02)
    for axis, (source, target) in enumerate(script.items()):
        # The final state after "source" is RMSNorm(e_axis) = sqrt(hidden) * e_axis; only "target" reads it.
        embed[token_id(source)] = 0.0
        embed[token_id(source), axis] = 1.0
        head[token_id(target), axis] = 10.0


def build_full_size_lightonocr(path: Path, *, seed: int = 0, device: str = "cuda", longest_edge: int = 1540) -> Path:
    """Save LightOnOCR-1B's architecture (default LightOnOcrConfig: Qwen3 1024 x 28 layers, vocab 151936;
    Pixtral 1024 x 24 layers) with random bfloat16 weights, and a processor whose tokenizer covers the whole
    vocabulary, to `path`. For benchmarks: its output is noise, but costs what the real model costs."""
    from transformers import LightOnOcrConfig, LightOnOcrForConditionalGeneration

    config = LightOnOcrConfig()
    tokenizer = build_tokenizer(vocab_size=int(config.text_config.vocab_size))
    if tokenizer.image_token_id != config.image_token_id:
        raise AssertionError("the tokenizer's image token must be the config's image_token_id")
    processor = build_processor(tokenizer, longest_edge=longest_edge)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LightOnOcrForConditionalGeneration(config).to(torch.bfloat16).eval()
    return _save(model, processor, tokenizer, path)


def _save(model: Any, processor: Any, tokenizer: Any, path: Path) -> Path:
    """Greedy decoding by default, then model and processor saved where `from_pretrained(path)` finds them."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
