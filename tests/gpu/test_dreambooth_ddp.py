"""The DreamBooth trainer under Lightning DDP on two GPUs, against a moto S3 server: a tiny job completes, with
rank 0 alone printing protocol lines and uploading checkpoints and the pipeline."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("pytorch_lightning")

from ocrbooth.models.dreambooth import EXIT_COMPLETED, PARENT_PID_ENV  # noqa: E402

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
BUCKET = "ocrbooth"
REGION = "us-east-1"
RUN_TIMEOUT_S = 240.0
MAX_STEPS = 6
WORLD_SIZE = 2
# NVLink multicast can put the host's shared GPUs out of service: kept off in every process started here.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
CHECKPOINT_FILES = {"_COMPLETE", "unet.safetensors", "text_encoder.safetensors", "optimizer.pt", "lr_scheduler.pt"}
CHECKPOINT_FILES |= {"rng.pt", "state.json", "config.json"}


@dataclass
class TrainerRun:
    """One finished trainer process: exit status, protocol lines, stderr (every rank's log) and wall time."""

    code: int
    events: list[dict[str, Any]]
    log: str
    seconds: float

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.splitlines()[-lines:])


@dataclass
class Setup:
    """What the runs of this module share: the S3 client, the trainer environment and a base request."""

    s3: Any
    env: dict[str, str]
    request: dict[str, Any]
    runs: Path

    def job(self) -> dict[str, Any]:
        return {**self.request, "job_id": f"ddp-{uuid.uuid4().hex[:12]}"}

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def json(self, key: str) -> Any:
        return json.loads(self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def run_trainer(
    job: dict[str, Any], env: dict[str, str], runs: Path, name: str, timeout_s: float = RUN_TIMEOUT_S
) -> TrainerRun:
    """`python -m ocrbooth.models.dreambooth.train JOB.json` in its own process group (rank 1 is rank 0's child),
    killed as a group at the deadline."""
    runs.mkdir(parents=True, exist_ok=True)
    job_file = runs / f"{name}.json"
    job_file.write_text(json.dumps({"request": job, "attempt": 1}))
    log_path = runs / f"trainer-{name}.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ocrbooth.models.dreambooth.train", str(job_file)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            code: int | None = None
        else:
            code = proc.returncode
    seconds = time.monotonic() - started
    text = log_path.read_text(errors="replace")
    assert code is not None, f"trainer still running after {timeout_s}s\n" + "\n".join(text.splitlines()[-60:])
    events = [json.loads(line) for line in out.decode().splitlines()]  # every stdout line is a protocol line
    return TrainerRun(code, events, text, seconds)


@pytest.fixture(scope="module")
def two_gpus() -> None:
    """Skip unless this machine has the two CUDA devices DDP is to spread over."""
    count = torch.cuda.device_count()
    if count < WORLD_SIZE:
        pytest.skip(f"DDP across {WORLD_SIZE} GPUs needs {WORLD_SIZE} CUDA devices; this machine has {count}")


@pytest.fixture(scope="module")
def s3_endpoint(two_gpus: None) -> Iterator[str]:
    """A moto S3 server on a free local port, for the whole module."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per S3 request drowns failures
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def setup(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """A tiny SD on local disk, the bucket with three instance images, and the trainer's environment."""
    import boto3
    from botocore.config import Config

    from ocrbooth.testing.tiny_sd import build_tiny_sd, make_instance_images

    root = tmp_path_factory.mktemp("ddp")
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=REGION,
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}),
    )
    s3.create_bucket(Bucket=BUCKET)
    for i, data in enumerate(make_instance_images(3)):
        s3.put_object(Bucket=BUCKET, Key=f"inputs/instance/{i}.png", Body=data)
    model = build_tiny_sd(root / "tiny-sd")
    request = {
        "base_model": str(model),
        "instance_images": [f"s3://{BUCKET}/inputs/instance/"],
        "instance_prompt": "a photo of sks dog",
        "with_prior_preservation": True,
        "class_prompt": "a photo of dog",
        "num_class_images": 2,
        "resolution": 64,
        "max_train_steps": MAX_STEPS,
        "checkpointing_steps": 2,
        "checkpoints_total_limit": 2,
        "learning_rate": 1e-3,
        "mixed_precision": "bf16",
        "seed": 7,
        "num_inference_steps": 2,
        "num_validation_images": 1,
        "guidance_scale": 2.0,
    }
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("OCRBOOTH_", "AWS_"))}
    env = inherited | credentials | NO_MULTICAST
    env |= {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "OCRBOOTH_S3_ENDPOINT_URL": s3_endpoint,
        "OCRBOOTH_S3_BUCKET": BUCKET,
        "OCRBOOTH_FINETUNE_DEVICES": str(WORLD_SIZE),
        "OCRBOOTH_FINETUNE_WORKDIR": str(root / "work"),
        "OCRBOOTH_FINETUNE_PROGRESS_EVERY_STEPS": "1",
        "OCRBOOTH_LOG_FORMAT": "console",
        "OCRBOOTH_FINETUNE_ALLOW_LOCAL_BASE_MODELS": "true",  # the tiny model is a local directory
        "HF_HUB_OFFLINE": "1",
    }
    return Setup(s3, env, request, root / "runs")


