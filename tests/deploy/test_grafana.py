"""The Grafana dashboard (deploy/grafana/ocrbooth.json): valid against Grafana's own dashboard types, queries only
what the daemon exports, filtered by the dashboard's variables, and covering every area operators watch."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError
from prometheus_client.metrics import MetricWrapperBase

from ocrbooth.metrics import LoopCounter, LoopHistogram, Metrics
from tests.deploy.promql import dashboard_exprs, grouping_labels, iter_panels, metric_names, selectors, substitute
from tests.deploy.tools import DEPLOY, run, tool

DASHBOARD = DEPLOY / "grafana" / "ocrbooth.json"
SCHEMA_DIR = DEPLOY / "grafana" / "schema"
SCHEMA = SCHEMA_DIR / "dashboard.schema.json"
SCHEMA_META = SCHEMA_DIR / "dashboard.schema.meta.json"

# Labels Prometheus adds when scraping through the ServiceMonitor, valid on every series.
TARGET_LABELS = frozenset({"namespace", "job", "instance", "pod", "service", "container", "endpoint"})
FILTER = {"namespace": ("=~", "$namespace"), "job": ("=~", "$job")}
# Sample names the dashboard must chart, one or more per area of the monitoring issue.
REQUIRED = (
    "ocrbooth_ocr_documents_total",  # throughput
    "ocrbooth_ocr_pages_total",
    "ocrbooth_handle_duration_seconds_bucket",  # end-to-end latency
    "ocrbooth_ocr_stage_duration_seconds_bucket",  # per-stage latency
    "ocrbooth_ocr_batch_pages_bucket",  # batch sizes
    "ocrbooth_ocr_batch_pages_sum",
    "ocrbooth_ocr_batch_pages_count",
    "ocrbooth_ocr_engine_busy_seconds_total",  # GPU busy fraction
    "ocrbooth_in_flight_messages",
    "ocrbooth_uncommitted_messages",
    "ocrbooth_paused_partitions",
    "ocrbooth_consumer_lag_messages",
    "ocrbooth_dead_letters_total",
    "ocrbooth_ocr_review_flags_total",
    "ocrbooth_ocr_page_confidence_ratio_bucket",
    "ocrbooth_finetune_running_jobs",
    "ocrbooth_finetune_jobs_total",
    "ocrbooth_finetune_trainer_restarts_total",
    "ocrbooth_finetune_steps_per_second",
    "ocrbooth_finetune_steps_total",
    "ocrbooth_finetune_loss",
    "ocrbooth_finetune_checkpoint_upload_duration_seconds_bucket",
    "ocrbooth_finetune_checkpoint_upload_failures_total",
    "ocrbooth_finetune_checkpoints_total",
    "ocrbooth_commits_total",
    "ocrbooth_commit_failures_total",
    "ocrbooth_rebalances_total",
    "ocrbooth_publish_duration_seconds_bucket",
    "ocrbooth_produced_messages_total",
    "ocrbooth_ready",
    "ocrbooth_build_info",
)
# Sample-name suffixes per family type, as the text exposition writes them.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def exported_samples() -> dict[str, tuple[str, frozenset[str]]]:
    """Sample name → (family type, label names) for every series a fresh `Metrics()` can expose."""
    metrics = Metrics()
    # Labelled families without children expose no samples, so their label names come from the collectors
    # (`_labelnames`: prometheus_client has no public accessor; metrics.py already relies on its internals; the
    # loop-thread metrics have `labelnames`).
    declared = {
        family.name: frozenset(collector._labelnames)
        for collector in vars(metrics).values()
        if isinstance(collector, MetricWrapperBase)
        for family in collector.describe()
    } | {
        family.name: frozenset(collector.labelnames)
        for collector in vars(metrics).values()
        if isinstance(collector, LoopCounter | LoopHistogram)
        for family in collector.describe()
    }
    samples: dict[str, tuple[str, frozenset[str]]] = {}
    for family in metrics.registry.collect():
        assert family.type in SUFFIXES, f"{family.name}: no sample names known for type {family.type}"
        labels = declared.get(family.name, frozenset()) | {k for s in family.samples for k in s.labels} - {"le"}
        for suffix in SUFFIXES[family.type]:
            samples[family.name + suffix] = (family.type, labels | ({"le"} if suffix == "_bucket" else set()))
    return samples


def schema_errors(instance: Any) -> list[str]:
    """Every validation error against the generated schema, as `path: message`. Inside `anyOf` (Panel | RowPanel)
    the branch with the fewest errors is the one the author meant; its errors are the real cause."""
    validator = jsonschema.Draft7Validator(load_json(SCHEMA))

    def leaves(error: ValidationError) -> Iterator[ValidationError]:
        if not error.context:
            yield error
            return
        branches: dict[Any, list[ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        closest = min(branches.values(), key=len)
        for sub in closest:
            yield from leaves(sub)

    return [
        f"{leaf.json_path}: {leaf.message[:300]}" for error in validator.iter_errors(instance) for leaf in leaves(error)
    ]


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = load_json(DASHBOARD)
    return board


def content_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in iter_panels(board["panels"]) if p["type"] != "row"]


def test_schema_is_draft7_dashboard() -> None:
    """The checked-in schema is a valid draft-07 schema of Grafana's `Dashboard` type that forbids unknown keys."""
    schema = load_json(SCHEMA)
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["$ref"] == "#/definitions/Dashboard"
    for name in ("Dashboard", "Panel", "RowPanel", "GridPos"):
        assert schema["definitions"][name]["additionalProperties"] is False, name


