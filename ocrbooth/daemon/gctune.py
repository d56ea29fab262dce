"""Garbage-collector settings for a long-running, allocation-heavy event loop.

CPython runs a young-generation collection every 700 net container allocations, and every tenth of those
promotes into older generations whose collection walks every tracked object in the process: for a daemon
that has imported boto3, aiokafka, pydantic models (and torch, with the OCR engine), that is hundreds of
thousands of long-lived objects, walked over and over while thousands of short-lived events go by. Two
standard remedies (the ones CPython's `gc.freeze` documentation and large Python services use):

- freeze what exists once startup is done (modules, settings, loaded models): it moves to a permanent
  generation that collections skip;
- raise the young-generation threshold, so collections run less often over a still-small young heap.

The threshold counts container objects allocated and not yet freed. Every message in flight keeps ~35 of
them alive (its task, a few coroutines, the decoded event, the outputs), so 2,000 in flight hold ~70,000: at
a threshold of 10,000 the young collection ran several times per window, walking live in-flight objects and
finding almost nothing (278 objects freed by 304 collections in three benchmark runs, ~10 % of the run's
time with the older-generation passes it triggered). The default of 100,000 sits above such a window.

Reference counting still frees almost everything at once; only reference cycles wait for a collection.
`bench/runtime_overhead.py` measures the effect on the event path.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def tune_gc(*, gen0_threshold: int, freeze: bool) -> None:
    """Apply the daemon's collector settings; `gen0_threshold` 0 keeps the interpreter's own thresholds."""
    if gen0_threshold:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, gen1, gen2)
    if freeze:
        gc.collect()  # cycles that are already garbage are freed, not frozen
        gc.freeze()
    log.debug("gc tuned", extra={"thresholds": gc.get_threshold(), "frozen": gc.get_freeze_count()})
