"""The process side of the render pool: `python -m ocrbooth.models.ocr.render_worker FD PARENT_PID MAX_BYTES`.

A worker caps its own address space, dies with its parent, then runs one task at a time from its end of a
socket pair: `(function, args)` in, one reply out. Replies: `("ok", value)`, `("poison", message, code)`,
`("oom", message)`, `("error", traceback)`. After an out-of-memory reply the worker exits, so the pool gets a
fresh address space for the next page. It imports only what its tasks need (not the daemon).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from ocrbooth.errors import PoisonError

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PARENT_CHECK_S = 1.0
OOM_CODE = "render_out_of_memory"
EXIT_CAP_TOO_LOW = 3


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux), and exit now if the parent is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The parent may have died between our fork and the prctl above; then we were re-parented already.
    if os.getppid() != parent_pid:
        os._exit(0)


def cap_memory(max_bytes: int) -> None:
    """Limit this process's address space: an allocation past it fails (MemoryError, or MuPDF's malloc error)
    instead of growing until the kernel's OOM killer picks a victim."""
    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))


def vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_task(function: Callable[..., Any], args: Sequence[Any]) -> tuple[tuple[Any, ...], bool]:
    """(reply, retire): run one task and say whether this process should exit after replying."""
    try:
        return ("ok", function(*args)), False
    except PoisonError as exc:
        return ("poison", str(exc), exc.code), exc.code == OOM_CODE
    except MemoryError as exc:
        return ("oom", f"out of memory: {str(exc) or 'an allocation failed'}"), True
    except Exception:  # a bug in a task must reach the parent as a reply, not kill the worker silently
        return ("error", traceback.format_exc(limit=20)), False


def serve(conn: Connection, parent_pid: int) -> None:
    """Answer tasks until the parent closes its end or dies."""
    while True:
        if not conn.poll(_PARENT_CHECK_S):
            if os.getppid() != parent_pid:  # re-parented: the daemon is gone
                return
            continue
        try:
            function, args = conn.recv()
        except EOFError:
            return
        except Exception:  # an unpicklable task: tell the parent, keep serving
            reply: tuple[Any, ...] = ("error", traceback.format_exc(limit=5))
            retire = False
        else:
            reply, retire = run_task(function, args)
        try:
            conn.send(reply)
        except MemoryError:
            # Pickling the result needed more than the cap left; nothing was sent yet.
            conn.send(("oom", "the result did not fit in the worker's memory cap"))
            retire = True
        except OSError:
            return
        if retire:
            return


def main(argv: Sequence[str]) -> int:
    fd, parent_pid, max_bytes, *preload = argv
    die_with_parent(int(parent_pid))
    # The daemon handles Ctrl-C; a worker in the same process group must not print a KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(fd))
    for module in preload:
        importlib.import_module(module)
    baseline = vm_size_bytes()
    if baseline >= int(max_bytes):
        with contextlib.suppress(OSError):
            conn.send(("failed", f"the memory cap {int(max_bytes)} B is below a worker's baseline of {baseline} B"))
        return EXIT_CAP_TOO_LOW
    cap_memory(int(max_bytes))
    conn.send(("ready", os.getpid(), baseline))
    serve(conn, int(parent_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
