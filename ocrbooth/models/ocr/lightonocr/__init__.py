"""LightOnOCR as an inference engine with continuous batching (vLLM v1's shape, on transformers' modules).

- `engine.py`: `LightOnOcrEngine` (load, size, serve) and its settings (`EngineConfig`, `Capacity`);
- `core.py`: `EngineCore`, the step loop on its own thread (schedule → execute → update_from_output);
- `scheduler.py`: pure policy: which pages enter free slots at each step, within the prefill and KV budgets;
- `runner.py`: the only code touching the GPU: batched vision encoding and prefill on a second stream,
  decode steps as CUDA graphs, asynchronous snapshots;
- `kv_cache.py`: the paged KV pool's sizes, memory sizing and block allocator (pure);
- `attention.py`: the paged cache and the attention functions (Triton split-K decode, per-segment prefill);
- `repetition.py`: the repetition guard and its on-device tracker;
- `inputs.py`: host preprocessing; `detokenize.py`: text, character spans and the page's output.

The package imports torch only when one of the names below is used, so the pure modules (scheduler,
kv_cache) import without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ocrbooth.models.ocr.lightonocr.core import EngineCore
    from ocrbooth.models.ocr.lightonocr.detokenize import PageGeneration
    from ocrbooth.models.ocr.lightonocr.engine import DEFAULT_MODEL, EngineConfig, LightOnOcrEngine
    from ocrbooth.models.ocr.lightonocr.repetition import RepetitionGuard

_WHERE = {
    "PageGeneration": "detokenize",
    "DEFAULT_MODEL": "engine",
    "EngineConfig": "engine",
    "EngineCore": "core",
    "LightOnOcrEngine": "engine",
    "RepetitionGuard": "repetition",
}
__all__ = ["DEFAULT_MODEL", "EngineConfig", "EngineCore", "LightOnOcrEngine", "PageGeneration", "RepetitionGuard"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
