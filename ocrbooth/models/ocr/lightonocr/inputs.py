"""Host-side inputs: a page through the processor's chat template (the image is the whole prompt), and the
prompt length a page will have, computed without preprocessing so the scheduler can plan before the pixels
exist. Runs on the engine's preprocessing threads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ocrbooth.models.ocr.engine import PageInput

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass(slots=True)
class PreparedPage:
    """A page after the processor: prompt ids with the image tokens expanded, and its pixels (host memory)."""

    input_ids: torch.Tensor
    """[n] token ids."""
    image_positions: torch.Tensor
    """Indices of the image tokens in `input_ids`."""
    pixel_values: torch.Tensor
    """[3, H, W] after resizing and normalization."""
    image_size: tuple[int, int]
    """(H, W) after resizing."""

    @property
    def prompt_length(self) -> int:
        return int(self.input_ids.shape[0])


class PromptBuilder:
    """The processor's view of a page, shared by the engine and its preprocessing threads."""

    def __init__(self, processor: Any, *, pin_memory: bool) -> None:
        self.processor = processor
        self.pin_memory = pin_memory
        self.prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=True, tokenize=False
        )
        # Prompt tokens besides the image's: the template with its one image placeholder left out.
        self.text_tokens = len(processor.tokenizer(self.prompt, add_special_tokens=False)["input_ids"]) - 1

    def image_token_count(self, image: Image) -> int:
        """Image tokens this page's prompt will hold (after the processor's resize), without preprocessing."""
        image_processor = self.processor.image_processor
        longest = int(image_processor.size["longest_edge"])
        patch = image_processor.patch_size
        patch_h, patch_w = (int(patch["height"]), int(patch["width"])) if isinstance(patch, dict) else (patch, patch)
        width, height = image.size
        if width < 1 or height < 1:
            raise ValueError(f"image of {width}x{height} pixels")
        ratio = max(height / longest, width / longest)
        if ratio > 1:
            height, width = math.floor(height / ratio), math.floor(width / ratio)
        height = ((height - 1) // patch_h + 1) * patch_h
        width = ((width - 1) // patch_w + 1) * patch_w
        merge = int(self.processor.effective_patch_size)
        return (height // merge) * (width // merge)

    def prompt_length(self, page: PageInput) -> int:
        """Tokens of this page's prompt (template + image), without preprocessing."""
        return self.text_tokens + self.image_token_count(page.image)

    def prepare(self, page: PageInput) -> PreparedPage:
        """Processor call with the page image as the only content; tensors pinned for an async upload."""
        processor = self.processor
        batch = processor(images=[page.image.convert("RGB")], text=[self.prompt], return_tensors="pt")
        input_ids = batch["input_ids"][0]
        image_positions = (input_ids == processor.image_token_id).nonzero().squeeze(1)
        if image_positions.numel() == 0 or int(image_positions[-1]) == input_ids.shape[0] - 1:
            raise ValueError("the chat template must put the image inside the prompt, followed by text")
        (height, width) = (int(x) for x in batch["image_sizes"][0].tolist())
        pixels = batch["pixel_values"][0, :, :height, :width].contiguous()
        if self.pin_memory:
            input_ids, image_positions, pixels = (
                input_ids.pin_memory(),
                image_positions.pin_memory(),
                pixels.pin_memory(),
            )
        return PreparedPage(input_ids, image_positions, pixels, (height, width))
