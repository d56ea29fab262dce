"""Which asyncio event loop runs the daemon (`settings.event_loop`), as uvicorn's `--loop auto|uvloop|asyncio`.

uvloop implements the loop (scheduling, timers, sockets) in Cython over libuv. The daemon schedules a few
callbacks for every message (its task's steps, the producer's acknowledgement), so the loop's own cost is a
large part of the runtime's overhead: `bench/runtime_overhead.py` runs both of its sides on the loop chosen
here, and records which.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
LoopName = Literal["auto", "uvloop", "asyncio"]


def resolve(name: LoopName) -> Literal["uvloop", "asyncio"]:
    """The loop `name` stands for here; `uvloop` when it is not installed raises ImportError."""
    if name == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if name == "uvloop":
            raise
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T], name: LoopName = "auto") -> T:
    """`asyncio.run(main)` on the chosen loop."""
    if resolve(name) == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
