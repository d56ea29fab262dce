"""Checkpoint listings, rotation and local round trips: which checkpoints are kept, resumed from, and restored."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from ocrbooth.models.dreambooth.checkpoint_names import (
    COMPLETE_MARKER,
    CheckpointRef,
    checkpoint_name,
    latest_complete,
    parse_step,
    scan,
    to_delete,
)

PREFIX = "jobs/j/checkpoints/"


def keys_for(complete: list[int], incomplete: tuple[int, ...] = ()) -> list[str]:
    """Object keys of checkpoints at the given steps, with or without their marker."""
    keys = []
    for step in complete:
        keys += [f"{PREFIX}{checkpoint_name(step)}/unet.safetensors", f"{PREFIX}{checkpoint_name(step)}/_COMPLETE"]
    for step in incomplete:
        keys.append(f"{PREFIX}{checkpoint_name(step)}/unet.safetensors")
    return keys


def test_names_sort_numerically() -> None:
    """step-1000000 comes after step-999999, whatever the string order says."""
    assert checkpoint_name(400) == "step-000400"
    assert checkpoint_name(1_000_000) == "step-1000000"
    assert parse_step("step-1000000") == 1_000_000
    assert parse_step("step-12") is None
    assert parse_step("logs") is None
    refs = scan(keys_for([1_000_000, 999_999, 2]), PREFIX)
    assert [r.step for r in refs] == [2, 999_999, 1_000_000]
    assert latest_complete(refs) == CheckpointRef(1_000_000, "step-1000000", True)


def test_scan_marks_only_folders_with_the_marker_complete() -> None:
    """A folder is complete only when its _COMPLETE object exists; stray keys are ignored."""
    keys = [*keys_for([2], (4,)), f"{PREFIX}README", f"{PREFIX}other/{COMPLETE_MARKER}", "jobs/k/checkpoints/x"]
    assert scan(keys, PREFIX) == [CheckpointRef(2, "step-000002", True), CheckpointRef(4, "step-000004", False)]


def test_incomplete_checkpoint_is_never_resumed_from() -> None:
    """The newest folder without a marker loses to an older complete one; none complete means none."""
    assert latest_complete(scan(keys_for([2, 4], (6, 8)), PREFIX)) == CheckpointRef(4, "step-000004", True)
    assert latest_complete(scan(keys_for([], (2,)), PREFIX)) is None


def test_rotation_keeps_the_newest_n_complete() -> None:
    """With limit 3, of 2, 4, 6, 8 only 2 goes."""
    refs = scan(keys_for([2, 4, 6, 8]), PREFIX)
    assert [r.step for r in to_delete(refs, 3)] == [2]
    assert to_delete(refs, 4) == []
    assert [r.step for r in to_delete(refs, 1)] == [2, 4, 6]


def test_incomplete_checkpoints_do_not_count_toward_the_limit() -> None:
    """An incomplete newer folder neither pushes out a complete one nor is deleted; older leftovers are."""
    refs = scan(keys_for([4, 6, 8], (3, 10)), PREFIX)
    deleted = to_delete(refs, 3)
    assert [(r.step, r.complete) for r in deleted] == [(3, False)]
    assert to_delete(scan(keys_for([], (2, 4)), PREFIX), 1) == []


def test_rng_states_round_trip_through_weights_only_loading(tmp_path: Path) -> None:
    """RNG states saved in a checkpoint load with weights_only and restore every generator exactly."""
    torch = pytest.importorskip("torch")
    from ocrbooth.models.dreambooth.checkpoints import capture_rng, load_checkpoint, restore_rng, save_checkpoint

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian behind
    unet = {"w": torch.randn(3, 4)}
    saved_rng = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    folder = save_checkpoint(
        tmp_path / checkpoint_name(6),
        step=6,
        unet=unet,
        text_encoder=None,
        optimizer={"state": {0: {"step": torch.tensor(6.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        lr_scheduler={"last_epoch": 6, "lr_lambdas": [None], "base_lrs": [0.1]},
        grad_scaler=None,
        rng=saved_rng,
        data={"consumed_examples": 12},
        config={"signature": {"seed": 0}},
    )
    checkpoint = load_checkpoint(folder)
    assert checkpoint.step == 6
    assert checkpoint.data == {"consumed_examples": 12}
    assert checkpoint.config == {"signature": {"seed": 0}}
    assert torch.equal(checkpoint.unet()["w"], unet["w"])
    assert checkpoint.text_encoder() is None
    assert checkpoint.grad_scaler() is None
    assert checkpoint.optimizer()["param_groups"][0]["lr"] == 0.1
    assert checkpoint.lr_scheduler()["last_epoch"] == 6
    restore_rng(checkpoint.rng())
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(again[0], expected[0])
    assert np.array_equal(again[1], expected[1])
    assert again[2] == expected[2]


def test_truncated_checkpoint_is_rejected(tmp_path: Path) -> None:
    """A file shorter than state.json says makes the folder unloadable."""
    torch = pytest.importorskip("torch")
    from ocrbooth.models.dreambooth.checkpoints import capture_rng, load_checkpoint, save_checkpoint

    folder = save_checkpoint(
        tmp_path / "step-000002",
        step=2,
        unet={"w": torch.zeros(2)},
        text_encoder=None,
        optimizer={},
        lr_scheduler={},
        grad_scaler=None,
        rng=capture_rng(),
        data={},
        config={},
    )
    (folder / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(folder)


def test_sampler_resumed_mid_stream_draws_what_an_uninterrupted_one_would() -> None:
    """The example order depends on position only: a sampler started at position p continues the stream."""
    pytest.importorskip("torch")
    from ocrbooth.models.dreambooth.data import StepSampler, epoch_order

    whole = list(StepSampler(5, seed=3, start=0, count=12, batch_size=2))
    assert whole[:5] == epoch_order(5, 3, 0)
    assert sorted(whole[5:10]) == list(range(5))
    tail = list(StepSampler(5, seed=3, start=8, count=8, batch_size=2))
    assert tail == whole[8:]
    ranks = [list(StepSampler(5, seed=3, start=0, count=6, batch_size=2, rank=r, world_size=2)) for r in (0, 1)]
    interleaved = [i for m in range(6) for r in (0, 1) for i in ranks[r][2 * m : 2 * m + 2]]
    assert interleaved == whole
