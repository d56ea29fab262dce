"""Fine-tune jobs through Kafka: event order, class-image cache, cancel, completed republish, bad requests."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from ocrbooth import constants
from ocrbooth.dev.embedded import EmbeddedStack
from tests.support.daemon import running_daemon, settings_for
from tests.support.kafka import committed_offsets, consume_all, produce
from tests.support.s3faults import S3FaultProxy
from tests.support.stack import TopicNames, unique_suffix
from tests.support.tiny_sd import LOCAL_BASE_MODELS_ENV, build_tiny_sd, make_instance_images, tiny_job_request

TERMINAL = {"completed", "failed", "cancelled"}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable Diffusion pipeline on disk (the base model of every job here)."""
    return build_tiny_sd(tmp_path_factory.mktemp("finetune") / "tiny-sd")


@pytest.fixture
def instance_prefix(stack: EmbeddedStack, s3_prefix: str) -> str:
    """Three subject photos in S3; the prefix URI a request names."""
    s3 = stack.s3_client()
    for i, data in enumerate(make_instance_images(3)):
        s3.put_object(Bucket=stack.bucket, Key=f"{s3_prefix}instance/{i}.png", Body=data)
    return f"s3://{stack.bucket}/{s3_prefix}instance/"


def _events(records: list[Any]) -> dict[str, list[dict[str, Any]]]:
    by_job: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        event = json.loads(record.value)
        by_job.setdefault(event["job_id"], []).append(event)
    return by_job


def _ended(jobs: set[str]) -> Any:
    def check(records: list[Any]) -> bool:
        done = {e["job_id"] for e in (json.loads(r.value) for r in records) if e["event"] in TERMINAL}
        return jobs <= done

    return check


