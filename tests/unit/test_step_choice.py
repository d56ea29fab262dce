"""Which training step runs where (CUDA graphs, torch.compile or eager), and how class images are batched."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")

from ocrbooth.models.dreambooth.module import StepOptions, choose_step
from ocrbooth.models.dreambooth.prior import even_batch

PLAIN = {"device_type": "cuda", "world_size": 1, "grad_scaler": False, "gradient_checkpointing": False}


def test_one_gpu_with_bf16_gets_the_graph_step_when_asked() -> None:
    assert choose_step(StepOptions(), **PLAIN)[0] == "graph"  # the default on one GPU
    assert choose_step(StepOptions(graph=True), **PLAIN)[0] == "graph"


@pytest.mark.parametrize(
    ("change", "reason_word"),
    [
        ({"device_type": "cpu"}, "CUDA"),
        ({"world_size": 2}, "DDP"),
        ({"grad_scaler": True}, "scaler"),
        ({"gradient_checkpointing": True}, "checkpointing"),
    ],
    ids=["cpu", "ddp", "fp16", "checkpointing"],
)
def test_where_a_graph_cannot_run_the_step_is_eager_and_says_why(change: dict[str, object], reason_word: str) -> None:
    kind, reason = choose_step(StepOptions(graph=True), **{**PLAIN, **change})  # type: ignore[arg-type]
    assert kind == "eager"
    assert reason_word in reason


def test_switches_pick_compile_or_eager_and_the_cpu_is_always_eager() -> None:
    assert choose_step(StepOptions(graph=False), **PLAIN) == ("eager", "CUDA graphs switched off")
    assert choose_step(StepOptions(compile=True), **PLAIN)[0] == "compiled"
    assert choose_step(StepOptions(compile=True), **{**PLAIN, "device_type": "cpu"})[0] == "eager"  # type: ignore[arg-type]
    assert choose_step(StepOptions.eager(), **PLAIN)[0] == "eager"


@pytest.mark.parametrize(
    ("count", "largest", "expected"),
    [(100, 32, 25), (64, 32, 32), (65, 32, 22), (3, 32, 3), (1, 32, 1), (33, 32, 17), (0, 32, 32), (7, 1, 1)],
)
def test_even_batch_makes_the_fewest_batches_with_the_least_padding(count: int, largest: int, expected: int) -> None:
    size = even_batch(count, largest)
    assert size == expected
    assert size <= largest
    if count:
        batches = -(-count // size)
        assert batches == -(-count // largest)  # no more batches than the largest size needs
        assert batches * size - count < batches  # padding: less than one image per batch
