"""Local directories the CLI and the development stack write to: made and proven writable before any work."""

from __future__ import annotations

import os
from pathlib import Path


def ensure_writable_dir(path: Path) -> None:
    """Create `path` (and its parents) and write and remove a probe file in it; OSError when either fails, so a
    caller can say so in one line before it starts anything that would fail later with a less clear error."""
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".ocrbooth-write-probe-{os.getpid()}"
    probe.touch()
    probe.unlink()
