"""The `ocr` handler for benchmarks with random LightOnOCR weights, loaded by the daemon as
`OCRBOOTH_HANDLERS=bench.ocr_e2e_handler:RandomWeightsOcrHandler` (the documented `module:Class` form).

It is the production `OcrHandler` in every respect but one: its LightOnOCR engine has no stop token and no
repetition guard, as the engine benchmark's has. Whether and where random weights emit the end-of-turn token
or fall into a loop (which the guard would cut short) is arbitrary and says nothing about the daemon's cost.
With both off, every page decodes exactly the `max_new_tokens` its request asks for
(`options.max_new_tokens`, a documented request option), so the daemon and the engine alone do the same
work. The engine's capacity settings are the daemon's own (`lightonocr_config`), and Tesseract is not loaded
(requests name no engine, so `auto` means lightonocr).
"""

from __future__ import annotations

from typing import Any

from ocrbooth.config import OcrSettings
from ocrbooth.handlers.ocr import OcrHandler, lightonocr_config


def random_weights_engine(cfg: OcrSettings) -> Any:
    """A LightOnOcrEngine (not loaded) from the OCR settings, with stop token and repetition guard off."""
    from ocrbooth.models.ocr.lightonocr import LightOnOcrEngine, RepetitionGuard

    return LightOnOcrEngine(
        cfg.model,
        device=cfg.device,
        repetition=RepetitionGuard(enabled=False),
        eos_token_ids=(),
        config=lightonocr_config(cfg),
    )


class RandomWeightsOcrHandler(OcrHandler):
    """The production OCR handler serving one engine: LightOnOCR as `random_weights_engine` builds it."""

    def create_engines(self) -> tuple[str, dict[str, Any]]:
        engine = random_weights_engine(self.cfg)
        engine.load()
        return "lightonocr", {"lightonocr": engine}
