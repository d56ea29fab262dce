"""Probe, not a test (run by hand on a GPU): with the text encoder trained, accumulation 1 and 30 steps, how far the
CUDA-graph step's weights end from the eager step's and from an eager step without cuDNN attention
(`sdpa_kernel([FLASH, EFFICIENT, MATH])`), per module, relative to how far training moved them. Written to test
whether the capture had fallen back to attention without cuDNN; it had not (the graph ends further from the
no-cuDNN step): bench/results/gpu_tests/h100_graph_step_gap_cudnn_probe.log. The cause was transformers' mask
code (`ocrbooth/models/dreambooth/text_attention.py`).

    PYTHONPATH=. python tests/gpu/probe_graph_gap_cudnn.py
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

from torch.nn.attention import SDPBackend, sdpa_kernel

from ocrbooth.models.dreambooth.module import StepOptions, load_components
from ocrbooth.testing.tiny_sd import build_tiny_sd
from tests.gpu.tiny_training import train_tiny


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="LOG %(name)s %(levelname)s %(message)s")
    logging.getLogger("ocrbooth").setLevel(logging.INFO)  # which step each run took
    model_dir = build_tiny_sd(Path(tempfile.mkdtemp()) / "tiny-sd")
    n_unet = sum(p.numel() for p in load_components(model_dir).unet.parameters())
    kw = {"train_text_encoder": True, "steps": 30, "accumulation": 1, "lr_scheduler": "linear", "lr_warmup_steps": 5}
    graph = train_tiny(model_dir, StepOptions(graph=True), **kw)  # type: ignore[arg-type]
    eager = train_tiny(model_dir, StepOptions(graph=False), **kw)  # type: ignore[arg-type]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        eager_no_cudnn = train_tiny(model_dir, StepOptions(graph=False), **kw)  # type: ignore[arg-type]
    for name, other in (("eager", eager), ("eager_no_cudnn", eager_no_cudnn)):
        row: dict[str, object] = {"vs": name}
        for part, cut in (("all", slice(None)), ("unet", slice(0, n_unet)), ("te", slice(n_unet, None))):
            moved = float((other["end"][cut] - other["start"][cut]).norm())
            row[part] = round(float((graph["end"][cut] - other["end"][cut]).norm()) / moved, 6)
        row["loss_max_dev"] = max(abs(a - b) for a, b in zip(other["losses"], graph["losses"], strict=True))
        print("GAP", json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
