"""A Tansu broker of a test's own, its log in its own bucket of the session's SeaweedFS.

Tests that restart the broker, or put a proxy in front of it, need one that no other test shares; starting
a second SeaweedFS for that would cost more than the broker itself. Like the session stack's broker, it
keeps topics, records and committed offsets in S3, so it can be stopped (or killed) and started again on
the same port. With `advertised_port` it tells clients to connect to that port instead of its own (a
proxy's), since a Kafka client connects to whatever address the metadata names, not the bootstrap address.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from ocrbooth.dev.embedded import EmbeddedStack
from ocrbooth.dev.errors import EmbeddedStackError
from ocrbooth.dev.ports import HOST
from ocrbooth.dev.processes import _child_env, _start_child, _stop_child, tansu_binary
from ocrbooth.dev.topics import ensure_topics, kafka_metadata_ok, run_sync
from tests.support.daemon import free_port
from tests.support.stack import unique_suffix


class PrivateBroker:
    """One Tansu process on 127.0.0.1 with its log under s3://`log_bucket`/ of `stack`'s SeaweedFS."""

    def __init__(self, stack: EmbeddedStack, data_dir: Path, *, advertised_port: int | None = None) -> None:
        self.stack = stack
        self.data_dir = data_dir
        self.port = free_port()
        self.advertised_port = advertised_port or self.port
        self.log_bucket = f"tansu-{unique_suffix()}"
        self.log_path = data_dir / "tansu.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def bootstrap_servers(self) -> str:
        """The advertised address: what every client of this broker connects to."""
        return f"{HOST}:{self.advertised_port}"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """The session stack's environment with this broker as the bootstrap address."""
        return {**self.stack.env(), "OCRBOOTH_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers}

    def create_topics(self, topics: Mapping[str, int]) -> None:
        """Create topics (name -> partitions) if missing; call it from a thread when a proxy runs in the loop."""
        bootstrap = self.bootstrap_servers
        run_sync(lambda: ensure_topics(bootstrap, topics))

    def start(self, timeout_s: float = 30) -> None:
        """Start the broker on its port and wait until it answers metadata requests at the advertised address."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        s3 = self.stack.s3_client()
        try:
            existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            if self.log_bucket not in existing:
                s3.create_bucket(Bucket=self.log_bucket)
        finally:
            s3.close()
        argv = [
            tansu_binary(),
            "broker",
            "--listener-url",
            f"tcp://{HOST}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{HOST}:{self.advertised_port}",
            "--storage-engine",
            f"s3://{self.log_bucket}/",
        ]
        env = _child_env(
            {
                "AWS_ENDPOINT": self.stack.s3_endpoint_url,
                "AWS_ACCESS_KEY_ID": self.stack.access_key,
                "AWS_SECRET_ACCESS_KEY": self.stack.secret_key,
                "AWS_REGION": self.stack.region,
                "AWS_DEFAULT_REGION": self.stack.region,
                "AWS_ALLOW_HTTP": "true",
            }
        )
        # The stack's own spawner: the broker gets SIGTERM if this test process dies.
        self._proc = _start_child(argv, env=env, cwd=self.data_dir, log_path=self.log_path)
        deadline = time.monotonic() + timeout_s
        bootstrap = self.bootstrap_servers
        while True:
            if self._proc.poll() is not None:
                raise EmbeddedStackError(f"tansu exited with {self._proc.returncode}:\n{self.log_tail()}")
            if run_sync(lambda: kafka_metadata_ok(bootstrap, timeout_s=2)):
                return
            if time.monotonic() > deadline:
                raise EmbeddedStackError(f"private broker not ready after {timeout_s}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL with `kill`) and wait. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill and proc.poll() is None:
            proc.kill()
        _stop_child(proc, "tansu")

    def restart(self, *, kill: bool = False, timeout_s: float = 30) -> None:
        """Stop (or kill) the broker and start it again on the same port."""
        self.stop(kill=kill)
        self.start(timeout_s)
        self.restarts += 1

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the broker's output, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
