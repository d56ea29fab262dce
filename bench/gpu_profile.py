"""Where a GPU benchmark's time goes: a torch.profiler run summarised per step (wall time, kernel time, launches,
the top kernels and host-side ops), shared by the DreamBooth and OCR benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def summarise(prof: Any, label: str, steps: int, wall_s: float, rows: int = 16) -> dict[str, Any]:
    """Per step: wall time, time the GPU spent in kernels (and copies), kernel and graph launches; the top
    kernels by GPU time and the top host-side ops by CPU time."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    on_gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    kernel_ms = sum(e.self_device_time_total for e in on_gpu) / 1e3
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    graph_launches = sum(e.count for e in events if "GraphLaunch" in e.key)
    top = sorted(on_gpu, key=lambda e: e.self_device_time_total, reverse=True)[:rows]
    cpu_top = sorted(
        (e for e in events if e.device_type == DeviceType.CPU), key=lambda e: e.self_cpu_time_total, reverse=True
    )[:10]
    return {
        "label": label,
        "steps": steps,
        "wall_ms_per_step": round(wall_s * 1e3 / steps, 2),
        "gpu_kernel_ms_per_step": round(kernel_ms / steps, 2),
        "gpu_busy_fraction": round(kernel_ms / 1e3 / wall_s, 3),
        "kernel_launches_per_step": round(launches / steps, 1),
        "graph_launches_per_step": round(graph_launches / steps, 2),
        "top_gpu_kernels": [
            {"name": e.key[:100], "ms_per_step": round(e.self_device_time_total / 1e3 / steps, 3), "calls": e.count}
            for e in top
        ],
        "top_cpu_ops": [
            {"name": e.key[:100], "ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3), "calls": e.count}
            for e in cpu_top
        ],
    }


def profile_call(
    fn: Callable[[], Any], label: str, steps: int, sync: Callable[[], None], trace: Path | None = None
) -> dict[str, Any]:
    """`summarise` of one call of `fn` that runs `steps` steps (`sync` waits for the device before and after);
    with `trace`, the run's Chrome trace is written there too (open it in Perfetto)."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - started
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    return summarise(prof, label, steps, wall)