def test_ddp_job_completes_with_rank_zero_alone_speaking(setup: Setup) -> None:
    """Two ranks join one process group and train 6 steps; rank 0 alone prints (one `completed`, each
    checkpoint once) and uploads: exactly step-4 and step-6 remain complete, made by 2 devices, plus the pipeline."""
    job = setup.job()
    run = run_trainer(job, setup.env, setup.runs, "ddp")
    print(f"DDP trainer run: exit {run.code} in {run.seconds:.1f}s")
    assert run.code == EXIT_COMPLETED, run.tail()
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in run.log, run.tail()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in run.log, run.tail()

    kinds = run.kinds()
    assert kinds.count("completed") == 1, kinds
    assert kinds[:2] == ["class_images", "started"], kinds
    assert kinds[-2:] == ["samples", "completed"], kinds
    assert [p["step"] for p in run.of("progress")] == list(range(1, MAX_STEPS + 1))
    assert [c["step"] for c in run.of("checkpoint")] == [2, 4, 6]

    prefix = f"jobs/{job['job_id']}/checkpoints/"
    keys = setup.keys(prefix)
    folders = sorted({k[len(prefix) :].split("/")[0] for k in keys})
    assert folders == ["step-000004", "step-000006"], keys
    for folder in folders:
        names = {k.rsplit("/", 1)[1] for k in keys if k.startswith(f"{prefix}{folder}/")}
        assert names >= CHECKPOINT_FILES, (folder, sorted(names))
    config = setup.json(f"{prefix}step-000006/config.json")
    assert (config["accelerator"], config["devices"]) == ("gpu", WORLD_SIZE), config
    state = setup.json(f"{prefix}step-000006/state.json")
    # One example per rank per step: the data position counts both ranks' examples.
    assert state["data"]["consumed_examples"] == MAX_STEPS * WORLD_SIZE, state

    out = f"jobs/{job['job_id']}/output/"
    output = setup.keys(out)
    assert f"{out}pipeline/model_index.json" in output, output
    assert f"{out}pipeline/unet/diffusion_pytorch_model.safetensors" in output, output
    assert run.of("completed")[0]["artifacts"]["pipeline"] == f"s3://{BUCKET}/{out}pipeline/"


def test_ddp_job_launched_like_the_daemon_completes(setup: Setup) -> None:
    """With the daemon's parent-pid variable set (as `handlers/finetune.py` launches it), the DDP job completes
    too: rank 1, whose parent is rank 0 and not the daemon, must not take itself for an orphan."""
    job = setup.job()
    env = setup.env | {PARENT_PID_ENV: str(os.getpid())}
    run = run_trainer(job, env, setup.runs, "daemon", timeout_s=150.0)
    print(f"daemon-style DDP trainer run: exit {run.code} in {run.seconds:.1f}s")
    assert run.code == EXIT_COMPLETED, run.tail()
    assert run.kinds().count("completed") == 1, run.kinds()


