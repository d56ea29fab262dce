"""Self-describing checkpoints: written locally, uploaded to S3, marked complete last, rotated, restored.

A checkpoint is a folder `step-000400/` holding

    unet.safetensors, text_encoder.safetensors (when trained)   weights (safetensors: nothing executes on load)
    optimizer.pt, lr_scheduler.pt, grad_scaler.pt (fp16 only)   torch.save'd state dicts of tensors and numbers
    rng.pt                                                       torch CPU/CUDA, numpy and python RNG states
    state.json                                                   step, data position, file sizes, versions
    config.json                                                  the resolved job configuration

uploaded to `jobs/{job_id}/checkpoints/step-000400/` and then marked complete by `step-000400/_COMPLETE`. Only
complete checkpoints are resumed from or counted by the rotation limit. Every `.pt` file is read back with
`torch.load(weights_only=True)`, so RNG states are stored as tensors and plain lists.

The functions on listings (`scan`, `latest_complete`, `to_delete`) are pure, for unit tests.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ocrbooth.models.dreambooth import job_prefix
from ocrbooth.models.dreambooth.checkpoint_names import (
    COMPLETE_MARKER,
    CheckpointRef,
    checkpoint_name,
    latest_complete,
    scan,
    to_delete,
)
from ocrbooth.models.dreambooth.data import S3Objects

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
UNET_FILE = "unet.safetensors"
TEXT_ENCODER_FILE = "text_encoder.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
LR_SCHEDULER_FILE = "lr_scheduler.pt"
GRAD_SCALER_FILE = "grad_scaler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"

# ---- RNG states ----------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Every global RNG state, as tensors and plain lists (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, state, gauss_next = random.getstate()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": [int(v) for v in state], "gauss_next": gauss_next},
    }


def restore_rng(saved: Mapping[str, Any]) -> None:
    """Put back the RNG states `capture_rng` returned (CUDA states only for devices present)."""
    torch.set_rng_state(saved["torch_cpu"])
    cuda = list(saved.get("torch_cuda") or [])
    if cuda and torch.cuda.is_available():
        for device, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)
    np_state = saved["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    py = saved["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss_next"]))


# ---- local folders -------------------------------------------------------------------------------------------


def _cpu_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}


def save_checkpoint(
    directory: Path,
    *,
    step: int,
    unet: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor] | None,
    optimizer: Mapping[str, Any],
    lr_scheduler: Mapping[str, Any],
    grad_scaler: Mapping[str, Any] | None,
    rng: Mapping[str, Any],
    data: Mapping[str, Any],
    config: Mapping[str, Any],
) -> Path:
    """Write a checkpoint folder (replacing any earlier one of that name); return it."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    save_file(_cpu_weights(unet), str(directory / UNET_FILE))
    if text_encoder is not None:
        save_file(_cpu_weights(text_encoder), str(directory / TEXT_ENCODER_FILE))
    torch.save(dict(optimizer), directory / OPTIMIZER_FILE)
    torch.save(dict(lr_scheduler), directory / LR_SCHEDULER_FILE)
    if grad_scaler is not None:
        torch.save(dict(grad_scaler), directory / GRAD_SCALER_FILE)
    torch.save(dict(rng), directory / RNG_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir())}
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "data": dict(data),
        "files": files,
        "torch_version": torch.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    return directory


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder on local disk; each part is read on demand with safe loaders only."""

    directory: Path
    step: int
    data: dict[str, Any]
    config: dict[str, Any]

    def _pt(self, name: str) -> dict[str, Any]:
        loaded: dict[str, Any] = torch.load(self.directory / name, map_location="cpu", weights_only=True)
        return loaded

    def unet(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.directory / UNET_FILE))

    def text_encoder(self) -> dict[str, torch.Tensor] | None:
        path = self.directory / TEXT_ENCODER_FILE
        return load_file(str(path)) if path.is_file() else None

    def optimizer(self) -> dict[str, Any]:
        return self._pt(OPTIMIZER_FILE)

    def lr_scheduler(self) -> dict[str, Any]:
        return self._pt(LR_SCHEDULER_FILE)

    def grad_scaler(self) -> dict[str, Any] | None:
        return self._pt(GRAD_SCALER_FILE) if (self.directory / GRAD_SCALER_FILE).is_file() else None

    def rng(self) -> dict[str, Any]:
        return self._pt(RNG_FILE)


def load_checkpoint(directory: Path) -> Checkpoint:
    """Open a checkpoint folder, checking that every file listed in state.json is there at its size."""
    state = json.loads((directory / STATE_FILE).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format {state.get('format_version')}, expected {FORMAT_VERSION}")
    for name, size in state["files"].items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            raise ValueError(f"{directory}: {name} is missing or truncated")
    config = json.loads((directory / CONFIG_FILE).read_text())
    return Checkpoint(directory, int(state["step"]), dict(state["data"]), config)


# ---- S3 --------------------------------------------------------------------------------------------------------


class CheckpointStore:
    """The job's checkpoints in S3, under `jobs/{job_id}/checkpoints/` of the configured bucket."""

    def __init__(self, s3: S3Objects, job_id: str) -> None:
        self.s3 = s3
        self.bucket = s3.bucket
        self.prefix = f"{job_prefix(job_id)}checkpoints/"

    def uri(self, step: int) -> str:
        return self.s3.uri(f"{self.prefix}{checkpoint_name(step)}/")

    def refs(self) -> list[CheckpointRef]:
        return scan((o.key for o in self.s3.list_objects(self.bucket, self.prefix)), self.prefix)

    def upload(self, local: Path, step: int) -> str:
        """Upload a local checkpoint folder, then write its `_COMPLETE` marker; return its URI."""
        folder = f"{self.prefix}{checkpoint_name(step)}/"
        keys = self.s3.upload_dir(local, self.bucket, folder)
        marker = {"step": step, "files": [k[len(folder) :] for k in keys]}
        self.s3.put(folder + COMPLETE_MARKER, json.dumps(marker).encode(), bucket=self.bucket)
        return self.uri(step)

    def rotate(self, limit: int) -> list[str]:
        """Delete what `to_delete` names; return the names deleted."""
        victims = to_delete(self.refs(), limit)
        for ref in victims:
            keys = [o.key for o in self.s3.list_objects(self.bucket, f"{self.prefix}{ref.name}/")]
            # The marker goes first, so a half-deleted checkpoint is never taken for a complete one.
            markers = [k for k in keys if k.endswith("/" + COMPLETE_MARKER)]
            for batch in (markers, [k for k in keys if k not in markers]):
                if batch:
                    self.s3.delete(self.bucket, batch)
        if victims:
            log.info("checkpoints rotated", extra={"deleted": [r.name for r in victims]})
        return [r.name for r in victims]

    def download_latest(self, dest: Path) -> Checkpoint | None:
        """Download the newest complete checkpoint of this job into `dest`/step-N; None when there is none."""
        ref = latest_complete(self.refs())
        if ref is None:
            return None
        local = dest / ref.name
        shutil.rmtree(local, ignore_errors=True)
        self.s3.download_prefix(self.bucket, f"{self.prefix}{ref.name}/", local)
        (local / COMPLETE_MARKER).unlink(missing_ok=True)
        log.info("checkpoint downloaded", extra={"step": ref.step, "uri": self.uri(ref.step)})
        return load_checkpoint(local)