def test_dashboard_validates_against_grafana_schema() -> None:
    """ocrbooth.json has only keys and value types that Grafana's dashboard model defines."""
    errors = schema_errors(dashboard())
    assert not errors, "\n".join(errors)


def test_schema_rejects_misspelt_top_level_key() -> None:
    """Negative control: a misspelt top-level key fails validation and the message names it."""
    board = dashboard()
    board["refersh"] = board.pop("refresh")
    errors = schema_errors(board)
    assert errors
    assert any("'refersh' was unexpected" in e for e in errors), errors


def test_schema_rejects_misspelt_panel_key() -> None:
    """Negative control: a panel with `gridpos` fails, and the report points at that panel, not at RowPanel."""
    board = dashboard()
    index = next(i for i, p in enumerate(board["panels"]) if p["type"] != "row")
    board["panels"][index]["gridpos"] = board["panels"][index].pop("gridPos")
    errors = schema_errors(board)
    assert errors == [f"$.panels[{index}]: Additional properties are not allowed ('gridpos' was unexpected)"]


def test_schema_rejects_wrong_value_type() -> None:
    """Negative control: a grid position given as a string is rejected at its own path."""
    board = dashboard()
    board["panels"][0]["gridPos"]["w"] = "24"
    errors = schema_errors(board)
    assert any(e.startswith("$.panels[0].gridPos.w:") for e in errors), errors


def test_package_json_pins_exact_versions() -> None:
    """The schema toolchain is pinned exactly in package.json, and the lock file resolves those versions."""
    package = load_json(SCHEMA_DIR / "package.json")
    lock = load_json(SCHEMA_DIR / "package-lock.json")
    pins = package["devDependencies"]
    assert set(pins) == {"@grafana/schema", "ts-json-schema-generator", "typescript"}
    assert "dependencies" not in package
    for name, version in pins.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name}: {version!r} is not an exact version"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version, name
    assert lock["packages"][""]["devDependencies"] == pins
    assert pins["typescript"].startswith("5."), "ts-json-schema-generator 2.10 needs TypeScript 5, not 7"


def test_schema_metadata_matches_pins_and_file() -> None:
    """dashboard.schema.meta.json names the pinned versions, the generator's input, and the schema's hash."""
    meta = load_json(SCHEMA_META)
    pins = load_json(SCHEMA_DIR / "package.json")["devDependencies"]
    assert meta["versions"] == pins
    assert meta["type"] == "Dashboard"
    assert meta["source"] in (SCHEMA_DIR / "generate.sh").read_text()
    assert meta["sha256"] == hashlib.sha256(SCHEMA.read_bytes()).hexdigest(), "schema edited by hand; run generate.sh"
    readme = (SCHEMA_DIR / "README.md").read_text()
    for name, version in pins.items():
        assert f"{name}@{version}" in readme, f"README.md does not record {name}@{version}"


