"""The DreamBooth trainer as a real subprocess against SeaweedFS, training a tiny random Stable Diffusion on CPU:
checkpoint rotation, bitwise-exact resume after SIGKILL, SIGTERM stop and resume, the class-image cache, and
every bad-input failure code."""

from __future__ import annotations

import io
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("pytorch_lightning")

from safetensors.torch import load as load_safetensors  # noqa: E402

from ocrbooth.config import load_settings  # noqa: E402
from ocrbooth.dev.embedded import EmbeddedStack  # noqa: E402
from ocrbooth.errors import PoisonError  # noqa: E402
from ocrbooth.models.dreambooth import EXIT_COMPLETED, EXIT_FAILED, EXIT_STOPPED, TrainJob, validate_request  # noqa: E402
from ocrbooth.schemas.finetune import FinetuneRequest  # noqa: E402
from tests.support.stack import unique_suffix  # noqa: E402
from tests.support.tiny_sd import LOCAL_BASE_MODELS_ENV, build_tiny_sd, make_instance_images  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 120.0
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


# ---- helpers ------------------------------------------------------------------------------------------------------


class TrainerProcess:
    """`python -m ocrbooth.models.dreambooth.train JOB.json` with its stdout events read by a thread."""

    def __init__(self, job: dict[str, Any], env: dict[str, str], workdir: Path, name: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.job_file = workdir / f"{name}.json"
        self.job_file.write_text(json.dumps(job))
        self.log_path = workdir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ocrbooth.models.dreambooth.train", str(self.job_file)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=REPO,
            )
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for raw in self.proc.stdout:
                self._lines.put(json.loads(raw))  # every stdout line must be a protocol line
        self._lines.put(None)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = RUN_TIMEOUT_S) -> dict[str, Any]:
        """The first event (from now on) that matches; fails at the deadline or when stdout closes."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                event = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no matching event in {timeout_s}s; saw {self.events}\n{self.log_tail()}"
                ) from None
            if event is None:
                raise AssertionError(f"trainer closed stdout first; saw {self.events}\n{self.log_tail()}")
            self.events.append(event)
            if predicate(event):
                return event

    def finish(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        """Read every remaining event and wait for the exit status."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                event = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"trainer still running after {timeout_s}s\n{self.log_tail()}") from None
            if event is None:
                break
            self.events.append(event)
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Env:
    """What every trainer run of this module shares."""

    stack: EmbeddedStack
    env: dict[str, str]
    workdir: Path
    request: dict[str, Any]
    bucket: str
    prefix: str
    runs: dict[str, TrainerProcess] = field(default_factory=dict)

    def job(self, **overrides: Any) -> dict[str, Any]:
        """A fresh request (new job id) with `overrides`."""
        return {**self.request, "job_id": f"job-{unique_suffix()}", **overrides}

    def run(self, job: dict[str, Any], *, attempt: int = 1, name: str | None = None) -> TrainerProcess:
        return TrainerProcess(
            {"request": job, "attempt": attempt}, self.env, self.workdir, name or f"{job['job_id']}-{attempt}"
        )

    def keys(self, prefix: str) -> list[str]:
        s3 = self.stack.s3_client()
        out: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix, **token)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(out)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def weights(self, job_id: str) -> dict[str, dict[str, Any]]:
        s3 = self.stack.s3_client()
        return {
            name: load_safetensors(
                s3.get_object(Bucket=self.bucket, Key=f"jobs/{job_id}/output/pipeline/{name}")["Body"].read()
            )
            for name in WEIGHT_FILES
        }


