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
measures time; this says how much of the gap is work and how much is the kind of work. `--sim` adds valgrind's
cache and branch simulation (L1 and, standing for this machine's per-core L2, a 2 MiB last level; conditional and
indirect branch mispredictions): per event, the misses that make the same instructions take more cycles (this VM
has no hardware counters for `perf`). `--keep DIR` keeps each side's callgrind file for `callgrind_annotate`.
Neither counts the kernel's time (system calls, thread wake-ups): `runtime_overhead.py` reports that part of the
CPU time per event.

    PYTHONPATH=. .venv/bin/python bench/runtime_instructions.py            # both sides, ~3 minutes
    PYTHONPATH=. .venv/bin/python bench/runtime_instructions.py --sim      # with cache and branch misses, ~5 minutes
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
_TOTALS_ALL = re.compile(rb"^totals:((?: \d+)+)", re.MULTILINE)
_EVENTS = re.compile(rb"^events:((?: \w+)+)", re.MULTILINE)
# With --sim: valgrind's cache model with the last level set to this machine's per-core L2 (2 MiB, 16 ways):
# its L3 (260 MiB, shared) would count no misses at all, and an L2 miss is what costs an L3 round trip here.
_SIM_OPTIONS = ("--cache-sim=yes", "--branch-sim=yes", "--LL=2097152,16,64")


def callgrind_totals(data: bytes) -> int:
    """The instruction count of a callgrind output file: its `totals:` line (its `summary:` line counts from the
    start of the process, with instrumentation off there: 0)."""
    found = _TOTALS.search(data)
    if found is None:
        raise ValueError("no `totals:` line in the callgrind output")
    return int(found.group(1))


def callgrind_events(data: bytes) -> dict[str, int]:
    """Every event's total in a callgrind output file (`events:` names them, `totals:` counts them): Ir alone, or
    with --sim the cache misses (I1mr, D1mr, D1mw, ILmr, DLmr, DLmw) and branches (Bc, Bcm, Bi, Bim) too."""
    names, totals = _EVENTS.search(data), _TOTALS_ALL.search(data)
    if names is None or totals is None:
        raise ValueError("no `events:` or `totals:` line in the callgrind output")
    counts = [int(n) for n in totals.group(1).split()]
    return {name.decode(): count for name, count in zip(names.group(1).split(), counts, strict=False)}


_ANNOTATE_VALUE = re.compile(r"\s*(?:([\d,]+)(?: \(\s*[\d.]+%\))?|\.)(?=\s)")
_SIM_TOP = ("I1mr", "D1mr", "DLmr")  # the misses listed by function with --sim
_SIM_SHOWN = ("Ir", "I1mr", "D1mr", "D1mw", "DLmr", "DLmw")


def annotate_rows(text: str, events: int) -> list[tuple[list[int], str]]:
    """The function rows of `callgrind_annotate` output: each one's `events` counts ("." is 0) and its name, the
    build paths before the source file and the library in brackets shortened to file names."""
    rows: list[tuple[list[int], str]] = []
    body = text.split("file:function", 1)[-1]
    for line in body.splitlines():
        values: list[int] = []
        at = 0
        for _ in range(events):
            found = _ANNOTATE_VALUE.match(line, at)
            if found is None:
                break
            values.append(int(found.group(1).replace(",", "")) if found.group(1) else 0)
            at = found.end()
        name = line[at:].strip()
        if len(values) < events or not name or name.startswith("-"):
            continue
        function, _, library = name.partition(" [")
        source, _, symbol = function.rpartition(":")
        short = f"{Path(source).name}:{symbol}" if source else symbol
        rows.append((values, f"{short} [{Path(library.rstrip(']')).name}]" if library else short))
    return rows


def _top_functions(path: Path, events: int, n: int = 10) -> dict[str, list[dict[str, Any]]]:
    """Per miss kind of _SIM_TOP, the `n` functions with the most of it (their own, not their callees'), per event."""
    shown = ",".join(_SIM_SHOWN)
    top: dict[str, list[dict[str, Any]]] = {}
    for kind in _SIM_TOP:
        text = subprocess.run(
            ["callgrind_annotate", "--inclusive=no", f"--sort={kind}", f"--show={shown}", str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        top[kind] = [
            {"function": name, **{e: round(v / events, 1) for e, v in zip(_SIM_SHOWN, values, strict=True)}}
            for values, name in annotate_rows(text, len(_SIM_SHOWN))[:n]
        ]
    return top


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
        *(_SIM_OPTIONS if args.sim else ()),
        sys.executable, __file__, "--child", side, "--child-out", str(info),
        "--events", str(args.events), "--partitions", str(args.partitions),
        "--max-in-flight", str(args.max_in_flight), "--storage", args.storage,
        *(f"--set={k}={v}" for k, v in args.overrides.items()),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=1800)
    data = out.read_bytes()
    instructions = callgrind_totals(data)
    run = json.loads(info.read_text())
    counted = {**run, "instructions": instructions, "instructions_per_event": round(instructions / run["events"])}
    if args.sim:
        counted["per_event"] = {name: round(n / run["events"], 1) for name, n in callgrind_events(data).items()}
        counted["top_functions_per_event"] = _top_functions(out, run["events"])
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        (args.keep / out.name).write_bytes(data)
    return counted


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
    parser.add_argument(
        "--sim",
        action="store_true",
        help="also simulate caches and branches (misses and mispredicts per event; ~2x slower)",
    )
    parser.add_argument("--side", choices=SIDES, help="count this side only (printed, no JSON written)")
    parser.add_argument("--keep", type=Path, help="copy each side's callgrind output file into this folder")
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
        sides = {side: _count(side, args, Path(tmp)) for side in ((args.side,) if args.side else SIDES)}
    if args.side:  # a quick look at one side: printed, not written
        print(json.dumps(sides, indent=2))
        return 0
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
            "simulated": " ".join(_SIM_OPTIONS) if args.sim else "no",
        },
        "sides": sides,
        "instructions_per_event": {"plain": plain, "daemon": daemon},
        "ratio_plain_to_daemon": round(plain / daemon, 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"instructions per event: plain {plain:,}, daemon {daemon:,}; plain / daemon {plain / daemon:.3f}")
    if args.sim:
        for side in SIDES:
            print(f"{side}: " + ", ".join(f"{k} {v:,.0f}" for k, v in sides[side]["per_event"].items()))
    print(f"wrote {path}")
    return 0


def _valgrind_version() -> str:
    return subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
