"""The CUDA-graph training step trains like the eager one, and the graphed class-image UNet samples like the
eager one.

Over the first 50 optimizer steps from the same seed (tiny SD on the GPU, bf16 autocast, clipping 1.0, a linear
LR schedule with warm-up, fused AdamW, channels-last on both sides), the per-step losses of the graphed step stay
within a stated tolerance of the eager step's, and so do the trained weights. Both sides run the same kernels on
the same inputs (the graph replays what the eager step launches, with the noise drawn from the same generator),
so they differ only by the GPU kernels' own nondeterminism (atomics in attention and convolution backward)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("pytorch_lightning")

from tests.gpu.tiny_training import train_tiny  # noqa: E402  (after the skips: it imports torch)

pytestmark = pytest.mark.gpu

STEPS = 50
# Per step: |graph - eager| <= ABS_TOL + REL_TOL * |eager|, and on average over the steps MEAN_REL_TOL.
ABS_TOL = 1e-3
REL_TOL = 1e-2
MEAN_REL_TOL = 2e-3
# Trained weights (L2 over all trainable tensors): |w_graph - w_eager| <= WEIGHT_TOL * |w_eager - w_start|, i.e. the
# two runs moved the weights the same way to within 5 % of how far they moved. A graph that does not train ends
# a whole `moved` away (relative gap 1.0).
WEIGHT_TOL = 0.05

# History (H100, 2026-12-07): with the text encoder trained the graphed step's weights once ended 6.15 % of `moved`
# from the eager step's, deterministically, while the losses tracked within 2.3e-4. The cause: transformers built
# CLIP's causal mask as a tensor while a CUDA stream captured, so the graph ran SDPA's masked kernel and eager its
# causal one (`models/dreambooth/text_attention.py` fixes it; bench/results/gpu_tests/README.md has the logs). The
# rerun after the fix passed all three cases with the plain tolerance (h100_graph_step_text_attention_fix.log).


@pytest.mark.parametrize(
    ("train_text_encoder", "accumulation"),
    [pytest.param(True, 2, id="te-trained-accum-2"), pytest.param(False, 1, id="te-frozen")],
)
def test_graph_step_losses_and_weights_track_the_eager_step(
    train_text_encoder: bool, accumulation: int, tmp_path: Path
) -> None:
    """Same seed, data and noise: the graphed step's losses stay within ABS_TOL + REL_TOL of eager's at every
    one of 50 steps (MEAN_REL_TOL on average), its weights end within WEIGHT_TOL of eager's relative to how far
    training moved them, the LR schedule ran the same, and the graphed run really replayed graphs."""
    from ocrbooth.models.dreambooth.module import StepOptions
    from ocrbooth.testing.tiny_sd import build_tiny_sd

    model_dir = build_tiny_sd(tmp_path / "tiny-sd")
    # Fused AdamW and channels-last on both sides: the runs differ in the graph alone.
    eager, graph = (
        train_tiny(
            model_dir,
            StepOptions(graph=use_graph),
            train_text_encoder=train_text_encoder,
            steps=STEPS,
            accumulation=accumulation,
            lr_scheduler="linear",
            lr_warmup_steps=5,
        )
        for use_graph in (False, True)
    )
    assert eager["step_kind"] == "eager"
    assert graph["step_kind"] == "graph"
    assert eager["global_step"] == graph["global_step"] == STEPS
    assert len(eager["losses"]) == len(graph["losses"]) == STEPS
    assert graph["lrs"] == eager["lrs"]
    assert graph["lrs"][0] < graph["lrs"][5]
    deviations = [abs(g - e) for g, e in zip(graph["losses"], eager["losses"], strict=True)]
    relative = [d / max(abs(e), 1e-6) for d, e in zip(deviations, eager["losses"], strict=True)]
    moved = float((eager["end"] - eager["start"]).norm())
    weight_gap = float((graph["end"] - eager["end"]).norm())
    report = {
        "train_text_encoder": train_text_encoder,
        "accumulation": accumulation,
        "max_abs_deviation": max(deviations),
        "mean_rel_deviation": sum(relative) / len(relative),
        "bitwise_equal_losses": deviations == [0.0] * STEPS,
        "weights_moved_l2": moved,
        "weights_gap_l2": weight_gap,
        "weights_gap_relative": weight_gap / moved,
        "eager_first_last": [eager["losses"][0], eager["losses"][-1]],
        "graph_first_last": [graph["losses"][0], graph["losses"][-1]],
    }
    out = os.environ.get("OCRBOOTH_GPU_REPORT_DIR")
    if out:
        name = f"graph_vs_eager_{'te_trained' if train_text_encoder else 'te_frozen'}.json"
        Path(out, name).write_text(json.dumps({**report, "eager": eager["losses"], "graph": graph["losses"]}, indent=1))
    print(json.dumps(report))
    assert moved > 0
    bad = [
        i for i, (d, e) in enumerate(zip(deviations, eager["losses"], strict=True)) if d > ABS_TOL + REL_TOL * abs(e)
    ]
    assert not bad, f"steps {bad[:5]} outside tolerance: {report}"
    assert report["mean_rel_deviation"] <= MEAN_REL_TOL, report
    assert report["weights_gap_relative"] <= WEIGHT_TOL, report


def test_graphed_class_image_unet_samples_like_the_eager_one(tmp_path: Path) -> None:
    """Three class images at batch 2 (the last batch padded) from the CUDA-graph UNet step and from the eager
    one, same seeds: one graph captured for all batches, and the pictures agree to within 3 grey levels on
    average (both sides run fused QKV and channels-last; cuDNN may pick other convolution algorithms)."""
    import numpy as np

    from ocrbooth.models.dreambooth.generate import load_pipeline
    from ocrbooth.models.dreambooth.prior import ClassImageSampler
    from ocrbooth.testing.tiny_sd import build_tiny_sd

    model_dir = build_tiny_sd(tmp_path / "tiny-sd")
    device = torch.device("cuda")
    kwargs = {"guidance_scale": 7.5, "num_inference_steps": 10, "resolution": 64, "batch_size": 2}
    pictures = {}
    for graph in (False, True):
        pipeline = load_pipeline(model_dir, device, torch.bfloat16, safety_checker=None, requires_safety_checker=False)
        sampler = ClassImageSampler(pipeline, device, graph=graph)
        pictures[graph] = sampler.sample("a photo of dog", [11, 12, 13], **kwargs)
        assert sampler.mode == ("graph" if graph else "eager")
        if graph:
            assert sampler.graphed is not None
            assert len(sampler.graphed.graphs) == 1
        sampler.close()
    assert len(pictures[True]) == len(pictures[False]) == 3
    for eager_image, graph_image in zip(pictures[False], pictures[True], strict=True):
        a = np.asarray(eager_image, dtype=np.float64)
        b = np.asarray(graph_image, dtype=np.float64)
        assert a.shape == b.shape == (64, 64, 3)
        assert a.std() > 1.0  # a picture, not a flat field
        assert np.abs(a - b).mean() <= 3.0, np.abs(a - b).mean()
