"""A named, self-healing pool of render processes, driven from the event loop.

Each worker is `python -m ocrbooth.models.ocr.render_worker` with its own socket pair: it caps its address
space (RLIMIT_AS), dies with the daemon (PR_SET_PDEATHSIG, and a parent-pid check while idle) and runs one
task at a time. A task that outlives its deadline has its worker SIGKILLed (`render_timeout`); an allocation
past the cap fails the task (`render_out_of_memory`) and the worker exits to free its heap; a worker that dies
mid-task (the kernel's OOM killer, a crash in MuPDF, `kill -9`) has its task retried once on a fresh worker.
Every worker that ends is replaced, with backoff while starts keep failing; `ready` turns False when they do.

Hand-written rather than pebble (5.2.3): pebble's workers share one result pipe guarded by a cross-process
lock, so a worker SIGKILLed while sending a page (the OOM-killer case this pool exists for) leaves the lock
held and a torn message in the pipe for every other worker; and a worker killed while the pool is idle breaks
a pebble pool for good ("All workers expired"). One socket pair per worker has neither problem, and the
event loop waits on it (and on a pidfd for the exit) without threads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal, TypeVar

from ocrbooth.errors import ConfigError, PoisonError, RetryableError
from ocrbooth.models.ocr.render_worker import OOM_CODE

log = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["starting", "idle", "busy", "retiring", "dead"]

MAX_START_FAILURES = 3
"""Consecutive failed starts after which the pool reports itself not ready (it keeps trying, with backoff)."""
_MAX_BACKOFF_S = 30.0
_EXIT_WAIT_S = 5.0

FAILURE_REASONS = ("timeout", "out_of_memory", "crashed", "start_failed")
"""Values of the `reason` given to `on_failure`."""


class RenderTaskError(RuntimeError):
    """A task raised an unexpected exception in its worker (a bug, not the input): its traceback."""


class _WorkerDied(Exception):
    def __init__(self, returncode: int | None) -> None:
        super().__init__(returncode)
        self.returncode = returncode


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen[bytes]
    conn: Connection
    pidfd: int
    exited: asyncio.Future[int]
    state: State = "starting"
    in_call: bool = False
    """A `_call` owns the connection: only it may close it."""
    start_timer: asyncio.TimerHandle | None = None
    reading: asyncio.Future[Any] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid


class RenderPool:
    """`size` worker processes running picklable module-level functions with a deadline and a memory cap."""

    def __init__(
        self,
        name: str,
        size: int,
        *,
        task_timeout_s: float,
        max_worker_bytes: int,
        preload: Sequence[str] = (),
        start_timeout_s: float = 60.0,
        on_failure: Callable[[str], None] | None = None,
        on_workers: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.size = size
        self.task_timeout_s = task_timeout_s
        self.max_worker_bytes = max_worker_bytes
        self.preload = tuple(preload)
        self.start_timeout_s = start_timeout_s
        self._on_failure = on_failure or (lambda reason: None)
        self._on_workers = on_workers or (lambda count: None)
        self._workers: set[_Worker] = set()
        self._idle: collections.deque[_Worker] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[_Worker | None]] = collections.deque()
        self._start_failures = 0
        self._last_start_error = ""
        self._replenish_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._changed = asyncio.Event()  # a worker started or ended

    # ---- state -----------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """False once workers keep failing to start (or the pool is closed): the replica cannot render."""
        return not self._closed and self._start_failures < MAX_START_FAILURES

    @property
    def not_ready_reason(self) -> str:
        return "closed" if self._closed else f"render workers cannot start: {self._last_start_error}"

    @property
    def workers(self) -> int:
        """Workers started and alive (idle or busy)."""
        return sum(1 for w in self._workers if w.state in ("idle", "busy"))

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers started and alive."""
        return sorted(w.pid for w in self._workers if w.state in ("idle", "busy"))

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until they answer; ConfigError when they cannot start at all."""
        self._loop = asyncio.get_running_loop()
        self._replenish()
        deadline = time.monotonic() + self.start_timeout_s + 1
        while self.workers < self.size and self._start_failures == 0 and time.monotonic() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))
        if self.workers < self.size:
            reason = self._last_start_error or f"not started within {self.start_timeout_s:g}s"
            await self.close()
            raise ConfigError(f"render pool {self.name!r}: workers cannot start: {reason}")
        log.info("render pool %r: %d workers (pids %s)", self.name, self.size, self.pids)

    async def close(self) -> None:
        """Kill every worker and wait for them to exit; later `run` calls raise RetryableError."""
        self._closed = True
        if self._replenish_handle is not None:
            self._replenish_handle.cancel()
        self._wake_waiters()
        workers = list(self._workers)
        for worker in workers:
            if worker.state != "dead":
                worker.state = "retiring"
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
        for worker in workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.exited), _EXIT_WAIT_S)

    # ---- running tasks ---------------------------------------------------------------------------

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in a worker. PoisonError (`render_timeout`, `render_out_of_memory`,
        `render_crashed`, or the task's own) for the input; RetryableError when no worker can be had."""
        for attempt in (1, 2):
            worker = await self._checkout()
            try:
                reply = await self._call(worker, function, args)
                return self._unwrap(worker, reply)  # type: ignore[no-any-return]
            except _WorkerDied as died:
                self._on_failure("crashed")
                log.warning(
                    "render pool %r: worker %d died (exit %s) during %s; %s",
                    self.name,
                    worker.pid,
                    died.returncode,
                    getattr(function, "__name__", function),
                    "retrying on a fresh worker" if attempt == 1 else "giving up",
                )
                if attempt == 2:
                    killed = died.returncode == -signal.SIGKILL
                    raise PoisonError(
                        f"the render worker died twice on this page (exit {died.returncode})"
                        + ("; SIGKILL is what the kernel's OOM killer sends" if killed else ""),
                        code=OOM_CODE if killed else "render_crashed",
                    ) from None
            finally:
                self._checkin(worker)
        raise AssertionError("unreachable")

    async def _call(self, worker: _Worker, function: Callable[..., Any], args: Sequence[Any]) -> Any:
        loop = asyncio.get_running_loop()
        worker.in_call = True
        try:
            worker.conn.send((function, tuple(args)))
        except OSError:
            worker.in_call = False
            raise _WorkerDied(await self._exit_status(worker)) from None
        fd = worker.conn.fileno()
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _resolve, readable)
        try:
            async with asyncio.timeout(self.task_timeout_s):
                await readable
                _stop_watching(loop, fd)
                # Off the loop: a multi-megabyte page must not stall it, nor a worker that stops mid-send.
                worker.reading = loop.run_in_executor(None, worker.conn.recv)
                worker.reading.add_done_callback(_retrieve)
                # Shielded: on a timeout the thread is still in recv() until the kill closes the socket, and
                # the connection must stay open until then.
                return await asyncio.shield(worker.reading)
        except TimeoutError:
            self._kill(worker, "timeout")
            self._on_failure("timeout")
            raise PoisonError(
                f"rendering took longer than the render deadline of {self.task_timeout_s:g}s", code="render_timeout"
            ) from None
        except (EOFError, OSError):
            raise _WorkerDied(await self._exit_status(worker)) from None
        except asyncio.CancelledError:
            self._kill(worker, "its caller was cancelled")  # it would go on rendering a page nobody waits for
            raise
        finally:
            loop.remove_reader(fd)
            worker.in_call = False
            if worker.state == "dead":
                _close_conn(worker)

    def _unwrap(self, worker: _Worker, reply: Any) -> Any:
        kind = reply[0]
        if kind == "ok":
            return reply[1]
        if kind == "poison":
            _, message, code = reply
            if code == OOM_CODE:
                self._retire(worker)
                self._on_failure("out_of_memory")
            raise PoisonError(message, code=code)
        if kind == "oom":
            self._retire(worker)
            self._on_failure("out_of_memory")
            raise PoisonError(f"rendering needs more than the worker memory cap: {reply[1]}", code=OOM_CODE)
        raise RenderTaskError(f"render task failed in worker {worker.pid}:\n{reply[1]}")

    async def _exit_status(self, worker: _Worker) -> int | None:
        try:
            return await asyncio.wait_for(asyncio.shield(worker.exited), _EXIT_WAIT_S)
        except TimeoutError:
            self._kill(worker, "it closed its pipe but did not exit")
            return None

    # ---- handing workers out ---------------------------------------------------------------------

    async def _checkout(self) -> _Worker:
        loop = asyncio.get_running_loop()
        while True:
            if not self.ready:
                raise RetryableError(f"render pool {self.name!r}: {self.not_ready_reason}")
            while self._idle:
                worker = self._idle.popleft()
                if worker.state == "idle":
                    worker.state = "busy"
                    return worker
            waiter: asyncio.Future[_Worker | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                got = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self._checkin(waiter.result())  # type: ignore[arg-type]
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if got is not None:
                return got

    def _checkin(self, worker: _Worker) -> None:
        if worker.state == "busy":
            self._hand_out(worker)

    def _hand_out(self, worker: _Worker) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                worker.state = "busy"
                waiter.set_result(worker)
                return
        worker.state = "idle"
        self._idle.append(worker)

    def _wake_waiters(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # ---- starting and replacing workers ----------------------------------------------------------

    def _spawn(self) -> None:
        loop = self._loop
        assert loop is not None
        ours, theirs = socket.socketpair()
        try:
            # Started from the event loop's thread: PR_SET_PDEATHSIG fires when the *thread* that started a
            # child ends, and this one lives as long as the daemon.
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ocrbooth.models.ocr.render_worker",
                    str(theirs.fileno()),
                    str(os.getpid()),
                    str(self.max_worker_bytes),
                    *self.preload,
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            proc.kill()
            proc.wait()
            conn.close()
            raise
        worker = _Worker(proc, conn, pidfd, loop.create_future())
        self._workers.add(worker)
        loop.add_reader(pidfd, self._on_exit, worker)
        loop.add_reader(conn.fileno(), self._on_hello, worker)
        worker.start_timer = loop.call_later(self.start_timeout_s, self._start_timed_out, worker)

    def _on_hello(self, worker: _Worker) -> None:
        assert self._loop is not None
        _stop_watching(self._loop, worker.conn.fileno())
        try:
            message = worker.conn.recv()  # a few bytes, already in the socket
        except (EOFError, OSError):
            return  # it died before saying anything; _on_exit counts the failed start
        if message[0] != "ready":
            self._last_start_error = str(message[1])
            return  # it exits; _on_exit counts the failed start
        if worker.start_timer is not None:
            worker.start_timer.cancel()
        self._start_failures = 0
        log.debug("render pool %r: worker %d ready (baseline %d B)", self.name, worker.pid, message[2])
        self._hand_out(worker)
        self._changed.set()
        self._on_workers(self.workers)

    def _start_timed_out(self, worker: _Worker) -> None:
        if worker.state == "starting":
            self._last_start_error = f"a worker did not start within {self.start_timeout_s:g}s"
            self._kill(worker, "it did not start in time")

    def _on_exit(self, worker: _Worker) -> None:
        assert self._loop is not None
        self._loop.remove_reader(worker.pidfd)
        os.close(worker.pidfd)
        returncode = worker.proc.wait()  # the pidfd is readable: the process has ended, this does not block
        previous, worker.state = worker.state, "dead"
        self._workers.discard(worker)
        if worker.start_timer is not None:
            worker.start_timer.cancel()
        if previous == "starting":
            self._loop.remove_reader(worker.conn.fileno())
            self._start_failures += 1
            self._last_start_error = self._last_start_error or f"a worker exited with {returncode} while starting"
            self._on_failure("start_failed")
            log.error(
                "render pool %r: a worker failed to start (%d in a row): %s",
                self.name,
                self._start_failures,
                self._last_start_error,
            )
            if not self.ready:
                self._wake_waiters()  # they raise RetryableError instead of waiting for a worker that won't come
        elif previous == "idle":
            self._on_failure("crashed")
            log.warning("render pool %r: idle worker %d ended (exit %s)", self.name, worker.pid, returncode)
        if not worker.in_call:
            _close_conn(worker)
        worker.exited.set_result(returncode)
        self._changed.set()
        self._on_workers(self.workers)
        self._schedule_replenish()

    def _schedule_replenish(self) -> None:
        if self._closed or self._loop is None or self._replenish_handle is not None:
            return
        delay = 0.0 if self._start_failures == 0 else min(_MAX_BACKOFF_S, 0.5 * 2 ** (self._start_failures - 1))
        self._replenish_handle = self._loop.call_later(delay, self._replenish)

    def _replenish(self) -> None:
        self._replenish_handle = None
        while not self._closed and len(self._workers) < self.size:
            try:
                self._spawn()
            except OSError as exc:
                self._start_failures += 1
                self._last_start_error = f"cannot start a worker process: {exc}"
                self._on_failure("start_failed")
                log.error("render pool %r: %s", self.name, self._last_start_error)
                if not self.ready:
                    self._wake_waiters()
                self._schedule_replenish()
                return

    def _retire(self, worker: _Worker) -> None:
        if worker.state == "busy":
            worker.state = "retiring"  # it exits by itself after this reply

    def _kill(self, worker: _Worker, why: str) -> None:
        if worker.state == "dead":
            return
        log.warning("render pool %r: killing worker %d: %s", self.name, worker.pid, why)
        if worker.state != "starting":
            worker.state = "retiring"
        with contextlib.suppress(ProcessLookupError):
            worker.proc.kill()


def _close_conn(worker: _Worker) -> None:
    if worker.reading is not None and not worker.reading.done():
        worker.reading.add_done_callback(lambda _: worker.conn.close())
    else:
        worker.conn.close()


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A recv() abandoned after a timeout ends with EOFError once the worker is killed; nobody awaits it.
    if not future.cancelled():
        future.exception()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _stop_watching(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Stop watching a worker's socket and make it blocking again for `Connection.send/recv`: uvloop (libuv's
    poll handle) switches a watched descriptor to non-blocking and leaves it so, and a multi-megabyte message
    then fails half-way with BlockingIOError as if the worker had died. asyncio's own loop changes nothing."""
    loop.remove_reader(fd)
    os.set_blocking(fd, True)