def _env(daemon_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {
        **daemon_env,
        "OCRBOOTH_HANDLERS": "finetune",
        "OCRBOOTH_FINETUNE_WORKDIR": str(tmp_path / "work"),
        "OCRBOOTH_FINETUNE_PROGRESS_EVERY_STEPS": "1",
        "OCRBOOTH_FINETUNE_MAX_CONCURRENT_JOBS": "1",
        "HF_HUB_OFFLINE": "1",
        **LOCAL_BASE_MODELS_ENV,
    }


async def test_jobs_stream_events_in_order_share_class_images_and_completed_jobs_are_not_retrained(
    monkeypatch: pytest.MonkeyPatch,
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    tiny_sd: Path,
    instance_prefix: str,
    tmp_path: Path,
) -> None:
    """A job's events arrive in order (accepted, class_images, started, progress/checkpoint, samples,
    completed); a second job with the same class prompt hits the class-image cache; a request for a job
    that already completed republishes `completed` without training again."""
    first, second = f"ft-a-{unique_suffix()}", f"ft-b-{unique_suffix()}"
    await produce(
        stack.bootstrap_servers,
        topics.finetune_requests,
        [
            (first.encode(), tiny_job_request(first, tiny_sd, instance_prefix)),
            (second.encode(), tiny_job_request(second, tiny_sd, instance_prefix)),
            (first.encode(), tiny_job_request(first, tiny_sd, instance_prefix)),  # again, after it completed
        ],
        partition=0,  # one partition: the jobs run one after the other, in this order
    )
    settings = settings_for(monkeypatch, _env(daemon_env, tmp_path))
    async with running_daemon(settings):
        records = await consume_all(
            stack.bootstrap_servers,
            topics.finetune_events,
            until=lambda recs: sum(json.loads(r.value)["event"] == "completed" for r in recs) >= 3,
            timeout_s=600,
        )
    jobs = _events(records)
    kinds = [e["event"] for e in jobs[first]]
    first_run = kinds[: kinds.index("completed") + 1]
    assert first_run[:3] == ["accepted", "class_images", "started"]
    assert first_run[-2:] == ["samples", "completed"]
    assert set(first_run[3:-2]) == {"progress", "checkpoint"}
    assert [e["step"] for e in jobs[first] if e["event"] == "checkpoint"] == [2, 4]
    seqs = [e["seq"] for e in jobs[first]]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert jobs[first][1]["cache_hit"] is False
    assert next(e for e in jobs[second] if e["event"] == "class_images")["cache_hit"] is True
    # The repeated request: only `completed` again, with the same artifacts, no `started`.
    rerun = kinds[kinds.index("completed") + 1 :]
    assert rerun == ["completed"]
    completed = [e for e in jobs[first] if e["event"] == "completed"]
    assert completed[0]["artifacts"] == completed[1]["artifacts"]
    pipeline = completed[0]["artifacts"]["pipeline"]
    bucket, _, key = pipeline[5:].partition("/")
    listed = stack.s3_client().list_objects_v2(Bucket=bucket, Prefix=key)
    assert any(o["Key"].endswith("model_index.json") for o in listed.get("Contents", []))


async def test_cancel_stops_a_running_job_and_prevents_one_not_yet_started(
    monkeypatch: pytest.MonkeyPatch,
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    tiny_sd: Path,
    instance_prefix: str,
    tmp_path: Path,
) -> None:
    """A cancel on finetune.control stops a running job (`cancelled`, no `completed`); a cancel sent before
    its request arrives means that job never starts."""
    running, early = f"ft-run-{unique_suffix()}", f"ft-early-{unique_suffix()}"
    await produce(
        stack.bootstrap_servers,
        topics.finetune_control,
        [(early.encode(), json.dumps({"job_id": early, "action": "cancel"}).encode())],
    )
    await produce(
        stack.bootstrap_servers,
        topics.finetune_requests,
        [
            (
                running.encode(),
                tiny_job_request(running, tiny_sd, instance_prefix, max_train_steps=2000, checkpointing_steps=500),
            )
        ],
        partition=0,
    )
    settings = settings_for(monkeypatch, _env(daemon_env, tmp_path))
    async with running_daemon(settings):
        await consume_all(
            stack.bootstrap_servers,
            topics.finetune_events,
            until=lambda recs: any(json.loads(r.value)["event"] == "progress" for r in recs),
            timeout_s=300,
        )
        await produce(
            stack.bootstrap_servers,
            topics.finetune_control,
            [(running.encode(), json.dumps({"job_id": running, "action": "cancel"}).encode())],
        )
        await produce(
            stack.bootstrap_servers,
            topics.finetune_requests,
            [(early.encode(), tiny_job_request(early, tiny_sd, instance_prefix))],
            partition=1,
        )
        records = await consume_all(
            stack.bootstrap_servers, topics.finetune_events, until=_ended({running, early}), timeout_s=300
        )
    jobs = _events(records)
    assert jobs[running][-1]["event"] == "cancelled"
    assert "completed" not in [e["event"] for e in jobs[running]]
    assert [e["event"] for e in jobs[early]] == ["cancelled"]


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"resolution": 100_000}, "resolution_out_of_range"),
        ({"max_train_steps": 1_000_000_000}, "too_many_steps"),
        ({"instance_images": ["s3://ocrbooth/no-such-prefix/"]}, "no_instance_images"),
        ({"instance_images": ["s3://not-allowed/x.png"]}, "source_not_allowed"),
        ({"base_model": "/nonexistent/stable-diffusion"}, "unknown_base_model"),
        ({"instance_images": ["NOT_AN_IMAGE"]}, "invalid_image"),
    ],
)
async def test_bad_requests_fail_with_a_specific_code_and_the_daemon_keeps_serving(
    monkeypatch: pytest.MonkeyPatch,
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    tiny_sd: Path,
    instance_prefix: str,
    s3_prefix: str,
    tmp_path: Path,
    overrides: dict[str, Any],
    code: str,
) -> None:
    """Each bad request ends with `failed` and its code, and a good job after it still completes."""
    if overrides.get("instance_images") == ["NOT_AN_IMAGE"]:
        stack.s3_client().put_object(Bucket=stack.bucket, Key=f"{s3_prefix}text/notes.txt", Body=b"not an image")
        overrides = {"instance_images": [f"s3://{stack.bucket}/{s3_prefix}text/notes.txt"]}
    bad, good = f"ft-bad-{unique_suffix()}", f"ft-good-{unique_suffix()}"
    await produce(
        stack.bootstrap_servers,
        topics.finetune_requests,
        [
            (bad.encode(), tiny_job_request(bad, tiny_sd, instance_prefix, **overrides)),
            (
                good.encode(),
                tiny_job_request(good, tiny_sd, instance_prefix, max_train_steps=2, with_prior_preservation=False),
            ),
        ],
        partition=0,
    )
    settings = settings_for(monkeypatch, _env(daemon_env, tmp_path))
    async with running_daemon(settings):
        records = await consume_all(
            stack.bootstrap_servers, topics.finetune_events, until=_ended({bad, good}), timeout_s=300
        )
    jobs = _events(records)
    failed = jobs[bad][-1]
    assert failed["event"] == "failed"
    assert failed["error"]["code"] == code, failed
    assert jobs[good][-1]["event"] == "completed"