def assert_bitwise_equal(actual: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    for name, tensors in expected.items():
        assert actual[name].keys() == tensors.keys(), name
        different = [k for k, t in tensors.items() if not torch.equal(actual[name][k], t)]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def env(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Env:
    """A tiny SD on disk, three instance images in S3, and the trainer environment (progress every step)."""
    root = tmp_path_factory.mktemp("trainer")
    model = build_tiny_sd(root / "tiny-sd")
    prefix = f"tests/trainer-{unique_suffix()}/"
    s3 = stack.s3_client()
    for i, data in enumerate(make_instance_images(3)):
        s3.put_object(Bucket=stack.bucket, Key=f"{prefix}instance/{i}.png", Body=data)
    request = {
        "base_model": str(model),
        "instance_images": [f"s3://{stack.bucket}/{prefix}instance/"],
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of dog",
        "num_class_images": 4,
        "resolution": 64,
        "max_train_steps": 8,
        "checkpointing_steps": 2,
        "checkpoints_total_limit": 3,
        "learning_rate": 1e-3,
        "train_text_encoder": True,
        "seed": 7,
        "num_inference_steps": 2,
        "num_validation_images": 1,
        "guidance_scale": 2.0,
    }
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OCRBOOTH_")}
    environ |= stack.env() | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OCRBOOTH_FINETUNE_PROGRESS_EVERY_STEPS": "1",
        "OCRBOOTH_FINETUNE_WORKDIR": str(root / "work"),
        "OCRBOOTH_LOG_FORMAT": "console",
        "HF_HUB_OFFLINE": "1",
        **LOCAL_BASE_MODELS_ENV,
    }
    return Env(stack, environ, root / "runs", request, stack.bucket, prefix)


@pytest.fixture(scope="module")
def reference(env: Env) -> TrainerProcess:
    """One uninterrupted 8-step run: the baseline the other runs are compared with."""
    run = env.run(env.job())
    code = run.finish()
    assert code == EXIT_COMPLETED, run.log_tail()
    reference_weights(env, run)  # read now: a later test reruns this job and rewrites its output
    return run


_REFERENCE_WEIGHTS: dict[str, dict[str, dict[str, Any]]] = {}


def reference_weights(env: Env, reference: TrainerProcess) -> dict[str, dict[str, Any]]:
    """The reference run's final weights, read once (a later rerun of the same job rewrites them)."""
    job_id = job_id_of(reference)
    if job_id not in _REFERENCE_WEIGHTS:
        _REFERENCE_WEIGHTS[job_id] = env.weights(job_id)
    return _REFERENCE_WEIGHTS[job_id]


def job_id_of(run: TrainerProcess) -> str:
    return str(json.loads(run.job_file.read_text())["request"]["job_id"])


# ---- a whole run --------------------------------------------------------------------------------------------------


def test_run_keeps_the_newest_checkpoints_and_uploads_the_artifacts(env: Env, reference: TrainerProcess) -> None:
    """8 steps, a checkpoint every 2, limit 3: exactly step-4/6/8 remain, each complete, plus pipeline, samples
    and logs; the events come in the documented order."""
    job_id = job_id_of(reference)
    kinds = reference.kinds()
    assert kinds[:2] == ["class_images", "started"]
    assert kinds[-2:] == ["samples", "completed"]
    assert set(kinds[2:-2]) == {"progress", "checkpoint"}
    assert reference.of("started")[0] == {"event": "started", "resumed_from_step": None, "attempt": 1}
    progress = reference.of("progress")
    assert [p["step"] for p in progress] == list(range(1, 9))
    assert all(p["max_steps"] == 8 and p["loss"] > 0 and p["steps_per_second"] > 0 for p in progress)
    checkpoints = reference.of("checkpoint")
    assert [c["step"] for c in checkpoints] == [2, 4, 6, 8]
    for c in checkpoints:  # each checkpoint line follows its step's progress line
        assert reference.events.index(c) > reference.events.index(progress[c["step"] - 1])
    ckpt_prefix = f"jobs/{job_id}/checkpoints/"
    assert checkpoints[-1]["uri"] == f"s3://{env.bucket}/{ckpt_prefix}step-000008/"

    keys = env.keys(ckpt_prefix)
    folders = sorted({k[len(ckpt_prefix) :].split("/")[0] for k in keys})
    assert folders == ["step-000004", "step-000006", "step-000008"]
    for folder in folders:
        names = {k.rsplit("/", 1)[1] for k in keys if k.startswith(ckpt_prefix + folder + "/")}
        assert {"_COMPLETE", "unet.safetensors", "text_encoder.safetensors", "optimizer.pt"} <= names
        assert {"lr_scheduler.pt", "rng.pt", "state.json", "config.json"} <= names

    artifacts = reference.of("completed")[0]["artifacts"]
    out = f"s3://{env.bucket}/jobs/{job_id}/output/"
    assert artifacts == {
        "unet": f"{out}pipeline/unet/",
        "text_encoder": f"{out}pipeline/text_encoder/",
        "pipeline": f"{out}pipeline/",
        "samples": f"{out}samples/",
        "logs": f"{out}logs/",
    }
    output = env.keys(f"jobs/{job_id}/output/")
    assert f"jobs/{job_id}/output/pipeline/model_index.json" in output
    assert any(k.endswith("unet/diffusion_pytorch_model.safetensors") for k in output)
    assert any("/logs/" in k and "tfevents" in k for k in output)
    assert reference.of("samples")[0]["uris"] == [f"{out}samples/00-00.png"]


def test_generate_samples_from_the_trained_pipeline(
    env: Env, reference: TrainerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`generate` downloads the exported pipeline from S3 and loads it with StableDiffusionPipeline."""
    from PIL import Image

    from ocrbooth.models.dreambooth.generate import generate

    for key, value in env.env.items():
        if key.startswith(("OCRBOOTH_", "AWS_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("OCRBOOTH_FINETUNE_WORKDIR", str(tmp_path / "work"))
    pipeline = reference.of("completed")[0]["artifacts"]["pipeline"]
    paths = generate(
        pipeline, "a photo of sks dog", num_images=2, num_inference_steps=2, out_dir=tmp_path / "out",
        settings=load_settings(),
    )  # fmt: skip
    assert [p.name for p in paths] == ["seed-0.png", "seed-1.png"]
    with Image.open(paths[0]) as image:
        assert image.size == (64, 64)


# ---- interruptions ------------------------------------------------------------------------------------------------


def test_sigkill_then_restart_matches_an_uninterrupted_run_bitwise(env: Env, reference: TrainerProcess) -> None:
    """Killed (SIGKILL) at a random step and rerun, the job ends with exactly the reference's weights."""
    job = env.job()
    kill_at = random.randint(3, 7)
    first = env.run(job, attempt=1)
    first.wait_for(lambda e: e["event"] == "progress" and e["step"] >= kill_at)
    first.proc.kill()
    assert first.finish() == -signal.SIGKILL, f"the run was to be killed at step {kill_at}"
    assert "completed" not in first.kinds()
    seen = [c["step"] for c in first.of("checkpoint")]

    second = env.run(job, attempt=2)
    assert second.finish() == EXIT_COMPLETED, second.log_tail()
    started = second.of("started")[0]
    assert started["attempt"] == 2
    resumed = started["resumed_from_step"]
    assert resumed is not None
    assert max(seen) <= resumed <= kill_at, (kill_at, seen, resumed)
    assert [p["step"] for p in second.of("progress")] == list(range(resumed + 1, 9))
    assert_bitwise_equal(env.weights(job["job_id"]), reference_weights(env, reference))


def test_sigterm_checkpoints_stops_and_a_rerun_resumes(env: Env, reference: TrainerProcess) -> None:
    """SIGTERM mid-run: a checkpoint of the step reached, `stopped`, exit 3; the rerun resumes there and ends
    with the reference's weights."""
    job = env.job()
    first = env.run(job)
    first.wait_for(lambda e: e["event"] == "progress" and e["step"] == 3)
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == EXIT_STOPPED, first.log_tail()
    stopped = first.events[-1]
    assert stopped["event"] == "stopped"
    step = stopped["step"]
    assert 3 <= step < 8
    assert first.of("checkpoint")[-1]["step"] == step
    assert f"jobs/{job['job_id']}/checkpoints/step-{step:06d}/_COMPLETE" in env.keys(f"jobs/{job['job_id']}/")

    second = env.run(job, attempt=2)
    assert second.finish() == EXIT_COMPLETED, second.log_tail()
    assert second.of("started")[0]["resumed_from_step"] == step
    assert_bitwise_equal(env.weights(job["job_id"]), reference_weights(env, reference))


def test_rerun_of_a_finished_job_only_exports_again(env: Env, reference: TrainerProcess) -> None:
    """A rerun after the last checkpoint (say the daemon died before `completed`) trains nothing and exports
    the final checkpoint's weights, which are the reference's."""
    job = json.loads(reference.job_file.read_text())["request"]
    run = env.run(job, attempt=2, name=f"{job['job_id']}-rerun")
    assert run.finish() == EXIT_COMPLETED, run.log_tail()
    assert run.kinds() == ["class_images", "started", "samples", "completed"]
    assert run.of("started")[0]["resumed_from_step"] == 8
    assert_bitwise_equal(env.weights(job["job_id"]), reference_weights(env, reference))


# ---- class images -------------------------------------------------------------------------------------------------


def test_second_job_reuses_the_class_images(env: Env, reference: TrainerProcess) -> None:
    """Same base model, class prompt, resolution, seed and count: the class images come from the cache."""
    made = reference.of("class_images")[0]
    assert made.pop("seconds") > 0  # time spent generating, for the daemon's logs
    assert made == {"event": "class_images", "generated": 4, "total": 4, "cache_hit": False}
    run = env.run(env.job(max_train_steps=1, train_text_encoder=False))
    assert run.finish() == EXIT_COMPLETED, run.log_tail()
    reused = {"event": "class_images", "generated": 0, "total": 4, "cache_hit": True, "seconds": None}
    assert run.of("class_images")[0] == reused
    assert "text_encoder" not in run.of("completed")[0]["artifacts"]


def test_variant_run_without_prior_with_v_prediction_accumulation_and_checkpointing(env: Env) -> None:
    """No prior preservation, a v-prediction model, batch 2 x accumulation 2, gradient checkpointing, frozen text
    encoder and two validation prompts: the run completes with every sample uploaded."""
    model = build_tiny_sd(env.workdir.parent / "tiny-sd-v", seed=1, prediction_type="v_prediction")
    run = env.run(
        env.job(
            base_model=str(model),
            with_prior_preservation=False,
            class_prompt=None,
            train_batch_size=2,
            gradient_accumulation_steps=2,
            gradient_checkpointing=True,
            train_text_encoder=False,
            max_train_steps=3,
            checkpointing_steps=10,
            lr_scheduler="cosine",
            lr_warmup_steps=1,
            validation_prompts=["a photo of sks dog on the beach", "a sks dog in the snow"],
            num_validation_images=2,
        )
    )
    assert run.finish() == EXIT_COMPLETED, run.log_tail()
    assert run.kinds()[0] == "started"  # no class images without prior preservation
    assert [c["step"] for c in run.of("checkpoint")] == [3]  # the last step is always checkpointed
    assert [p["step"] for p in run.of("progress")] == [1, 2, 3]
    assert len(run.of("samples")[0]["uris"]) == 4


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.fixture
def bad_inputs(env: Env) -> str:
    """A prefix holding one good image and one text file, and an empty prefix next to it."""
    prefix = f"{env.prefix}bad-{unique_suffix()}/"
    s3 = env.stack.s3_client()
    s3.put_object(Bucket=env.bucket, Key=f"{prefix}mixed/0.png", Body=make_instance_images(1)[0])
    s3.put_object(Bucket=env.bucket, Key=f"{prefix}mixed/notes.txt", Body=b"not an image")
    return f"s3://{env.bucket}/{prefix}"


BAD_REQUESTS: dict[str, Callable[[str, str], dict[str, Any]]] = {
    "resolution_out_of_range": lambda bucket, base: {"resolution": 100_000},
    "too_many_steps": lambda bucket, base: {"max_train_steps": 1_000_000_000},
    "no_instance_images": lambda bucket, base: {"instance_images": [f"{base}empty/"]},
    "invalid_image": lambda bucket, base: {"instance_images": [f"{base}mixed/"]},
    "source_not_allowed": lambda bucket, base: {"instance_images": ["s3://somebody-elses-bucket/dog.png"]},
    "unknown_base_model": lambda bucket, base: {"base_model": "no-such-org/no-such-model"},
    "image_too_large": lambda bucket, base: {},  # with max_image_bytes lowered below
}


@pytest.mark.parametrize("code", sorted(BAD_REQUESTS))
def test_bad_request_fails_with_its_code(
    env: Env, bad_inputs: str, code: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each kind of bad input prints one `failed` line with its code and returns exit status 2."""
    from ocrbooth.models.dreambooth.train import main

    for key, value in env.env.items():
        if key.startswith(("OCRBOOTH_", "AWS_", "HF_")):
            monkeypatch.setenv(key, value)
    if code == "image_too_large":
        monkeypatch.setenv("OCRBOOTH_FINETUNE_MAX_IMAGE_BYTES", "1024")
    if code == "unknown_base_model":  # allowed, but in no cache: the trainer finds nothing to load
        monkeypatch.setenv("OCRBOOTH_FINETUNE_ALLOWED_BASE_MODELS", "no-such-org/no-such-model")
    job = env.job(**BAD_REQUESTS[code](env.bucket, bad_inputs))
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"request": job, "attempt": 1}))
    out = io.StringIO()
    assert main([str(job_file)], out=out) == EXIT_FAILED
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["failed"]
    assert lines[0]["code"] == code, lines[0]["message"]


def test_bad_request_in_a_real_process_exits_2(env: Env) -> None:
    """The subprocess path: an unloadable base model is one `failed` line on stdout and exit status 2."""
    run = env.run(env.job(base_model="/nonexistent/model"))
    assert run.finish() == EXIT_FAILED, run.log_tail()
    assert run.kinds() == ["failed"]
    assert run.events[0]["code"] == "unknown_base_model"


def test_unreadable_job_file_is_invalid_request(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job file that is not a FinetuneRequest fails with invalid_request."""
    from ocrbooth.models.dreambooth.train import main

    for key, value in env.env.items():
        if key.startswith(("OCRBOOTH_", "AWS_")):
            monkeypatch.setenv(key, value)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"job_id": "x", "attempt": 1}))
    out = io.StringIO()
    assert main([str(job_file)], out=out) == EXIT_FAILED
    assert json.loads(out.getvalue())["code"] == "invalid_request"


