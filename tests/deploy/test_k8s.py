"""Kustomize manifests under deploy/k8s: they render, pass the Kubernetes and CRD schemas, and agree with the
daemon's own settings model (drain vs grace period, consumer group, topics, ports, writable paths)."""

from __future__ import annotations

import copy
import functools
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pydantic
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
from cloudcoil.models.prometheus_operator.v1 import PodMonitor, PrometheusRule, ServiceMonitor
from kubernetes_validate.utils import SchemaNotFoundError

from ocrbooth.config import ENV_PREFIX, Settings, load_settings
from ocrbooth.handlers import load_handlers
from tests.deploy.tools import DEPLOY, REPO, run, tool

K8S = DEPLOY / "k8s"
# Current Kubernetes minors the built-in kinds must validate against (strict: unknown keys are errors).
K8S_VERSIONS = ("1.33.0", "1.35.0")
# Overlay directory -> the component label it puts on everything.
OVERLAYS = {"ocr-gpu": "ocr-gpu", "finetune-gpu": "finetune-gpu", "cpu": "ocr-cpu"}
TARGETS = {"base": K8S / "base", **{name: K8S / "overlays" / name for name in OVERLAYS}}
GPU_OVERLAYS = {"ocr-gpu", "finetune-gpu"}
GPU = "nvidia.com/gpu"
CRD_MODELS: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TriggerAuthentication,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
    ("monitoring.coreos.com/v1", "PodMonitor"): PodMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PrometheusRule,
}
EXPECTED_KINDS = {
    "ServiceAccount",
    "ConfigMap",
    "Service",
    "Deployment",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "ScaledObject",
    "TriggerAuthentication",
    "ServiceMonitor",
}
# The Secrets the manifests reference (created out of band, see deploy/README.md) and the keys they use.
SECRET_KEYS = {"ocrbooth-kafka": {"username", "password"}, "ocrbooth-s3": {"access-key-id", "secret-access-key"}}
# Trigger metadata is a free-form string map in the CRD, so the schema cannot catch a misspelt key; these are
# the parameters of KEDA 2.16's kafka scaler.
KAFKA_TRIGGER_KEYS = {
    "bootstrapServers",
    "consumerGroup",
    "topic",
    "lagThreshold",
    "activationLagThreshold",
    "offsetResetPolicy",
    "allowIdleConsumers",
    "scaleToZeroOnInvalidOffset",
    "excludePersistentLag",
    "limitToPartitionsWithLag",
    "version",
    "partitionLimitation",
    "sasl",
    "saslTokenProvider",
    "tls",
    "unsafeSsl",
    "awsRegion",
}
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
PARTITIONS_ANNOTATION = "partitions.ocrbooth.io/"
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|_TOKEN$")

Doc = dict[str, Any]
LoadSettings = Callable[[list[Doc]], Settings]


# ---- rendering ---------------------------------------------------------------------------------------------


@functools.cache
def _rendered(target: str) -> tuple[Doc, ...]:
    out = run(tool("kubectl"), "kustomize", str(TARGETS[target])).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def render(target: str) -> list[Doc]:
    """The documents `kubectl kustomize` renders for a target (a fresh copy each call, so tests may edit them)."""
    return copy.deepcopy(list(_rendered(target)))


