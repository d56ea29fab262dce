"""Probe, not a test (run by hand on a GPU): which factor makes the CUDA-graph training step's weights drift from
the eager step's (`test_graph_step.py`'s known te-trained gap): the text encoder trained, gradient accumulation,
or both; and in which module (UNet or text encoder) the gap sits. 30 steps of the tiny SD per case, graph and
eager from the same seed; per module, |w_graph - w_eager| / |w_eager - w_start|.

    PYTHONPATH=. python tests/gpu/probe_graph_gap.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from ocrbooth.models.dreambooth.module import StepOptions, load_components
from ocrbooth.testing.tiny_sd import build_tiny_sd
from tests.gpu.tiny_training import train_tiny

CASES = ((True, 1), (True, 2), (False, 1), (False, 2))  # (text encoder trained, accumulation)


def main() -> int:
    model_dir = build_tiny_sd(Path(tempfile.mkdtemp()) / "tiny-sd")
    n_unet = sum(p.numel() for p in load_components(model_dir).unet.parameters())
    for te, acc in CASES:
        eager, graph = (
            train_tiny(
                model_dir,
                StepOptions(graph=g),
                train_text_encoder=te,
                steps=30,
                accumulation=acc,
                lr_scheduler="linear",
                lr_warmup_steps=5,
            )
            for g in (False, True)
        )
        row: dict[str, object] = {"te_trained": te, "acc": acc, "kinds": [eager["step_kind"], graph["step_kind"]]}
        for part, cut in (("all", slice(None)), ("unet", slice(0, n_unet)), ("te", slice(n_unet, None))):
            moved = float((eager["end"][cut] - eager["start"][cut]).norm())
            if moved:
                row[part] = round(float((graph["end"][cut] - eager["end"][cut]).norm()) / moved, 5)
        row["loss_max_dev"] = max(abs(a - b) for a, b in zip(eager["losses"], graph["losses"], strict=True))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
