"""A daemon killed mid-job is replaced by another that resumes the job from its S3 checkpoint."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from ocrbooth.dev.embedded import EmbeddedStack
from tests.support.daemon import DaemonProcess
from tests.support.kafka import consume_all, produce, wait_until
from tests.support.stack import TopicNames, unique_suffix
from tests.support.tiny_sd import LOCAL_BASE_MODELS_ENV, build_tiny_sd, make_instance_images, tiny_job_request


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


async def test_killed_daemon_is_replaced_and_the_job_resumes_from_its_checkpoint(
    stack: EmbeddedStack, topics: TopicNames, daemon_env: dict[str, str], s3_prefix: str, tmp_path: Path
) -> None:
    """SIGKILL the daemon running a job after a checkpoint; a second daemon in the group picks the
    uncommitted request up, its trainer resumes from that checkpoint, and the job completes."""
    model = build_tiny_sd(tmp_path / "tiny-sd")
    s3 = stack.s3_client()
    for i, data in enumerate(make_instance_images(3)):
        s3.put_object(Bucket=stack.bucket, Key=f"{s3_prefix}instance/{i}.png", Body=data)
    job = f"ft-takeover-{unique_suffix()}"
    images = f"s3://{stack.bucket}/{s3_prefix}instance/"
    request = tiny_job_request(job, model, images, max_train_steps=60, checkpointing_steps=5)
    await produce(stack.bootstrap_servers, topics.finetune_requests, [(job.encode(), request)])
    env = {
        **daemon_env,
        "OCRBOOTH_HANDLERS": "finetune",
        "OCRBOOTH_FINETUNE_PROGRESS_EVERY_STEPS": "1",
        "HF_HUB_OFFLINE": "1",
        **LOCAL_BASE_MODELS_ENV,
    }

    first = DaemonProcess({**env, "OCRBOOTH_FINETUNE_WORKDIR": str(tmp_path / "a")}, tmp_path / "a.log").start()
    try:
        await first.wait_ready()
        await consume_all(
            stack.bootstrap_servers,
            topics.finetune_events,
            until=lambda recs: any(json.loads(r.value)["event"] == "checkpoint" for r in recs),
            timeout_s=300,
        )
    finally:
        first.kill()
    assert first.proc is not None
    assert first.proc.returncode == -signal.SIGKILL
    # Its trainer must not live on as an orphan, training and checkpointing beside the next one.
    await wait_until(lambda: not _processes_mentioning(str(tmp_path / "a")), 15, message="orphan trainer gone")

    second = DaemonProcess({**env, "OCRBOOTH_FINETUNE_WORKDIR": str(tmp_path / "b")}, tmp_path / "b.log").start()
    try:
        records = await consume_all(
            stack.bootstrap_servers,
            topics.finetune_events,
            until=lambda recs: any(json.loads(r.value)["event"] == "completed" for r in recs),
            timeout_s=420,
        )
        stream = [json.loads(r.value) for r in records]
        started = [e for e in stream if e["event"] == "started"]
        assert len(started) >= 2, [e["event"] for e in stream]
        assert started[0]["resumed_from_step"] is None
        assert started[-1]["resumed_from_step"] is not None
        assert started[-1]["resumed_from_step"] >= 5
        assert stream[-1]["event"] == "completed"
    finally:
        second.kill()