def test_ddp_sigterm_stops_every_rank_at_one_checkpointed_step_and_the_job_resumes(setup: Setup) -> None:
    """SIGTERM to the trainer's process group (what the daemon's drain sends) at a random step after the first
    checkpoint: the ranks agree on one stop step, rank 0 writes a complete checkpoint of it, rank 0 exits 3
    (stopped) and rank 1 exits 0 well within the drain timeout, no process of the group is left, and a rerun (what
    the next daemon starts) resumes from exactly that step and completes."""
    import random

    from ocrbooth.models.dreambooth import EXIT_STOPPED

    steps = 40
    job = setup.job() | {"max_train_steps": steps, "checkpointing_steps": 4, "checkpoints_total_limit": 3}
    setup.runs.mkdir(parents=True, exist_ok=True)
    job_file = setup.runs / "sigterm.json"
    job_file.write_text(json.dumps({"request": job, "attempt": 1}))
    log_path = setup.runs / "trainer-sigterm.log"
    extra_steps = random.Random().randint(0, 6)
    events: list[dict[str, Any]] = []
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ocrbooth.models.dreambooth.train", str(job_file)],
            env=setup.env,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=REPO,
            start_new_session=True,  # as handlers/finetune.py starts it
        )
        assert proc.stdout is not None
        first_checkpoint: int | None = None
        signalled_at: float | None = None
        for raw in proc.stdout:
            event = json.loads(raw)
            events.append(event)
            if event["event"] == "checkpoint" and first_checkpoint is None:
                first_checkpoint = event["step"]
            if (
                signalled_at is None
                and first_checkpoint is not None
                and event["event"] == "progress"
                and event["step"] >= first_checkpoint + extra_steps
            ):
                os.killpg(proc.pid, signal.SIGTERM)
                signalled_at = time.monotonic()
        code = proc.wait(timeout=120)
        stopped_in = time.monotonic() - (signalled_at or time.monotonic())
    text = log_path.read_text(errors="replace")
    tail = "\n".join(text.splitlines()[-60:])
    assert signalled_at is not None, tail
    assert code == EXIT_STOPPED, tail
    assert stopped_in < 60, f"stopped {stopped_in:.1f}s after SIGTERM"
    assert "rank 1 exits with 0" in text, tail
    assert _group_gone(proc.pid, timeout_s=30), "processes of the trainer's group outlived it:\n" + _group_ps(proc.pid)
    stop_step = next(e["step"] for e in events if e["event"] == "stopped")
    assert first_checkpoint is not None
    assert first_checkpoint + extra_steps <= stop_step < steps, (stop_step, events)
    assert [e["step"] for e in events if e["event"] == "checkpoint"][-1] == stop_step
    prefix = f"jobs/{job['job_id']}/checkpoints/step-{stop_step:06d}/"
    names = {k.rsplit("/", 1)[1] for k in setup.keys(prefix)}
    assert names >= CHECKPOINT_FILES, sorted(names)
    signalled_step = first_checkpoint + extra_steps
    print(f"DDP SIGTERM: signalled at step >= {signalled_step}, stopped at {stop_step} in {stopped_in:.1f}s")

    rerun = run_trainer(job, setup.env, setup.runs, "sigterm-resume")
    assert rerun.code == EXIT_COMPLETED, rerun.tail()
    assert rerun.of("started")[0]["resumed_from_step"] == stop_step, rerun.events
    assert next(p["step"] for p in rerun.of("progress")) == stop_step + 1


def _group_gone(pgid: int, timeout_s: float) -> bool:
    """Wait until no process of group `pgid` is left (ranks 1.. may still be tearing NCCL down a moment)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _group_ps(pgid: int) -> str:
    listing = subprocess.run(["ps", "-eo", "pid,pgid,stat,etime,args"], capture_output=True, text=True).stdout
    return "\n".join(line for line in listing.splitlines() if line.split()[1:2] == [str(pgid)])
