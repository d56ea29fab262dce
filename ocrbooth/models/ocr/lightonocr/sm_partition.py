"""A CUDA stream whose kernels run on at most N of the GPU's SMs (a CUDA green context).

Why: vision encoding and prefill are compute-bound and decoding is memory-bound, so in principle they share the
GPU well, but on a plain second stream they do not: the encoder's large GEMM and attention kernels fill every SM
with long-running blocks, and the decode step's kernels queue behind them (an H100 run of 256 pages x 500 tokens:
decode chunks with an admission beside them took 0.47 s against 0.13 s without, about the two run one after the
other; stream priorities did not change it). A green context gives the prefill stream a fixed share of the SMs;
decoding, on the primary context, may use every SM, so whatever prefill runs, decoding keeps the rest.

PyTorch's API for it changed between releases (`torch.cuda.green_contexts`, beta): from 2.12 a green context
hands out streams of its own (`GreenContext.Stream()`); before, it only has `set_context()`, which routes the
current thread's default stream into it. There a stream is created with the CUDA driver's `cuStreamCreate`
while the green context is current (so it belongs to it) and wrapped as a `torch.cuda.ExternalStream`, a stream
of its own to PyTorch's caching allocator as any side stream is.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch

_NON_BLOCKING = 1  # CU_STREAM_NON_BLOCKING: no implicit synchronisation with the legacy default stream


@dataclass(slots=True)
class PartitionedStream:
    """The stream, the green context it belongs to (kept alive with it) and the SMs it may use."""

    stream: Any
    context: Any
    sms: int


def sm_count(device: torch.device) -> int:
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def partitioned_stream(device: torch.device, sms: int) -> PartitionedStream:
    """A stream limited to `sms` SMs of `device` (the driver may round up to its partition granularity).
    Raises RuntimeError where green contexts are not available (PyTorch without them, CUDA < 12.8)."""
    total = sm_count(device)
    if not 0 < sms < total:
        raise ValueError(f"a partition needs between 1 and {total - 1} SMs of {total}, got {sms}")
    from torch.cuda import green_contexts

    if not getattr(green_contexts, "SUPPORTED", False):
        raise RuntimeError("this PyTorch build has no CUDA green contexts")
    index = device.index if device.index is not None else torch.cuda.current_device()
    context = green_contexts.GreenContext.create(num_sms=sms, device_id=index)
    maker = getattr(context, "Stream", None)
    if maker is not None:
        return PartitionedStream(maker(), context, sms)
    return PartitionedStream(_driver_stream(context, index), context, sms)


def _driver_stream(context: Any, index: int) -> Any:
    """A non-blocking stream created by the driver while `context` is current, as a PyTorch stream."""
    cuda = ctypes.CDLL("libcuda.so.1")
    handle = ctypes.c_void_p()
    with torch.cuda.device(index):
        context.set_context()
        try:
            status = cuda.cuStreamCreate(ctypes.byref(handle), ctypes.c_uint(_NON_BLOCKING))
        finally:
            context.pop_context()
    if status != 0 or not handle.value:
        raise RuntimeError(f"cuStreamCreate in a green context failed (CUresult {status})")
    external: Any = torch.cuda.ExternalStream  # untyped in PyTorch's stubs
    return external(handle.value, device=torch.device("cuda", index))


__all__ = ["PartitionedStream", "partitioned_stream", "sm_count"]
