"""Checkpoint folders by name: `step-000400/`, complete once `_COMPLETE` is written (last), which one a resume
starts from, which ones rotation removes. Pure: no torch, so the listing logic is tested anywhere."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

COMPLETE_MARKER = "_COMPLETE"  # written last: a checkpoint without it is ignored

_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_name(step: int) -> str:
    """`step-000400`: zero-padded to six digits (more digits past 999999; sorting is by number anyway)."""
    return f"step-{step:06d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint folder name, or None for anything else."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, order=True)
class CheckpointRef:
    """A checkpoint folder seen in a listing."""

    step: int
    name: str
    complete: bool


def scan(keys: Iterable[str], prefix: str = "") -> list[CheckpointRef]:
    """Checkpoint folders among object keys under `prefix`, sorted by step (numerically)."""
    files: dict[str, set[str]] = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        folder, _, rest = key[len(prefix) :].partition("/")
        if rest and parse_step(folder) is not None:
            files.setdefault(folder, set()).add(rest)
    refs = [CheckpointRef(parse_step(name) or 0, name, COMPLETE_MARKER in names) for name, names in files.items()]
    return sorted(refs)


def latest_complete(refs: Iterable[CheckpointRef]) -> CheckpointRef | None:
    """The newest complete checkpoint; incomplete ones are never resumed from."""
    complete = [r for r in refs if r.complete]
    return max(complete) if complete else None


def to_delete(refs: Iterable[CheckpointRef], limit: int) -> list[CheckpointRef]:
    """What rotation removes: complete checkpoints beyond the newest `limit`, and incomplete leftovers older
    than the newest complete one (crashed uploads). Incomplete checkpoints never count toward the limit, and
    newer incomplete ones are left alone (an upload may be under way)."""
    ordered = sorted(refs)
    complete = [r for r in ordered if r.complete]
    if not complete:
        return []
    keep = set(complete[-limit:]) if limit > 0 else set()
    newest = complete[-1].step
    return [r for r in ordered if r not in keep and (r.complete or r.step < newest)]