def test_generator_reproduces_schema(tmp_path: Path) -> None:
    """generate.sh, run with the pinned node_modules (`make install` runs `npm ci` there), writes exactly the
    checked-in schema."""
    assert shutil.which("node") is not None, "node is not installed; `make install` installs it"
    pins = load_json(SCHEMA_DIR / "package.json")["devDependencies"]
    for name, version in pins.items():
        installed = SCHEMA_DIR / "node_modules" / name / "package.json"
        assert installed.exists(), f"{name} is not in {SCHEMA_DIR}/node_modules; `make install` runs `npm ci` there"
        assert load_json(installed)["version"] == version, f"{name} in node_modules is not {version}; run `npm ci`"
    run(str(SCHEMA_DIR / "generate.sh"), "--no-install", str(tmp_path))
    assert (tmp_path / "dashboard.schema.json").read_bytes() == SCHEMA.read_bytes()
    assert load_json(tmp_path / "dashboard.schema.meta.json")["sha256"] == load_json(SCHEMA_META)["sha256"]


def test_dashboard_settings() -> None:
    """uid, title, refresh, time range and schema version are the ones links and provisioning rely on."""
    board = dashboard()
    assert board["uid"] == "ocrbooth"
    assert board["title"] == "ocrbooth"
    assert board["refresh"] == "30s"
    assert board["time"] == {"from": "now-6h", "to": "now"}
    assert 39 <= board["schemaVersion"] <= 41
    assert "ocrbooth" in board["tags"]


def test_templating_variables() -> None:
    """Exactly the datasource, namespace and job variables; namespace and job come from ocrbooth_build_info."""
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "job"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job"):
        variable = variables[name]
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        assert variable["type"] == "query"
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert re.fullmatch(rf"label_values\(ocrbooth_build_info(\{{[^}}]*\}})?, {name}\)", query), query
        assert variable["includeAll"] is True
        assert variable["allValue"] == ".*"
        assert variable["multi"] is True


def test_panels_are_complete() -> None:
    """Every panel has a unique id, the ${datasource} data source, a unit, and targets with refId and expr."""
    board = dashboard()
    ids = [p["id"] for p in iter_panels(board["panels"])]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    panels = content_panels(board)
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "panel titles repeat; failures name panels by title"
    assert {p["type"] for p in panels} <= {"timeseries", "stat", "heatmap", "bargauge", "histogram"}
    for panel in panels:
        title = panel["title"]
        assert title, f"panel {panel['id']} has no title"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel["targets"], f"{title}: no targets"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{title} {target['refId']}: empty expr"
            assert "legendFormat" in target, f"{title} {target['refId']}: no legendFormat"


def _overlaps(panels: list[dict[str, Any]]) -> list[str]:
    found = []
    boxes = [(p["title"] or p["type"], p["gridPos"]) for p in panels]
    for i, (a, pa) in enumerate(boxes):
        if not (pa["x"] >= 0 and pa["w"] > 0 and pa["h"] > 0 and pa["x"] + pa["w"] <= 24):
            found.append(f"{a!r} {pa} is outside the 24-column grid")
        for b, pb in boxes[i + 1 :]:
            apart_x = pa["x"] + pa["w"] <= pb["x"] or pb["x"] + pb["w"] <= pa["x"]
            apart_y = pa["y"] + pa["h"] <= pb["y"] or pb["y"] + pb["h"] <= pa["y"]
            if not (apart_x or apart_y):
                found.append(f"{a!r} {pa} overlaps {b!r} {pb}")
    return found


def test_panels_do_not_overlap() -> None:
    """Panels fit the 24-column grid without overlapping, at the top level and inside each collapsed row."""
    board = dashboard()
    assert not _overlaps(board["panels"])
    for row in board["panels"]:
        assert not _overlaps(row.get("panels", [])), row["title"]
    # The controls above would pass for an empty dashboard: check that the check can fail.
    twin = copy.deepcopy(board["panels"][1])
    assert _overlaps([board["panels"][1], twin])


def test_every_selector_is_filtered_by_variables() -> None:
    """Every series selector carries namespace=~"$namespace" and job=~"$job"; no other Grafana variable is used."""
    exprs = dashboard_exprs(DASHBOARD)
    assert len(exprs) >= 30
    for title, expr in exprs:
        names = metric_names(expr)
        found = selectors(expr)
        assert names <= {metric for metric, _, _ in found}, f"{title}: selector without matchers in {expr}"
        assert found, f"{title}: no selector in {expr}"
        for metric, matchers, _ in found:
            assert {k: matchers.get(k) for k in FILTER} == FILTER, f"{title}: {metric} is not filtered in {expr}"
        leftover = re.sub(r"\$(namespace|job|__rate_interval)\b", "", expr)
        assert "$" not in leftover, f"{title}: unexpected Grafana variable in {expr}"
        assert "$" not in substitute(expr)