def one(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(docs: list[Doc]) -> Doc:
    spec: Doc = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(docs: list[Doc]) -> Doc:
    containers = pod_spec(docs)["containers"]
    assert len(containers) == 1
    c: Doc = containers[0]
    return c


def config_data(docs: list[Doc]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap")["data"]
    return data


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


@pytest.fixture
def settings_for(monkeypatch: pytest.MonkeyPatch) -> LoadSettings:
    """Load the daemon's Settings from a rendered target: its ConfigMap plus a dummy value for every variable
    the Deployment takes from a Secret, with nothing else of this process's OCRBOOTH_* environment."""

    def load(docs: list[Doc]) -> Settings:
        for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
            monkeypatch.delenv(name)
        for key, value in config_data(docs).items():
            monkeypatch.setenv(key, value)
        for env in container(docs).get("env", []):
            if "secretKeyRef" in env.get("valueFrom", {}):
                monkeypatch.setenv(env["name"], "from-a-secret")
        return load_settings()

    return load


def known_env_names() -> set[str]:
    """Every OCRBOOTH_* variable the settings model reads (sections are one level deep)."""
    names = set()
    for field, info in Settings.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            names |= {f"{ENV_PREFIX}{field}_{sub}".upper() for sub in annotation.model_fields}
        else:
            names.add(f"{ENV_PREFIX}{field}".upper())
    return names


# ---- schemas -----------------------------------------------------------------------------------------------


def schema_errors(doc: Doc) -> list[str]:
    """Problems of one document: CRD kinds against the cloudcoil models with unknown keys forbidden, built-in
    kinds against every version in K8S_VERSIONS (strict); any other kind is itself a problem."""
    model = CRD_MODELS.get((doc.get("apiVersion", ""), doc.get("kind", "")))
    if model is not None:
        try:
            model.model_validate(doc, extra="forbid")
        except pydantic.ValidationError as exc:
            return [str(exc)]
        return []
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{version}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except SchemaNotFoundError:
            errors.append(f"{version}: no schema for {doc.get('apiVersion')} {doc.get('kind')}")
    return errors


def cli_problems(docs: list[Doc], tmp_path: Path) -> list[str]:
    """Lines of `kubernetes-validate --strict` that are not a pass (WARN covers kinds it has no schema for)."""
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    done = run(tool("kubernetes-validate"), "--strict", "-k", K8S_VERSIONS[0], str(path), check=False)
    lines = (done.stdout + done.stderr).splitlines()
    problems = [line for line in lines if "WARN" in line or "ERROR" in line]
    if done.returncode != 0 and not problems:
        problems.append(f"exit {done.returncode}")
    passed = [line for line in lines if line.startswith("INFO") and " passed " in line]
    if len(passed) != len(docs):
        problems.append(f"{len(passed)} of {len(docs)} documents reported as passed")
    return problems


def builtin(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_MODELS]


@pytest.mark.parametrize("target", TARGETS)
def test_renders_every_kind_once(target: str) -> None:
    """`kubectl kustomize` renders the target offline into exactly the expected kinds, one object of each."""
    docs = render(target)
    kinds = [d["kind"] for d in docs]
    assert sorted(kinds) == sorted(EXPECTED_KINDS), kinds
    for doc in docs:
        assert doc["metadata"]["name"], doc
        assert "namespace" not in doc["metadata"]  # `kubectl apply -n NS -k ...` decides


@pytest.mark.parametrize("target", TARGETS)
def test_every_document_passes_its_schema(target: str) -> None:
    """Built-in kinds pass the strict Kubernetes schemas of current versions; CRD kinds pass the KEDA and
    prometheus-operator models with unknown keys forbidden; nothing is left unchecked."""
    docs = render(target)
    assert any((d["apiVersion"], d["kind"]) in CRD_MODELS for d in docs)
    assert builtin(docs)
    problems = {f"{d['kind']}/{d['metadata']['name']}": schema_errors(d) for d in docs}
    assert not {k: v for k, v in problems.items() if v}


@pytest.mark.parametrize("target", TARGETS)
def test_kubernetes_validate_cli_passes_builtin_kinds(target: str, tmp_path: Path) -> None:
    """The kubernetes-validate CLI (strict) passes every rendered built-in document without a warning."""
    assert cli_problems(builtin(render(target)), tmp_path) == []


def test_schema_checks_reject_misspelt_keys(tmp_path: Path) -> None:
    """Negative controls: a misspelt key in a Deployment or a ScaledObject, at any depth, and an unknown kind
    are all reported by the same checks the manifests pass."""
    docs = render("ocr-gpu")
    deployment = one(docs, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    assert schema_errors(deployment)
    assert any("httpGett" in p for p in cli_problems([deployment], tmp_path))

    scaled = one(docs, "ScaledObject")
    top = copy.deepcopy(scaled)
    top["spec"]["maxReplicaCont"] = 3
    nested = copy.deepcopy(scaled)
    nested["spec"]["triggers"][0]["authenticationRefs"] = nested["spec"]["triggers"][0].pop("authenticationRef")
    typed = copy.deepcopy(scaled)
    typed["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 32  # KEDA wants strings
    for bad in (top, nested, typed):
        assert schema_errors(bad)
    assert schema_errors(scaled) == []

    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert schema_errors(unknown)
    assert cli_problems([unknown], tmp_path)


@pytest.mark.parametrize("target", TARGETS)
def test_kafka_trigger_metadata_keys_are_known(target: str) -> None:
    """Every kafka trigger uses only parameters KEDA's kafka scaler knows (the CRD cannot check this map)."""
    for trigger in one(render(target), "ScaledObject")["spec"]["triggers"]:
        assert trigger["type"] == "kafka"
        assert set(trigger["metadata"]) <= KAFKA_TRIGGER_KEYS, set(trigger["metadata"]) - KAFKA_TRIGGER_KEYS


# ---- settings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_configmap_is_valid_settings(target: str, settings_for: LoadSettings) -> None:
    """The rendered ConfigMap (plus the Secret-backed variables) loads into the daemon's Settings, names only
    variables the daemon reads, and its handlers construct."""
    docs = render(target)
    unknown = {k for k in config_data(docs) if k.startswith(ENV_PREFIX)} - known_env_names()
    assert not unknown
    settings = settings_for(docs)
    assert settings.metrics_host == "0.0.0.0"  # a pod listens on its own address
    assert settings.log.format == "json"
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.kafka.sasl_username == "from-a-secret"
    assert load_handlers(settings.handlers, settings)


@pytest.mark.parametrize(
    ("target", "handlers", "engine", "group"),
    [
        ("ocr-gpu", ["ocr"], "lightonocr", "ocrbooth-ocr"),
        ("cpu", ["ocr"], "tesseract", "ocrbooth-ocr"),
        ("finetune-gpu", ["finetune"], "auto", "ocrbooth-finetune"),
    ],
)
def test_overlay_settings(
    target: str, handlers: list[str], engine: str, group: str, settings_for: LoadSettings
) -> None:
    """Each overlay runs its own handlers and engine; both OCR overlays share one consumer group."""
    settings = settings_for(render(target))
    assert settings.handlers == handlers
    assert settings.ocr.engine == engine
    assert settings.group_id == group
    if target == "finetune-gpu":
        assert settings.finetune.max_concurrent_jobs == 1
        assert settings.finetune.devices == 1


@pytest.mark.parametrize("target", TARGETS)
def test_image_matches_package_version(target: str) -> None:
    """The image tag is the version in pyproject.toml, and the container runs the daemon."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    c = container(render(target))
    assert c["image"] == f"ghcr.io/ocrbooth/ocrbooth:{version}"
    assert c["args"] == ["run"]


# ---- pod ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_gpu_only_in_gpu_overlays(target: str) -> None:
    """Exactly the GPU overlays request and limit one NVIDIA GPU and are scheduled onto GPU nodes."""
    docs = render(target)
    resources = container(docs)["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert {"cpu", "memory"} <= set(resources["limits"])
    if target in GPU_OVERLAYS:
        assert resources["requests"][GPU] == 1
        assert resources["limits"][GPU] == 1
        assert pod_spec(docs)["nodeSelector"]
        assert any(t["key"] == GPU for t in pod_spec(docs)["tolerations"])
    else:
        assert GPU not in resources["requests"]
        assert GPU not in resources["limits"]
        assert "nodeSelector" not in pod_spec(docs)


@pytest.mark.parametrize("target", TARGETS)
def test_probes_use_health_endpoints_on_metrics_port(target: str, settings_for: LoadSettings) -> None:
    """Startup and liveness probe /healthz, readiness /readyz, on the named port the daemon listens on."""
    docs = render(target)
    settings = settings_for(docs)
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": settings.metrics_port}
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in (ports["metrics"], "metrics")
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model loads get minutes


@pytest.mark.parametrize("target", TARGETS)
def test_grace_period_exceeds_drain(target: str, settings_for: LoadSettings) -> None:
    """terminationGracePeriodSeconds is above OCRBOOTH_DRAIN_TIMEOUT_S from the rendered ConfigMap; with the
    finetune handler it leaves at least another 60 s after the drain (checkpoint upload, commit, close)."""
    docs = render(target)
    settings = settings_for(docs)
    grace = pod_spec(docs)["terminationGracePeriodSeconds"]
    headroom = 60 if "finetune" in settings.handlers else 10
    assert grace >= settings.drain_timeout_s + headroom
    if target == "finetune-gpu":
        assert settings.drain_timeout_s >= 300


@pytest.mark.parametrize("target", TARGETS)
def test_security_context(target: str) -> None:
    """Non-root uid/gid 10001, RuntimeDefault seccomp, read-only root, no privilege escalation, no capabilities,
    no service-account token and no service-link variables (they would collide with OCRBOOTH_*)."""
    docs = render(target)
    pod = pod_spec(docs)
    assert pod["securityContext"] == pod["securityContext"] | {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    sc = container(docs)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False


@pytest.mark.parametrize("target", TARGETS)
def test_writable_paths_are_volumes(target: str, settings_for: LoadSettings) -> None:
    """With a read-only root, /tmp, the model cache (HF_HOME) and the trainer workdir all sit on volumes,
    and every emptyDir has a size limit."""
    docs = render(target)
    settings = settings_for(docs)
    mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert set(mounts.values()) <= set(volumes)

    def on_volume(path: str) -> bool:
        return any(Path(path).is_relative_to(mount) for mount in mounts)

    assert "/tmp" in mounts  # noqa: S108 - the path is the mount point itself
    assert on_volume(config_data(docs)["HF_HOME"])
    if "finetune" in settings.handlers:
        assert on_volume(str(settings.finetune.workdir))
    for volume in volumes.values():
        assert volume["emptyDir"]["sizeLimit"], volume


@pytest.mark.parametrize("target", TARGETS)
def test_secrets_are_only_referenced(target: str) -> None:
    """No Secret is rendered; credentials reach the pod and KEDA only as references to the two Secrets, and no
    credential-like variable carries a literal value."""
    docs = render(target)
    assert "Secret" not in {d["kind"] for d in docs}
    refs = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container(docs)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {(name, key) for name, keys in SECRET_KEYS.items() for key in keys}
    env_names = {e["name"] for e in container(docs)["env"]} | set(config_data(docs))
    for name in env_names:
        if CREDENTIAL_NAME.search(name):
            assert name not in config_data(docs)
            entry = next(e for e in container(docs)["env"] if e["name"] == name)
            assert "value" not in entry
    auth = one(docs, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert {(r["name"], r["key"]) for r in auth} == {("ocrbooth-kafka", "username"), ("ocrbooth-kafka", "password")}


@pytest.mark.parametrize("target", TARGETS)
def test_env_from_references_rendered_configmap(target: str) -> None:
    """envFrom names the hashed ConfigMap that was rendered, so a settings change rolls the pods."""
    docs = render(target)
    name = one(docs, "ConfigMap")["metadata"]["name"]
    assert name.rsplit("-", 1)[0] != name  # the content hash suffix
    assert container(docs)["envFrom"] == [{"configMapRef": {"name": name}}]


# ---- scaling -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_scaledobject_matches_deployment_and_settings(target: str, settings_for: LoadSettings) -> None:
    """The ScaledObject targets the rendered Deployment, triggers on exactly the topics its handlers consume
    (not the broadcast control topic), measures the daemon's group on its brokers with its SASL/TLS mode,
    and never asks for more replicas than a trigger topic has partitions."""
    docs = render(target)
    settings = settings_for(docs)
    scaled = one(docs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"

    handlers = load_handlers(settings.handlers, settings)
    consumed = {topic for h in handlers for topic in h.input_topics()}
    broadcast = {topic for h in handlers for topic in h.broadcast_topics()}
    triggers = spec["triggers"]
    topics = [t["metadata"]["topic"] for t in triggers]
    assert sorted(topics) == sorted(consumed)
    assert not broadcast & set(topics)

    auth_names = {d["metadata"]["name"] for d in docs if d["kind"] == "TriggerAuthentication"}
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == settings.group_id
        assert meta["bootstrapServers"] == settings.kafka.bootstrap_servers
        assert meta["allowIdleConsumers"] == "false"
        assert meta["offsetResetPolicy"] == "earliest"  # the daemon's consumer uses auto_offset_reset=earliest
        assert int(meta["lagThreshold"]) >= 1
        assert meta["tls"] == ("enable" if settings.kafka.security_protocol in ("SSL", "SASL_SSL") else "disable")
        assert settings.kafka.sasl_mechanism is not None
        assert meta["sasl"] == KEDA_SASL[settings.kafka.sasl_mechanism]
        assert trigger["authenticationRef"]["name"] in auth_names

    annotations = scaled["metadata"]["annotations"]
    partitions = {k.removeprefix(PARTITIONS_ANNOTATION): int(v) for k, v in annotations.items() if "partitions" in k}
    assert set(partitions) == set(topics)
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= min(partitions.values())
    assert "replicas" not in one(docs, "Deployment")["spec"]  # the HPA owns it


@pytest.mark.parametrize("target", TARGETS)
def test_lag_threshold_matches_replica_capacity(target: str, settings_for: LoadSettings) -> None:
    """A replica's accepted but uncommitted messages count as lag, so each trigger's lagThreshold is at least
    what one replica holds (max_in_flight for OCR, max_concurrent_jobs for fine-tuning): a replica that is
    merely busy never asks for another. The finetune overlay may scale to zero."""
    docs = render(target)
    settings = settings_for(docs)
    spec = one(docs, "ScaledObject")["spec"]
    capacity = {
        settings.topics.ocr_requests: settings.max_in_flight,
        settings.topics.finetune_requests: settings.finetune.max_concurrent_jobs,
    }
    for trigger in spec["triggers"]:
        assert int(trigger["metadata"]["lagThreshold"]) >= capacity[trigger["metadata"]["topic"]]
    if target == "finetune-gpu":
        assert [t["metadata"]["lagThreshold"] for t in spec["triggers"]] == ["1"]
        assert spec["minReplicaCount"] == 0


# ---- monitoring, disruption, network -----------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_service_and_servicemonitor_reach_the_pods(target: str, settings_for: LoadSettings) -> None:
    """The metrics Service selects the pods and exposes the container's metrics port by name; the
    ServiceMonitor selects that Service and scrapes a port name it has."""
    docs = render(target)
    settings = settings_for(docs)
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service")
    assert selects(service["spec"]["selector"], pod_labels)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["metrics"]["port"] == settings.metrics_port
    assert ports["metrics"]["targetPort"] in {p["name"] for p in container(docs)["ports"]}
    monitor = one(docs, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= set(ports)
    assert all(e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"])
    # job="ocrbooth" whatever the overlay's name suffix: the alert rules select on it.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "ocrbooth"


@pytest.mark.parametrize("target", TARGETS)
def test_pdb_selects_the_deployment_pods(target: str) -> None:
    """The PodDisruptionBudget selects exactly the Deployment's pods and allows one voluntary eviction at a
    time (maxUnavailable, so a Deployment scaled to zero never blocks a node drain)."""
    docs = render(target)
    deployment = one(docs, "Deployment")
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert selects(pdb["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    assert pdb["maxUnavailable"] == 1
    assert "minAvailable" not in pdb


def _ports(rules: list[Doc]) -> set[tuple[int, str]]:
    return {(p["port"], p.get("protocol", "TCP")) for rule in rules for p in rule.get("ports", [])}


@pytest.mark.parametrize("target", TARGETS)
def test_networkpolicy_allows_only_what_the_daemon_needs(target: str, settings_for: LoadSettings) -> None:
    """The NetworkPolicy applies to the pods, admits only the metrics port, and lets out DNS, the configured
    Kafka brokers' port and HTTPS (S3, model hub)."""
    docs = render(target)
    settings = settings_for(docs)
    policy = one(docs, "NetworkPolicy")["spec"]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels)
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert _ports(policy["ingress"]) == {(settings.metrics_port, "TCP")}
    egress = _ports(policy["egress"])
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP")} <= egress
    broker_ports = {int(b.rsplit(":", 1)[1]) for b in settings.kafka.bootstrap_servers.split(",")}
    assert {(port, "TCP") for port in broker_ports} <= egress
    assert {(9092, "TCP"), (9093, "TCP"), (9094, "TCP")} <= egress
    assert all(rule.get("to") for rule in policy["egress"])  # no rule opens its ports to everything implicitly
    # Kustomize adds the overlay's labels to peers' podSelector.matchLabels, which would stop them matching
    # Prometheus or CoreDNS; peers must select with matchExpressions.
    peers = [p for rule in policy["ingress"] for p in rule["from"]] + [p for r in policy["egress"] for p in r["to"]]
    assert not [p for p in peers if "matchLabels" in p.get("podSelector", {})]


@pytest.mark.parametrize("target", TARGETS)
def test_common_labels(target: str) -> None:
    """Every object carries app.kubernetes.io/name=ocrbooth and its overlay's component label."""
    component = OVERLAYS.get(target, "daemon")
    for doc in render(target):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "ocrbooth", doc["metadata"]["name"]
        assert labels["app.kubernetes.io/component"] == component, doc["metadata"]["name"]


def test_overlays_coexist_in_one_namespace() -> None:
    """All three overlays can be applied to one namespace: no two objects share a kind and name, and no
    overlay's Deployment, Service, PDB, NetworkPolicy or ServiceMonitor selects another overlay's objects."""
    rendered = {name: render(name) for name in OVERLAYS}
    seen: dict[tuple[str, str], str] = {}
    for overlay, docs in rendered.items():
        for doc in docs:
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in seen, f"{key} in both {seen[key]} and {overlay}"
            seen[key] = overlay
    for overlay, docs in rendered.items():
        for other, other_docs in rendered.items():
            if other == overlay:
                continue
            other_pods = one(other_docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
            assert not selects(one(docs, "Deployment")["spec"]["selector"]["matchLabels"], other_pods)
            assert not selects(one(docs, "Service")["spec"]["selector"], other_pods)
            assert not selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], other_pods)
            assert not selects(one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], other_pods)
            other_service = one(other_docs, "Service")["metadata"]["labels"]
            assert not selects(one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"], other_service)
