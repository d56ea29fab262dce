"""Run the daemon for tests: in-process (burst mode) or as a real `ocrbooth run` subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

import pytest

from ocrbooth.config import Settings, load_settings
from ocrbooth.daemon.app import Daemon

REPO = Path(__file__).resolve().parents[2]

# Tansu completes a group join after half the session timeout; a short session keeps tests quick while
# leaving room for a loaded 2-core CI machine.
FAST_GROUP = {
    "OCRBOOTH_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "OCRBOOTH_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    "OCRBOOTH_HANDLERS": "echo",
    "OCRBOOTH_ECHO_FAULTS": "true",
    "OCRBOOTH_METRICS_PORT": "0",
    "OCRBOOTH_LOG_FORMAT": "json",
}


def settings_for(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str], **extra: str) -> Settings:
    """Settings as the daemon would read them from `env` (plus FAST_GROUP and `extra`)."""
    for key in [k for k in os.environ if k.startswith("OCRBOOTH_")]:
        monkeypatch.delenv(key)
    for key, value in {**FAST_GROUP, **env, **extra}.items():
        monkeypatch.setenv(key, value)
    return load_settings()


@contextlib.asynccontextmanager
async def running_daemon(
    settings: Settings, *, stop_timeout_s: float = 60
) -> AsyncIterator[tuple[Daemon, asyncio.Task[int]]]:
    """An in-process daemon running until the block ends; then it is stopped and must exit 0."""
    daemon = Daemon(settings)
    run = asyncio.create_task(daemon.run(install_signals=False))
    try:
        yield daemon, run
    finally:
        daemon.lifecycle.request_stop("test finished")
        code = await asyncio.wait_for(run, stop_timeout_s)
    assert code == 0, f"daemon exited with {code}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310  (local test server)
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def request_event(i: int, **metadata: str) -> bytes:
    """A valid DocumentRequest for request number i."""
    return json.dumps(
        {
            "schema_version": 1,
            "request_id": f"req-{i}",
            "document_id": f"doc-{i}",
            "source": {"uri": f"s3://ocrbooth/docs/{i}.pdf"},
            "metadata": {"n": str(i), **metadata},
        }
    ).encode()


class DaemonProcess:
    """`python -m ocrbooth.cli run` as a child process, with its own metrics port and a log file."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, args: Iterable[str] = ()) -> None:
        self.port = free_port()
        self.env = {**os.environ, **FAST_GROUP, **env, "OCRBOOTH_METRICS_PORT": str(self.port)}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        self.log_path = log_path
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ocrbooth.cli", "run", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            status, _ = await asyncio.to_thread(http_get, self.url + "/readyz")
            if status == 200:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"daemon not ready after {timeout_s}s:\n{self.log_tail()}")

    def metrics(self) -> str:
        status, body = http_get(self.url + "/metrics")
        assert status == 200, f"/metrics answered {status}"
        return body

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon still running after {timeout_s}s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def log_records(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`, from Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


def trainer_pids(workdir: Path) -> list[int]:
    """Process ids of DreamBooth trainer subprocesses whose job file lies under `workdir`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "dreambooth.train" in cmdline and str(workdir) in cmdline:
                found.append(int(proc.name))
    return found
