"""The alert rules: valid for Prometheus, and each one proven by `promtool test rules` to fire when it should and
stay quiet when it should not. The rules live once, in the PrometheusRule that Kustomize ships
(deploy/k8s/monitoring/prometheusrule.yaml); these tests run its `spec` as a plain rules file."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import DEPLOY, run, tool

RULE = DEPLOY / "k8s" / "monitoring" / "prometheusrule.yaml"
UNIT_TESTS = DEPLOY / "prometheus" / "alerts_test.yaml"

# What the issue asks the alerts to cover, by the alert that covers it.
REQUIRED = {
    "lag growing for N minutes": "OcrboothConsumerLagGrowing",
    "dead letters above a rate": "OcrboothDeadLetters",
    "no progress while lag exists": "OcrboothNoProgress",
    "GPU idle while lag exists": "OcrboothGpuIdleWithBacklog",
    "a training job with no progress": "OcrboothTrainingStalled",
    "checkpoint upload failures": "OcrboothCheckpointUploadFailures",
    "review rate spike": "OcrboothReviewRateSpike",
    "daemon down": "OcrboothDown",
}


def rule_groups() -> dict[str, Any]:
    doc = yaml.safe_load(RULE.read_text())
    assert doc["kind"] == "PrometheusRule"
    spec: dict[str, Any] = doc["spec"]
    return spec


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups()["groups"] for r in g["rules"] if "alert" in r}


def write_suite(directory: Path, spec: dict[str, Any]) -> Path:
    """rules.yaml (the PrometheusRule's spec) beside a copy of the unit tests, as promtool expects."""
    (directory / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(UNIT_TESTS, directory / "alerts_test.yaml")
    return directory / "alerts_test.yaml"


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    write_suite(tmp_path, rule_groups())
    done = run(tool("promtool"), "check", "rules", str(tmp_path / "rules.yaml"))
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_alert_unit_tests_pass(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, rule_groups())
    done = run(tool("promtool"), "test", "rules", str(suite), cwd=tmp_path)
    assert "SUCCESS" in done.stdout + done.stderr


def test_every_required_alert_exists_with_severity_and_summary() -> None:
    found = alerts()
    for need, name in REQUIRED.items():
        assert name in found, f"no alert for {need!r}"
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"].get("summary"), name
        assert rule["annotations"].get("description"), name


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases: dict[str, list[int]] = {}
    for group in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(len(case["exp_alerts"]))
    for name in alerts():
        counts = cases.get(name, [])
        assert any(n > 0 for n in counts), f"{name}: no case where it fires"
        assert any(n == 0 for n in counts), f"{name}: no case where it stays quiet"


@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        ("OcrboothDown", "== 0", "== 1"),  # inverted: would page for every healthy replica
        ("OcrboothDeadLetters", "> 0.05", "> 5"),  # a threshold nobody reaches: would never fire
    ],
)
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, alert: str, old: str, new: str) -> None:
    """Negative control: with one rule broken, `promtool test rules` fails and names that alert."""
    spec = rule_groups()
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                assert old in rule["expr"]
                rule["expr"] = rule["expr"].replace(old, new)
    suite = write_suite(tmp_path, spec)
    done = run(tool("promtool"), "test", "rules", str(suite), cwd=tmp_path, check=False)
    assert done.returncode != 0
    assert f"alertname: {alert}" in done.stdout + done.stderr


def test_monitoring_kustomization_renders_one_valid_prometheus_rule() -> None:
    """`kubectl kustomize deploy/k8s/monitoring` gives exactly the PrometheusRule, valid for the prometheus-operator
    CRD with unknown keys forbidden, carrying the same rules the unit tests exercise."""
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule

    out = run(tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "monitoring")).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["kind"] for d in docs] == ["PrometheusRule"]
    PrometheusRule.model_validate(docs[0], extra="forbid")
    assert docs[0]["spec"] == rule_groups()
    assert docs[0]["metadata"]["labels"]["app.kubernetes.io/name"] == "ocrbooth"
