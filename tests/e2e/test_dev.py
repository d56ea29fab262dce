"""`ocrbooth dev`: the embedded stack as a user runs it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3

from tests.support.daemon import REPO
from tests.support.kafka import consume_all, produce


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)


def _read_env(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, str]:
    env: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while "AWS_DEFAULT_REGION" not in env:
        assert time.monotonic() < deadline, f"no env lines after {timeout_s}s: {env}"
        line = proc.stdout.readline()
        assert line, f"ocrbooth dev exited early with {proc.poll()}"
        key, sep, value = line.strip().partition("=")
        if sep:
            env[key] = value.strip("'")
    return env


async def test_dev_prints_a_working_environment_and_keeps_data_across_restarts(tmp_path: Path) -> None:
    """`ocrbooth dev` prints env lines that reach a live broker and S3, stops cleanly on SIGINT, and a second
    run on the same data dir still has the records."""
    cmd = [
        sys.executable,
        "-m",
        "ocrbooth.cli",
        "dev",
        "--data-dir",
        str(tmp_path),
        "--kafka-port",
        "0",
        "--s3-port",
        "0",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for run in range(2):
        proc = _start(cmd, env)
        try:
            printed = await asyncio.to_thread(_read_env, proc, 90)
            bootstrap = printed["OCRBOOTH_KAFKA_BOOTSTRAP_SERVERS"]
            s3 = boto3.client(
                "s3",
                endpoint_url=printed["OCRBOOTH_S3_ENDPOINT_URL"],
                aws_access_key_id=printed["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=printed["AWS_SECRET_ACCESS_KEY"],
                region_name=printed["AWS_REGION"],
            )
            if run == 0:
                await produce(bootstrap, "ocr.requests", [(b"k", b"kept across restarts")])
                s3.put_object(Bucket=printed["OCRBOOTH_S3_BUCKET"], Key="probe.txt", Body=b"s3 kept")
            records = await consume_all(bootstrap, "ocr.requests", count=1, timeout_s=30)
            assert records[0].value == b"kept across restarts"
            body = s3.get_object(Bucket=printed["OCRBOOTH_S3_BUCKET"], Key="probe.txt")["Body"].read()
            assert body == b"s3 kept"
            proc.send_signal(signal.SIGINT)
            assert await asyncio.to_thread(proc.wait, 30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
