"""Locating the command-line tools the deploy checks run (installed into the venv by the `deploy` extra, or by
Debian packages for promtool and prometheus)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def tool(name: str) -> str:
    """Absolute path of `name`: the venv's bin directory first (pytest may run without the venv on PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed; `make install` installs it")
    return found


def run(
    *args: str, cwd: Path | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a tool and capture its output as text; on failure the assertion shows both streams."""
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done
