"""Outages of the services the daemon depends on (S3, the broker): noticed, probed, waited out.

A failure that looks transient is not yet an outage: `confirm()` probes the dependency at once, and only a
failing probe marks it down. While a dependency is down the consumer takes no new work, `/readyz` answers
not-ready, `ocrbooth_dependency_up` reads 0, and `watch()` probes with capped exponential backoff until the
dependency answers again; work that hit the outage waits for `recovered` instead of spending its retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Gauge

from ocrbooth.retry import Backoff

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[None]]


class Dependency:
    """One dependency's up/down state. `probe` raises when the dependency is unreachable."""

    def __init__(
        self,
        name: str,
        probe: Probe | None,
        gauge: Gauge,
        *,
        initial_backoff_ms: int = 500,
        max_backoff_ms: int = 5_000,
        probe_timeout_s: float = 10.0,
    ) -> None:
        self.name = name
        self._probe = probe
        self._gauge = gauge.labels(name)
        self._gauge.set(1)
        self._initial_ms = initial_backoff_ms
        self._max_ms = max_backoff_ms
        self._probe_timeout_s = probe_timeout_s
        self.down_since: float | None = None
        self.last_error = ""
        self.recovered = asyncio.Event()
        self.recovered.set()
        self._went_down = asyncio.Event()
        self._probing: asyncio.Future[bool] | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def mark_down(self, error: str) -> None:
        """Record an outage seen directly (the publisher cannot reach the broker, say)."""
        self.last_error = error
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.recovered.clear()
            self._went_down.set()
            self._gauge.set(0)
            log.warning("%s is unreachable; pausing new work until it answers", self.name, extra={"error": error})

    def mark_up(self) -> None:
        if self.down_since is not None:
            log.info(
                "%s answers again; resuming",
                self.name,
                extra={"outage_s": round(time.monotonic() - self.down_since, 1)},
            )
            self.down_since = None
            self._went_down.clear()
            self.recovered.set()
            self._gauge.set(1)

    async def confirm(self, error: str) -> bool:
        """A request failed in a way that may be an outage: probe now (one probe shared by concurrent callers)
        and return True when the dependency is down. Without a probe every such failure counts as down."""
        if self.down:
            return True
        if self._probe is None:
            self.mark_down(error)
            return True
        if self._probing is not None:
            return await asyncio.shield(self._probing)
        probing = self._probing = asyncio.get_running_loop().create_future()
        ok = True  # a cancelled probe proves nothing: waiters then count an ordinary failed attempt
        try:
            ok = await self._try_probe()
        finally:
            self._probing = None
            if not ok:
                self.mark_down(error)
            probing.set_result(not ok)
        return not ok

    async def watch(self) -> None:
        """Runs for the daemon's life: while down, probe with backoff until the dependency answers."""
        while True:
            await self._went_down.wait()
            backoff = Backoff(self._initial_ms, self._max_ms, floor_s=0.05)
            while self.down:
                await asyncio.sleep(backoff.next_s())
                if self._probe is None or await self._try_probe():
                    self.mark_up()

    async def _try_probe(self) -> bool:
        assert self._probe is not None
        try:
            async with asyncio.timeout(self._probe_timeout_s):
                await self._probe()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of the probe means "not reachable"; the reason is logged
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        return True


class Dependencies:
    """Every dependency the daemon watches, by name."""

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self.by_name: dict[str, Dependency] = {}

    def add(
        self, name: str, probe: Probe | None, *, initial_backoff_ms: int = 500, max_backoff_ms: int = 5_000
    ) -> Dependency:
        dep = Dependency(name, probe, self._gauge, initial_backoff_ms=initial_backoff_ms, max_backoff_ms=max_backoff_ms)
        self.by_name[name] = dep
        return dep

    def down(self) -> list[Dependency]:
        return [d for d in self.by_name.values() if d.down]

    def any_down(self) -> bool:
        return any(d.down for d in self.by_name.values())
