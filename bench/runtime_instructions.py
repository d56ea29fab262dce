"""Instructions per event of each side of `runtime_overhead.py`, counted by callgrind: a figure that this
machine's run-to-run spread (the plain loop alone ranges 23,000-29,000 events/s, 26-34 µs of CPU per event)
does not move.

Each side runs once, in a process of its own under `valgrind --tool=callgrind --instr-atstart=no` (the broker
and S3 are child processes valgrind does not follow), through `runtime_overhead.one_run`: fresh topics, N events
produced first, the same settings. Instrumentation is switched on when the first `getmany()` returns records and
off when the commit covering all N returns (the probe of `runtime_overhead.py`), so the count is exactly that
benchmark's timed window: every thread of the process, the side's own code, aiokafka, the event loop, the crash
guard's S3 writes. Callgrind slows the process ~50 times; the broker's timeouts are long enough for it.

Instructions are not time: the plain loop spends more of its instructions in C (json's encoder and scanner), which
runs more instructions per cycle than the interpreter loop that most of the daemon's run in. `runtime_overhead.py`
measures time; this says how much of the gap is work and how much is the kind of work.

    PYTHONPATH=. .venv/bin/python bench/runtime_instructions.py            # both sides, ~3 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.runtime_overhead import SIDES, Probe, Side, machine_info, one_run
from ocrbooth.daemon import eventloop
from ocrbooth.dev.embedded import EmbeddedStack

_TOTALS = re.compile(rb"^totals: (\d+)", re.MULTILINE)  # "summary:" counts from the start (0 here)


def callgrind_totals(data: bytes) -> int:
    """The instruction count of a callgrind output file: its `totals:` line (its `summary:` line counts from the
    start of the process, with instrumentation off there: 0)."""
    found = _TOTALS.search(data)
    if found is None:
        raise ValueError("no `totals:` line in the callgrind output")
    return int(found.group(1))


def _toggle(on: bool) -> None:
    """Switch callgrind's instrumentation of this process on or off (blocks until it has)."""
    subprocess.run(
        ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], check=True, capture_output=True
    )


class _CountingProbe(Probe):
    """The benchmark's probe, switching instrumentation on at the first records and off at the last commit."""

    def _fetched(self, batch: Any) -> None:
        first = self.first_fetch is None and bool(batch)
        super()._fetched(batch)
        if first:
            _toggle(True)

    def _committed(self, offsets: Any) -> None:
        done = self.last_commit is not None
        super()._committed(offsets)
        if not done and self.last_commit is not None:
            _toggle(False)


async def _child(side: Side, args: argparse.Namespace) -> dict[str, Any]:
    """One run of `side` (inside valgrind): its requests and events, for the parent's report."""
    with tempfile.TemporaryDirectory(prefix="ocrbooth-instr-") as tmp:
        stack = EmbeddedStack(Path(tmp), storage=args.storage, topics={})
        await asyncio.to_thread(stack.start)
        try:
            result, _ = await one_run(stack, side, 0, args, probe_type=_CountingProbe)
        finally:
            await asyncio.to_thread(stack.stop)
    return {"events": result.events, "commits": result.commits, "requests": result.requests}


def _count(side: Side, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Run `side` under callgrind in a child process; its instructions in the window, per event."""
    out = tmp / f"callgrind.{side}"
    info = tmp / f"{side}.json"
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, __file__, "--child", side, "--child-out", str(info),
        "--events", str(args.events), "--partitions", str(args.partitions),
        "--max-in-flight", str(args.max_in_flight), "--storage", args.storage,
        *(f"--set={k}={v}" for k, v in args.overrides.items()),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=1800)
    instructions = callgrind_totals(out.read_bytes())
    run = json.loads(info.read_text())
    return {**run, "instructions": instructions, "instructions_per_event": round(instructions / run["events"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=10_000, help="events per run (default 10000)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--max-in-flight", type=int, default=2000)
    parser.add_argument("--storage", choices=("s3", "memory"), default="s3")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="runtime_instructions")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OCRBOOTH_KEY=VALUE",
        help="a daemon setting for both sides (repeatable), as runtime_overhead.py's --set",
    )
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.overrides = dict(item.split("=", 1) for item in args.set)
    if any(not key.startswith("OCRBOOTH_") for key in args.overrides):
        parser.error("--set takes OCRBOOTH_KEY=VALUE")
    if args.child:
        run = eventloop.run(_child(args.child, args), "auto")
        args.child_out.write_text(json.dumps(run))
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("runtime_instructions.py needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ocrbooth-instr-") as tmp:
        sides = {side: _count(side, args, Path(tmp)) for side in SIDES}
    plain, daemon = sides["plain"]["instructions_per_event"], sides["daemon"]["instructions_per_event"]
    report = {
        "benchmark": "runtime_instructions",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            **machine_info(args.storage, "auto"),
            "valgrind": _valgrind_version(),
            "python": platform.python_version(),
        },
        "config": {
            "events": args.events,
            "partitions": args.partitions,
            "max_in_flight": args.max_in_flight,
            "window": "runtime_overhead.py's: first getmany() with records -> commit() covering all N",
            "overrides": args.overrides,
        },
        "sides": sides,
        "instructions_per_event": {"plain": plain, "daemon": daemon},
        "ratio_plain_to_daemon": round(plain / daemon, 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"instructions per event: plain {plain:,}, daemon {daemon:,}; plain / daemon {plain / daemon:.3f}")
    print(f"wrote {path}")
    return 0


def _valgrind_version() -> str:
    return subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
