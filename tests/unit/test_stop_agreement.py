"""Under DDP the ranks agree on one step to stop at, whichever of them saw the signal (real gloo group, 2 ranks)."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from ocrbooth.models.dreambooth.callbacks import StopAgreement  # noqa: E402

STEPS = 12
# (the step from which each signalled rank sees its SIGTERM, the step every rank must stop at)
SCENARIOS: list[tuple[dict[int, int], int | None]] = [
    ({0: 3}, 3),  # the daemon's SIGTERM reached rank 0 only
    ({1: 5}, 5),  # ... or rank 1 only
    ({0: 7, 1: 4}, 4),  # both, at different steps: the first wins everywhere
    ({}, None),  # nobody: training runs to the end
]


def _rank(rank: int, port: int, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        agree = StopAgreement()
        agree.join()
        for index, (signalled, _) in enumerate(SCENARIOS):
            stopped_at = None
            for step in range(1, STEPS + 1):
                local = rank in signalled and step >= signalled[rank]  # a signal stays seen once it came
                if agree(local):
                    stopped_at = step
                    break
            results[(index, rank)] = stopped_at
    finally:
        dist.destroy_process_group()


def test_ranks_stop_at_the_same_step() -> None:
    """Every rank stops at the first step at which any rank had been signalled, and none stops unsignalled."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.start_processes(_rank, args=(port, results), nprocs=2, join=True, start_method="spawn")
    for index, (signalled, expected) in enumerate(SCENARIOS):
        assert (results[(index, 0)], results[(index, 1)]) == (expected, expected), signalled


def test_a_single_process_needs_no_group() -> None:
    """Without a process group the agreement is the local flag (the single-GPU path)."""
    agree = StopAgreement()
    agree.join()
    assert agree(True) is True
    assert agree(False) is False
