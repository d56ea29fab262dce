"""A real Prometheus scrapes real daemons that process real events; every dashboard and alert expression runs
through its query API.

Two in-process daemons on the session stack: one with the `ocr` (Tesseract) and `finetune` handlers, one with
`ocr` on a tiny LightOnOCR on the CPU (so the GPU-engine series exist), each in its own consumer group over the
same topics. They OCR documents in two waves (so rates are non-zero whatever the scrape timing), dead-letter
malformed events, offload results over a small max_message_bytes to S3, and run one tiny DreamBooth job with
two checkpoints whose first trainer is killed (so the daemon restarts it). Prometheus (the Debian package)
scrapes both every second with the alert rules loaded. Then:

- every metric name the dashboard or the alerts use is in a daemon's /metrics;
- every counter the dashboard or the alerts use has moved (the few that only count failures are listed with
  the reason and the test that makes them move);
- every dashboard expression returns at least one finite sample (the few that are empty by design are listed
  with the reason);
- every alert expression is accepted by Prometheus and every series selector in it matches live series; on
  this healthy run no alert condition holds, except the ones listed with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from ocrbooth.dev.embedded import EmbeddedStack
from ocrbooth.testing import samples
from ocrbooth.testing.tiny_lightonocr import build_tiny_lightonocr
from tests.deploy.promql import dashboard_exprs, metric_names, substitute
from tests.deploy.tools import DEPLOY, tool
from tests.support.daemon import free_port, http_get, running_daemon, settings_for, trainer_pids
from tests.support.documents import numbered_pages_pdf
from tests.support.kafka import consume_all, produce, wait_until
from tests.support.stack import TopicNames, unique_suffix
from tests.support.tiny_sd import LOCAL_BASE_MODELS_ENV, build_tiny_sd, make_instance_images, tiny_job_request

pytest.importorskip("diffusers")

DASHBOARD = DEPLOY / "grafana" / "ocrbooth.json"
RULE = DEPLOY / "k8s" / "monitoring" / "prometheusrule.yaml"
SCRAPE_JOB = "ocrbooth"

# Counters that count only failures this healthy run does not provoke, and why.
UNMOVED_BY_DESIGN: dict[str, str] = {
    "ocrbooth_commit_failures_total": "the broker accepts every commit; a failed commit needs a broken coordinator",
    "ocrbooth_finetune_checkpoint_upload_failures_total": (
        "S3 accepts every upload; tests/integration/test_finetune.py fails uploads through a fault proxy and"
        " checks this count"
    ),
    "ocrbooth_handler_retries_total": (
        "S3 and the handlers never fail transiently here; tests/unit/test_dispatch.py checks this count"
    ),
    "ocrbooth_ocr_batch_splits_total": "no engine batch fails here; a split needs the engine to fail mid-batch",
}
EMPTY_PANELS: dict[str, str] = {
    "Seconds since trainer progress": "it shows only while a trainer runs (`and running_jobs > 0`); the job ended",
}
# Alert conditions that may hold on this run, and why.
MAY_FIRE: dict[str, str] = {
    "OcrboothDeadLetters": "the run dead-letters malformed events on purpose, at up to a few per second",
}
SELECTOR = re.compile(r"\b(ocrbooth_[a-z0-9_]+|up)\b(\{[^}]*\})?")


def _request(request_id: str, data: bytes, filename: str, **extra: object) -> bytes:
    source = {"data_base64": base64.b64encode(data).decode(), "filename": filename}
    return json.dumps(
        {"request_id": request_id, "document_id": f"doc-{request_id}", "source": source, **extra}
    ).encode()


def _wave(tag: str) -> list[tuple[bytes, bytes]]:
    """Documents (one strict enough to be flagged for review, one of four pages whose result passes 1 KiB) and
    malformed events."""
    text = samples.text_pdf(["Invoice 2041", "Total due: 1,250.00 EUR"])
    return [
        (f"{tag}-a".encode(), _request(f"{tag}-a", numbered_pages_pdf(4), "a.pdf", options={"max_new_tokens": 8})),
        (f"{tag}-b".encode(), _request(f"{tag}-b", text, "b.pdf", options={"review_threshold": 1.0})),
        (f"{tag}-c".encode(), b"{not json"),
        (f"{tag}-d".encode(), json.dumps({"schema_version": 1, "document_id": "no-request-id"}).encode()),
    ]


class Prometheus:
    """The Debian `prometheus` server on 127.0.0.1, scraping the given targets every second."""

    def __init__(self, workdir: Path, targets: list[str], rules: dict[str, Any]) -> None:
        self.port = free_port()
        (workdir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yaml")],
            "scrape_configs": [{"job_name": SCRAPE_JOB, "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; fails the test when Prometheus rejects the expression."""
        try:
            answer = self.get("/api/v1/query", query=expr)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Prometheus rejected {expr!r}: {exc.read().decode()}") from exc
        assert answer["status"] == "success", (expr, answer)
        data = answer["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    async def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
            if (await asyncio.to_thread(http_get, f"http://127.0.0.1:{self.port}/-/ready"))[0] == 200:
                return
            await asyncio.sleep(0.3)
        raise AssertionError("prometheus did not become ready")

    async def wait_scraped_after(self, moment: float, timeout_s: float = 60) -> None:
        """Until every target's latest scrape is later than `moment` (Unix time)."""

        def scraped() -> bool:
            result = self.query(f'min(timestamp(up{{job="{SCRAPE_JOB}"}}))')
            return bool(result) and float(result[0]["value"][1]) > moment

        await wait_until(lambda: asyncio.to_thread(scraped), timeout_s, interval_s=0.5, message="no scrape")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def _alert_exprs(topics: TopicNames) -> dict[str, str]:
    """Each alert's expression, pointed at this test's topic names (the rules use the default names)."""
    spec = yaml.safe_load(RULE.read_text())["spec"]
    renames = {'"ocr.requests"': f'"{topics.ocr_requests}"', '"finetune.requests"': f'"{topics.finetune_requests}"'}
    exprs = {}
    for group in spec["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"]
            for old, new in renames.items():
                expr = expr.replace(old, new)
            exprs[rule["alert"]] = expr
    return exprs


def _rules_for(topics: TopicNames) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(RULE.read_text())["spec"]
    exprs = _alert_exprs(topics)
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule["expr"] = exprs[rule["alert"]]
    return spec


def _exported_names(metrics_text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in metrics_text.splitlines() if line and not line.startswith("#")}


async def test_dashboard_and_alert_queries_on_a_real_prometheus(
    monkeypatch: pytest.MonkeyPatch,
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    s3_prefix: str,
    tmp_path: Path,
) -> None:
    workdir = tmp_path
    # Inputs: a tiny LightOnOCR, a tiny Stable Diffusion and three subject photos in S3.
    tiny_ocr = build_tiny_lightonocr(workdir / "tiny-lightonocr")
    tiny_sd = build_tiny_sd(workdir / "tiny-sd")
    s3 = stack.s3_client()
    for i, data in enumerate(make_instance_images(3)):
        s3.put_object(Bucket=stack.bucket, Key=f"{s3_prefix}instance/{i}.png", Body=data)
    images = f"s3://{stack.bucket}/{s3_prefix}instance/"

    ports = [free_port(), free_port()]
    common = {
        **daemon_env,
        "OCRBOOTH_OCR_RENDER_WORKERS": "1",
        "OCRBOOTH_OCR_RENDER_LONGEST_PX": "400",
        "OCRBOOTH_ECHO_FAULTS": "false",
    }
    lightonocr = settings_for(
        monkeypatch,
        common,
        OCRBOOTH_HANDLERS="ocr",
        OCRBOOTH_GROUP_ID=f"{daemon_env['OCRBOOTH_GROUP_ID']}-gpu-engine",
        OCRBOOTH_OCR_ENGINE="lightonocr",
        OCRBOOTH_OCR_MODEL=str(tiny_ocr),
        OCRBOOTH_OCR_DEVICE="cpu",
        OCRBOOTH_OCR_RENDER_LONGEST_PX="224",
        OCRBOOTH_METRICS_PORT=str(ports[1]),
        OCRBOOTH_MAX_MESSAGE_BYTES="1024",  # its results go to S3 (ocrbooth_offloaded_messages_total)
    )
    # Last: the trainer subprocesses of the finetune handler inherit the environment this leaves.
    tesseract = settings_for(
        monkeypatch,
        common,
        OCRBOOTH_HANDLERS="ocr,finetune",
        OCRBOOTH_OCR_ENGINE="tesseract",
        OCRBOOTH_METRICS_PORT=str(ports[0]),
        OCRBOOTH_FINETUNE_WORKDIR=str(workdir / "work"),
        OCRBOOTH_FINETUNE_PROGRESS_EVERY_STEPS="1",
        HF_HUB_OFFLINE="1",
        **LOCAL_BASE_MODELS_ENV,  # the tiny base model is a local folder
    )
    prometheus = Prometheus(workdir, [f"127.0.0.1:{p}" for p in ports], _rules_for(topics))
    try:
        await prometheus.wait_ready()
        async with running_daemon(tesseract), running_daemon(lightonocr):
            job_id = f"ft-{unique_suffix()}"
            await produce(stack.bootstrap_servers, topics.ocr_requests, _wave("w1"))
            await produce(
                stack.bootstrap_servers,
                topics.finetune_requests,
                [(job_id.encode(), tiny_job_request(job_id, tiny_sd, images))],
            )
            # A crashed trainer is restarted (ocrbooth_finetune_trainer_restarts_total): kill the first one.
            pids = await wait_until(
                lambda: trainer_pids(workdir / "work"), timeout_s=300, message="no trainer subprocess started"
            )
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            # Two daemons in two groups: every document is answered twice.
            await consume_all(stack.bootstrap_servers, topics.ocr_results, count=4, timeout_s=300)
            events = await consume_all(
                stack.bootstrap_servers,
                topics.finetune_events,
                until=lambda recs: any(json.loads(r.value)["event"] in ("completed", "failed") for r in recs),
                timeout_s=600,
            )
            assert json.loads(events[-1].value)["event"] == "completed", [json.loads(r.value) for r in events]
            await produce(stack.bootstrap_servers, topics.ocr_requests, _wave("w2"))
            await consume_all(stack.bootstrap_servers, topics.ocr_results, count=8, timeout_s=300)
            await prometheus.wait_scraped_after(time.time() + 2)  # counters that move after the last result

            exported: set[str] = set()
            for port in ports:
                exported |= _exported_names((await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics"))[1])
            await _check_queries(prometheus, topics, exported)
    finally:
        prometheus.stop()


async def _check_queries(prometheus: Prometheus, topics: TopicNames, exported: set[str]) -> None:
    targets = prometheus.get("/api/v1/targets")["data"]["activeTargets"]
    assert len(targets) == 2, targets
    assert all(t["health"] == "up" for t in targets), targets

    # 1. Every metric the dashboard or the alerts name is exported by a daemon.
    panels = dashboard_exprs(DASHBOARD)
    alerts = _alert_exprs(topics)
    used = {n for _, e in panels for n in metric_names(e)} | {n for e in alerts.values() for n in metric_names(e)}
    missing = used - exported
    assert not missing, f"used by the dashboard or alerts but not exported: {sorted(missing)}"

    # 2. Every counter they use has moved on this run, unless it only counts failures the run does not provoke.
    assert UNMOVED_BY_DESIGN.keys() <= used, "an exemption for a counter nothing uses"
    unmoved = []
    for name in sorted(n for n in used if n.endswith("_total")):
        total = await asyncio.to_thread(prometheus.query, f"sum({name})")
        moved = _finite(total) and float(total[0]["value"][1]) > 0
        if moved and name in UNMOVED_BY_DESIGN:
            unmoved.append(f"{name} moved: drop its exemption ({UNMOVED_BY_DESIGN[name]})")
        elif not moved and name not in UNMOVED_BY_DESIGN:
            unmoved.append(f"{name} never moved: {total}")
    assert not unmoved, "counters:\n" + "\n".join(unmoved)

    # 3. Every dashboard expression returns a finite sample, unless the panel is empty by design.
    empty = []
    for title, expr in panels:
        query = substitute(expr.replace("$__rate_interval", "5m"))
        result = await asyncio.to_thread(prometheus.query, query)
        if not _finite(result) and title not in EMPTY_PANELS:
            empty.append(f"{title}: {query}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

    # 4. Every alert expression is valid, its selectors match live series, and it does not hold on this run.
    firing = []
    for name, expr in alerts.items():
        result = await asyncio.to_thread(prometheus.query, expr)
        if result and name not in MAY_FIRE:
            firing.append(f"{name}: {result}")
        for match in SELECTOR.finditer(expr):
            selector = match.group(0)
            assert await asyncio.to_thread(prometheus.query, selector), f"{name}: {selector} matches no series"
    assert not firing, "alert conditions hold on a healthy run:\n" + "\n".join(firing)
    rules = prometheus.get("/api/v1/rules")["data"]["groups"]
    assert {r["name"] for g in rules for r in g["rules"]} == set(alerts)
    assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
