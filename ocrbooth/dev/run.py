"""`ocrbooth dev`: the embedded stack in the foreground until a signal, printing the env lines to use it."""

from __future__ import annotations

import logging
import shlex
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Final

from ocrbooth.dev.embedded import EmbeddedStack
from ocrbooth.dev.errors import EmbeddedStackError
from ocrbooth.dev.ports import HOST, _port_is_free
from ocrbooth.dev.topics import default_topics
from ocrbooth.localfs import ensure_writable_dir

logger = logging.getLogger(__name__)

DEFAULT_DEV_DIR: Final = Path(".ocrbooth/dev")
DEFAULT_DEV_KAFKA_PORT: Final = 9092
DEFAULT_DEV_S3_PORT: Final = 8333


def run_dev(
    data_dir: Path = DEFAULT_DEV_DIR,
    *,
    kafka_port: int | None = DEFAULT_DEV_KAFKA_PORT,
    s3_port: int | None = DEFAULT_DEV_S3_PORT,
    partitions: int = 4,
    print_fn: Callable[[str], None] = print,
) -> int:
    """Run the stack in the foreground until SIGINT/SIGTERM; print the env lines to use it. Returns 0, or 1
    when a child exits; raises EmbeddedStackError, saying what to do, when the stack cannot start.

    Data persists in `data_dir` across runs. A port of None means "pick a free one". A second signal
    stops the children with SIGKILL at once.
    """
    _check_dev_data_dir(data_dir)
    for name, option, port in (("Kafka", "--kafka-port", kafka_port), ("S3", "--s3-port", s3_port)):
        if port is not None and not _port_is_free(port):
            raise EmbeddedStackError(
                f"{name} port {port} on {HOST} is already in use (another `ocrbooth dev`?); stop what holds it"
                f" or pass {option} 0 to pick a free port"
            )
    stack = EmbeddedStack(data_dir, kafka_port=kafka_port, s3_port=s3_port, topics=default_topics(partitions))
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop_requested.is_set():
            raise KeyboardInterrupt  # second signal: abandon the graceful stop
        logger.info("received %s; stopping the embedded stack", signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.start()
        for key, value in stack.env().items():
            print_fn(f"{key}={shlex.quote(value)}")
        while not stop_requested.wait(0.5):
            if not stack.running:
                logger.error("a child exited; see %s and %s", stack.weed_log, stack.tansu_log)
                stack.stop()
                return 1
        stack.stop()
        logger.info("embedded stack stopped; data kept in %s", stack.data_dir)
        return 0
    except KeyboardInterrupt:
        logger.warning("forced exit: killing the embedded stack")
        stack.kill()
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_dev_data_dir(data_dir: Path) -> None:
    """Create `data_dir` and prove it writable before any child starts (weed's own error would be a log line
    in a file inside that very directory)."""
    try:
        ensure_writable_dir(data_dir)
    except OSError as exc:
        raise EmbeddedStackError(
            f"cannot use {data_dir} as the data directory: {exc.strerror or exc}; pass a writable --data-dir"
        ) from exc
