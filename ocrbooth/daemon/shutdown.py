"""Lifecycle state and signal handling: a signal only changes state; a second one exits at once."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal

log = logging.getLogger(__name__)


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for `event` at most `timeout_s`; True if it is set. Uses asyncio.timeout, not wait_for, whose
    Python 3.11 version can swallow a cancellation that races with the inner wait finishing."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Lifecycle:
    """RUNNING -> DRAINING -> STOPPED. Waiters use `stop_requested`."""

    def __init__(self) -> None:
        self.state = State.STARTING
        self.stop_requested = asyncio.Event()
        self.reason = ""
        self._signals = 0

    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            self.reason = reason
            log.info("stopping: %s", reason)
        self.stop_requested.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            # uvicorn's force-exit: uncommitted work is redelivered, so nothing accepted is lost.
            log.warning("second %s: exiting now", sig.name)
            os._exit(128 + int(sig))
        self.request_stop(f"received {sig.name}")