def test_every_metric_is_exported_by_the_daemon() -> None:
    """Every ocrbooth_ name in a query (panels and variables) is a sample a fresh Metrics() registry exposes."""
    samples = exported_samples()
    assert "ocrbooth_build_info" in samples
    assert "ocrbooth_handle_duration_seconds_bucket" in samples
    queries = [expr for _, expr in dashboard_exprs(DASHBOARD)]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"])
    unknown = {name for expr in queries for name in metric_names(expr)} - set(samples)
    assert not unknown, f"not exported by ocrbooth/metrics.py: {sorted(unknown)}"
    # Negative control: a plausible but wrong name is caught the same way.
    assert metric_names('rate(ocrbooth_ocr_documents{job="x"}[1m])') - set(samples) == {"ocrbooth_ocr_documents"}


def test_labels_exist_on_the_metrics_queried() -> None:
    """Matchers and by/on clauses use only labels the queried families have, or the ones scraping adds;
    counters and histogram series are read through a range (rate/increase), and quantiles group by le."""
    samples = exported_samples()
    for title, expr in dashboard_exprs(DASHBOARD):
        available = set(TARGET_LABELS)
        for metric, matchers, is_range in selectors(expr):
            if metric == "up":
                labels: frozenset[str] = frozenset()
            else:
                kind, labels = samples[metric]
                if kind == "counter" or (kind == "histogram" and not metric.endswith("_created")):
                    assert is_range, f"{title}: {metric} is cumulative; read it with rate() or increase()"
            assert set(matchers) <= labels | TARGET_LABELS, f"{title}: {metric} has no {set(matchers) - labels}"
            available |= labels
        unknown = grouping_labels(expr) - available
        assert not unknown, f"{title}: grouping by {sorted(unknown)}, which no queried metric has: {expr}"
        if "histogram_quantile" in expr:
            assert "le" in grouping_labels(expr), f"{title}: histogram_quantile needs `by (..., le)`: {expr}"


def test_dashboard_covers_every_area() -> None:
    """Throughput, latency, batching, GPU, Kafka, dead letters, review, confidence and fine-tune series all appear."""
    used = {name for _, expr in dashboard_exprs(DASHBOARD) for name in metric_names(expr)}
    missing = sorted(set(REQUIRED) - used)
    assert not missing, f"no panel queries {missing}"
    busy = [expr for _, expr in dashboard_exprs(DASHBOARD) if 'engine="lightonocr"' in expr]
    assert any("rate(ocrbooth_ocr_engine_busy_seconds_total" in e for e in busy), "no GPU busy fraction panel"
    assert any(re.search(r"\bup\{", expr) for _, expr in dashboard_exprs(DASHBOARD)), "no scrape `up` panel"


def test_every_expr_parses_as_promql(tmp_path: Path) -> None:
    """promtool's PromQL parser accepts every dashboard query (after substitute()), each as a recording rule."""
    exprs = dashboard_exprs(DASHBOARD)
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query_{i}", "expr": substitute(e)} for i, (_, e) in enumerate(exprs)],
            }
        ]
    }
    (tmp_path / "dashboard.rules.json").write_text(json.dumps(rules))  # JSON is YAML
    done = run(tool("promtool"), "check", "rules", str(tmp_path / "dashboard.rules.json"))
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout, done.stdout
    # Negative control: an unbalanced parenthesis is a parse error.
    rules["groups"][0]["rules"] = [{"record": "dashboard:broken", "expr": "sum(rate(up[1m])"}]
    (tmp_path / "broken.rules.json").write_text(json.dumps(rules))
    broken = run(tool("promtool"), "check", "rules", str(tmp_path / "broken.rules.json"), check=False)
    assert broken.returncode != 0
    assert "unclosed left parenthesis" in broken.stdout + broken.stderr


def test_substitute_makes_plain_promql() -> None:
    """substitute() turns a dashboard query into one Prometheus accepts: variables match all, 1m rate window."""
    expr = 'sum(rate(ocrbooth_commits_total{namespace=~"$namespace", job=~"${job}"}[$__rate_interval]))'
    assert substitute(expr) == 'sum(rate(ocrbooth_commits_total{namespace=~".*", job=~".*"}[1m]))'
