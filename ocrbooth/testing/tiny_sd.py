# mypy: disable-error-code="no-untyped-call,attr-defined"
"""A tiny random Stable Diffusion pipeline saved to disk, for tests and the demo (no model hub is reachable).

Every component is built from a config: a two-block UNet and VAE (64 px images, 32 x 32 latents), a two-layer
CLIP text encoder and a CLIP BPE tokenizer written here as vocab.json + merges.txt (the 256 byte symbols, the same
with the end-of-word mark, and merges that spell a few whole words). The trainer loads the result through its
normal `from_pretrained` path.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

# Words the tokenizer knows whole; anything else still tokenizes (byte by byte), so no prompt maps to unk.
WORDS = ("a", "an", "photo", "picture", "of", "sks", "dog", "cat", "toy", "in", "on", "the", "beach", "snow")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's byte-level BPE uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def write_tokenizer_files(directory: Path) -> tuple[dict[str, int], list[str]]:
    """vocab.json and merges.txt of a small CLIP BPE vocabulary; returns (vocab, merges)."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: "p h", "ph o", ..., "phot o</w>"
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab, merges


def build_tokenizer(directory: Path) -> Any:
    """The tiny CLIPTokenizer, loaded from the files written to `directory`."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(
        str(directory), bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS, model_max_length=MAX_LENGTH
    )


def build_tiny_sd(path: Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a tiny random StableDiffusionPipeline (no safety checker) to `path`; return `path`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(path / "tokenizer")  # save_pretrained below adds its config files beside them
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
        layers_per_block=1,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            layer_norm_eps=1e-5,
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(path), safe_serialization=True)
    return path


def make_instance_images(n: int, size: int = 64, seed: int = 0) -> list[bytes]:
    """PNG bytes of n pictures of one "subject": a red disc with a yellow square on it, over grey noise,
    moved a little from picture to picture."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        background = rng.integers(90, 160, size=(size, size, 3), dtype=np.uint8)
        image = Image.fromarray(background)
        draw = ImageDraw.Draw(image)
        cx, cy = (int(v) for v in rng.integers(size // 3, 2 * size // 3, size=2))
        r = size // 4
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(200, 30, 30))
        draw.rectangle((cx - r // 3, cy - r // 3, cx + r // 3, cy + r // 3), fill=(240, 220, 40))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