def _trainer_pids(workdir: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "dreambooth.train" in cmdline and str(workdir) in cmdline:
                found.append(int(proc.name))
    return found


async def test_a_crashed_trainer_restarts_from_its_checkpoint(
    monkeypatch: pytest.MonkeyPatch,
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    tiny_sd: Path,
    instance_prefix: str,
    tmp_path: Path,
) -> None:
    """A trainer killed under the daemon is restarted (attempt 2) from the newest checkpoint and completes."""
    job = f"ft-crash-{unique_suffix()}"
    await produce(
        stack.bootstrap_servers,
        topics.finetune_requests,
        [(job.encode(), tiny_job_request(job, tiny_sd, instance_prefix, max_train_steps=40, checkpointing_steps=4))],
    )
    settings = settings_for(monkeypatch, _env(daemon_env, tmp_path))
    async with running_daemon(settings):
        await consume_all(
            stack.bootstrap_servers,
            topics.finetune_events,
            until=lambda recs: any(json.loads(r.value)["event"] == "checkpoint" for r in recs),
            timeout_s=300,
        )
        pids = _trainer_pids(tmp_path / "work")
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        records = await consume_all(stack.bootstrap_servers, topics.finetune_events, until=_ended({job}), timeout_s=300)
    stream = _events(records)[job]
    started = [e for e in stream if e["event"] == "started"]
    assert [e["attempt"] for e in started] == [1, 2]
    assert started[1]["resumed_from_step"] >= 4
    assert stream[-1]["event"] == "completed"


async def test_shutdown_checkpoints_the_job_and_leaves_it_for_the_next_daemon(
    monkeypatch: pytest.MonkeyPatch,
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    group_id: str,
    tiny_sd: Path,
    instance_prefix: str,
    tmp_path: Path,
) -> None:
    """SIGTERM-style drain: the trainer checkpoints and stops, the request stays uncommitted, the daemon exits
    0, and the next daemon resumes the job from that checkpoint to completion."""
    job = f"ft-drain-{unique_suffix()}"
    await produce(
        stack.bootstrap_servers,
        topics.finetune_requests,
        [(job.encode(), tiny_job_request(job, tiny_sd, instance_prefix, max_train_steps=60, checkpointing_steps=50))],
        partition=0,
    )
    settings = settings_for(monkeypatch, _env(daemon_env, tmp_path))
    async with running_daemon(settings):  # exits 0 when the block ends (drain)
        await consume_all(
            stack.bootstrap_servers,
            topics.finetune_events,
            until=lambda recs: sum(json.loads(r.value)["event"] == "progress" for r in recs) >= 3,
            timeout_s=300,
        )
    assert (await committed_offsets(stack.bootstrap_servers, group_id, topics.finetune_requests))[0] in (None, 0)
    first = _events(await consume_all(stack.bootstrap_servers, topics.finetune_events, count=None))[job]
    stopped_at = [e["step"] for e in first if e["event"] == "checkpoint"]
    assert stopped_at, "the drain did not checkpoint"
    assert first[-1]["event"] == "checkpoint"
    async with running_daemon(settings_for(monkeypatch, _env(daemon_env, tmp_path))):
        records = await consume_all(stack.bootstrap_servers, topics.finetune_events, until=_ended({job}), timeout_s=300)
    stream = _events(records)[job]
    started = [e for e in stream if e["event"] == "started"]
    assert started[-1]["resumed_from_step"] == stopped_at[-1]
    assert stream[-1]["event"] == "completed"


async def test_a_failed_checkpoint_upload_is_counted_and_the_trainer_restarts(
    monkeypatch: pytest.MonkeyPatch,
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    tiny_sd: Path,
    instance_prefix: str,
    tmp_path: Path,
) -> None:
    """S3 answers 503 SlowDown to every write of the step-4 checkpoint (a fault-injecting proxy in front of the
    real S3): boto3 retries, gives up, the trainer reports the failed upload and dies; the daemon counts it in
    `ocrbooth_finetune_checkpoint_upload_failures_total`, restarts the trainer from the step-2 checkpoint, and
    fails the job after `max_attempts`. The successful upload is timed in the upload-duration histogram."""
    job = f"ft-upload-{unique_suffix()}"
    proxy = S3FaultProxy(stack.s3_endpoint_url)
    proxy.fail("PUT", rf"/{constants.S3_PREFIX_JOBS}{job}/checkpoints/step-000004/")
    await produce(
        stack.bootstrap_servers,
        topics.finetune_requests,
        [(job.encode(), tiny_job_request(job, tiny_sd, instance_prefix, max_train_steps=6, checkpointing_steps=2))],
    )
    settings = settings_for(
        monkeypatch,
        _env(daemon_env, tmp_path),
        OCRBOOTH_FINETUNE_MAX_ATTEMPTS="2",
        OCRBOOTH_S3_ENDPOINT_URL=proxy.url,  # the daemon and its trainers (which inherit the environment)
    )
    with proxy.running():
        async with running_daemon(settings) as (daemon, _):
            records = await consume_all(
                stack.bootstrap_servers, topics.finetune_events, until=_ended({job}), timeout_s=300
            )
            failures = daemon.metrics.finetune_checkpoint_failures._value.get()
            upload_count = _histogram_count(daemon.metrics.finetune_checkpoint_upload_seconds)
            uploaded = daemon.metrics.finetune_checkpoints._value.get()
    stream = _events(records)[job]
    assert [e["attempt"] for e in stream if e["event"] == "started"] == [1, 2], stream[-1]
    assert proxy.refused, "the proxy refused nothing"
    # Attempt 1 uploads step 2, fails at step 4; attempt 2 resumes from step 2 and fails at step 4 again.
    assert [e["step"] for e in stream if e["event"] == "checkpoint"] == [2]
    assert stream[-1]["event"] == "failed"
    assert failures == 2
    assert uploaded == 1
    assert upload_count == 1


def _histogram_count(histogram: Any) -> float:
    """Observations in an unlabelled histogram, read from what it exports."""
    [family] = histogram.collect()
    return next(s.value for s in family.samples if s.name.endswith("_count"))


async def test_bad_requests_are_answered_while_the_only_job_slot_trains(
    monkeypatch: pytest.MonkeyPatch,
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    tiny_sd: Path,
    instance_prefix: str,
    tmp_path: Path,
) -> None:
    """With the single job slot busy training, 40 requests out of bounds and 20 undecodable ones queued behind the
    job on its own partition are all answered (failed events, dead letters) before the job ends: validation runs
    before a request waits for a slot."""
    running = f"ft-long-{unique_suffix()}"
    await produce(
        stack.bootstrap_servers,
        topics.finetune_requests,
        [
            (
                running.encode(),
                tiny_job_request(running, tiny_sd, instance_prefix, max_train_steps=5000, checkpointing_steps=5000),
            )
        ],
        partition=0,
    )
    bad = [f"ft-oob-{i}-{unique_suffix()}" for i in range(40)]
    settings = settings_for(monkeypatch, _env(daemon_env, tmp_path))
    async with running_daemon(settings):
        await consume_all(
            stack.bootstrap_servers,
            topics.finetune_events,
            until=lambda recs: any(json.loads(r.value)["event"] == "progress" for r in recs),
            timeout_s=300,
        )
        items = [(job.encode(), tiny_job_request(job, tiny_sd, instance_prefix, resolution=100_000)) for job in bad]
        items += [(f"junk-{i}".encode(), b"{not json") for i in range(20)]
        await produce(stack.bootstrap_servers, topics.finetune_requests, items, partition=0)
        records = await consume_all(
            stack.bootstrap_servers, topics.finetune_events, until=_ended(set(bad)), timeout_s=60
        )
        letters = await consume_all(stack.bootstrap_servers, topics.dlq, count=20, timeout_s=60)
        jobs = _events(records)
        assert all(jobs[job][-1]["error"]["code"] == "resolution_out_of_range" for job in bad)
        assert all(json.loads(r.value)["error"]["code"] == "invalid_json" for r in letters)
        assert jobs[running][-1]["event"] not in TERMINAL  # still training: nothing waited for its slot
        await produce(
            stack.bootstrap_servers,
            topics.finetune_control,
            [(running.encode(), json.dumps({"job_id": running, "action": "cancel"}).encode())],
        )
        await consume_all(stack.bootstrap_servers, topics.finetune_events, until=_ended({running}), timeout_s=120)
