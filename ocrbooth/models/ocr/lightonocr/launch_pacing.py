"""`LaunchPacer`: keeps the host a few layers ahead of the GPU while it launches a prefill batch.

A prefill batch is thousands of eager kernel launches. Launched all at once while the GPU is busy, they fill
the driver's launch queue, and the launching thread then blocks inside a launch until the GPU drains it;
PyTorch holds the GIL through a launch, so every other Python thread (the engine core launching decode
chunks) stops with it. The pacer is called once per attention layer of a prefill launched from the engine's
prefill thread: it records an event and, once more than `depth` layers are queued, waits for the oldest one
with `Event.synchronize()`, which releases the GIL. The GPU still has `depth` layers of prefill queued, and
the other threads run while this one waits.
"""

from __future__ import annotations

from collections import deque

import torch


class LaunchPacer:
    """Call once per layer launched; waits (without the GIL) while more than `depth` layers are queued."""

    def __init__(self, depth: int = 3) -> None:
        if depth < 1:
            raise ValueError(f"pacing depth must be >= 1, got {depth}")
        self.depth = depth
        self._queued: deque[torch.cuda.Event] = deque()
        self.waits = 0

    @torch.compiler.disable  # type: ignore[untyped-decorator]  # host-side only; never part of a graph
    def __call__(self) -> None:
        event = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]  # a waiting host sleeps
        event.record()
        self._queued.append(event)
        if len(self._queued) > self.depth:
            self._queued.popleft().synchronize()
            self.waits += 1
