"""The daemon's budget for rendered pages: a page holds its pixel bytes from just before it is rendered until
the engine has recognised it, so rendered-but-unrecognised pages never exceed `capacity_bytes` in total."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable


class PageMemory:
    """A first-come, first-served byte budget shared by every document in flight.

    A request is granted when it fits, or when nothing at all is held: one page larger than the whole budget
    then runs alone instead of waiting forever, so a single document always makes progress. Everything held
    is released as pages are recognised, which needs no further grant, so waiting here cannot deadlock."""

    def __init__(self, capacity_bytes: int, on_change: Callable[[int], None] | None = None) -> None:
        if capacity_bytes < 1:
            raise ValueError("capacity_bytes must be at least 1")
        self.capacity_bytes = capacity_bytes
        self._used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._on_change = on_change or (lambda used: None)

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def exhausted(self) -> bool:
        """True while the budget is spent or someone waits for it: take no new documents now."""
        return self._used >= self.capacity_bytes or bool(self._waiters)

    async def acquire(self, nbytes: int) -> None:
        """Wait until `nbytes` may be held (in arrival order), then hold them."""
        if not self._waiters and self._fits(nbytes):
            self._take(nbytes)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(nbytes)  # granted just as we were cancelled
            else:
                self._waiters.remove(entry)
                self._grant()  # we may have been the head blocking smaller requests
            raise

    def release(self, nbytes: int) -> None:
        """Give back bytes held (a page recognised, failed, or smaller than estimated)."""
        self._used = max(0, self._used - nbytes)
        self._on_change(self._used)
        self._grant()

    def _fits(self, nbytes: int) -> bool:
        return self._used == 0 or self._used + nbytes <= self.capacity_bytes

    def _take(self, nbytes: int) -> None:
        self._used += nbytes
        self._on_change(self._used)

    def _grant(self) -> None:
        while self._waiters:
            nbytes, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if not self._fits(nbytes):
                return
            self._waiters.popleft()
            self._take(nbytes)
            waiter.set_result(None)
