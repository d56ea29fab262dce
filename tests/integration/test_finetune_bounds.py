"""Fine-tune requests past an operator bound fail through Kafka with their code, and no trainer is launched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ocrbooth.dev.embedded import EmbeddedStack
from tests.support.daemon import running_daemon, settings_for
from tests.support.kafka import consume_all, produce
from tests.support.stack import TopicNames, unique_suffix


def _request(job_id: str, bucket: str, **overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "job_id": job_id,
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "instance_images": [f"s3://{bucket}/uploads/{job_id}/"],
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of dog",
    }
    return json.dumps(fields | overrides).encode()


async def test_bad_requests_fail_with_their_codes_without_a_trainer(
    monkeypatch: pytest.MonkeyPatch,
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """A 100 KB base_model, `/etc` as base model, another job's output prefix, a `..` instance image, too many
    validation prompts, a checkpoint every step, an oversized batch: each job's only event is `failed` with its
    code (no `accepted`); `Infinity` as guidance_scale is dead-lettered as schema_violation; the trainer
    workdir stays empty."""
    bucket, suffix = stack.bucket, unique_suffix()
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "long": ({"base_model": "/" + "a" * 100_000}, "string_too_long"),
        "etc": ({"base_model": "/etc"}, "base_model_not_allowed"),
        "output": ({"output_uri": f"s3://{bucket}/jobs/someone-else/output/"}, "output_uri_not_allowed"),
        "dotdot": ({"instance_images": [f"s3://{bucket}/uploads/../jobs/x/"]}, "invalid_uri"),
        "prompts": ({"validation_prompts": [f"p{i}" for i in range(50)]}, "too_many_prompts"),
        "checkpoints": ({"max_train_steps": 5000, "checkpointing_steps": 1}, "too_many_checkpoints"),
        "batch": ({"train_batch_size": 1000}, "batch_too_large"),
    }
    jobs = {name: f"ft-{name}-{suffix}" for name in cases}
    infinite = f"ft-inf-{suffix}"
    items = [(jobs[name].encode(), _request(jobs[name], bucket, **fields)) for name, (fields, _) in cases.items()]
    items.append((infinite.encode(), _request(infinite, bucket, guidance_scale=7.5).replace(b"7.5", b"Infinity")))
    await produce(stack.bootstrap_servers, topics.finetune_requests, items, partition=0)
    workdir = tmp_path / "work"
    env = {**daemon_env, "OCRBOOTH_HANDLERS": "finetune", "OCRBOOTH_FINETUNE_WORKDIR": str(workdir)}
    async with running_daemon(settings_for(monkeypatch, env)):
        events = await consume_all(stack.bootstrap_servers, topics.finetune_events, count=len(cases), timeout_s=120)
        letters = await consume_all(stack.bootstrap_servers, topics.dlq, count=1, timeout_s=60)
    by_job: dict[str, list[dict[str, Any]]] = {}
    for record in events:
        event = json.loads(record.value)
        by_job.setdefault(event["job_id"], []).append(event)
    for name, (_, code) in cases.items():
        stream = by_job[jobs[name]]
        assert [e["event"] for e in stream] == ["failed"], stream
        assert stream[0]["error"]["code"] == code, stream[0]
    assert max(len(record.value) for record in events) < 10_000  # the 100 KB base_model is not echoed back
    assert infinite not in by_job
    [letter] = [json.loads(r.value) for r in letters]
    assert letter["error"]["code"] == "schema_violation"
    assert "guidance_scale" in letter["error"]["message"]
    assert not workdir.exists() or not any(workdir.iterdir()), "a trainer workdir was created"