# ---- validate_request (no I/O) -------------------------------------------------------------------------------------


def _request(**overrides: Any) -> FinetuneRequest:
    fields: dict[str, Any] = {
        "job_id": "j",
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "instance_images": ["s3://ocrbooth/in/"],
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of dog",
    }
    return FinetuneRequest.model_validate(fields | overrides)


@pytest.mark.parametrize(
    ("overrides", "env_overrides", "code"),
    [
        ({"resolution": 100_000}, {}, "resolution_out_of_range"),
        ({"resolution": 32}, {}, "resolution_out_of_range"),
        ({"max_train_steps": 1_000_000_000}, {}, "too_many_steps"),
        ({"train_batch_size": 64}, {}, "batch_too_large"),
        ({"num_class_images": 5000}, {}, "too_many_images"),
        ({"num_validation_images": 64}, {}, "too_many_images"),
        ({"instance_images": [f"s3://ocrbooth/{i}.png" for i in range(21)]}, {}, "too_many_images"),
        ({"instance_images": ["s3://elsewhere/a.png"]}, {}, "source_not_allowed"),
        ({"base_model": "s3://elsewhere/sd/"}, {}, "source_not_allowed"),
        ({"output_uri": "file:///srv/out"}, {}, "invalid_uri"),
        ({}, {"OCRBOOTH_FINETUNE_ALLOWED_BASE_MODELS": "org/a,org/b"}, "base_model_not_allowed"),
    ],
)
def test_validate_request_bounds(
    overrides: dict[str, Any], env_overrides: dict[str, str], code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each operator bound is enforced before anything runs, with its own code."""
    for key in [k for k in os.environ if k.startswith("OCRBOOTH_")]:
        monkeypatch.delenv(key)
    for key, value in env_overrides.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(PoisonError) as caught:
        validate_request(_request(**overrides), load_settings())
    assert caught.value.code == code


def test_validate_request_reports_every_problem_and_accepts_a_good_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """All problems are named in one message (code of the first); a request within bounds passes."""
    for key in [k for k in os.environ if k.startswith("OCRBOOTH_")]:
        monkeypatch.delenv(key)
    settings = load_settings()
    validate_request(_request(), settings)
    with pytest.raises(PoisonError) as caught:
        validate_request(_request(resolution=100_000, max_train_steps=10**9), settings)
    assert caught.value.code == "resolution_out_of_range"
    assert "max_train_steps" in caught.value.message


def test_job_file_formats() -> None:
    """JOB.json is {"request", "attempt"}; a bare request with a top-level attempt is read the same way."""
    request = _request().model_dump(mode="json")
    wrapped = TrainJob.parse(json.dumps({"request": request, "attempt": 3}))
    bare = TrainJob.parse(json.dumps({**request, "attempt": 3}))
    assert wrapped == bare
    assert wrapped.attempt == 3
    assert TrainJob.parse(json.dumps(request)).attempt == 1
    with pytest.raises(PoisonError) as caught:
        TrainJob.parse("{not json")
    assert caught.value.code == "invalid_request"
