"""Settings: the public defaults, the documented environment names, YAML files, and all-at-once validation."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from ocrbooth import constants
from ocrbooth.config import Settings, load_settings
from ocrbooth.errors import ConfigError

SASL_PASSWORD = "hunter2-secret"


def _problems(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    lines = str(exc.value).splitlines()
    assert lines[0] == "invalid settings:"
    return [line.strip() for line in lines[1:]]


def test_defaults_match_the_public_contract() -> None:
    """Without environment or file, the settings are the documented defaults."""
    s = load_settings()
    assert s.group_id == "ocrbooth"
    assert s.handlers == ["ocr", "finetune"]
    assert s.metrics_port == 9400
    assert s.metrics_host == "127.0.0.1"
    assert s.s3.bucket == "ocrbooth"
    assert s.s3.endpoint_url is None
    assert s.kafka.security_protocol == "PLAINTEXT"
    assert s.kafka.enable_idempotence is True
    assert s.topics.model_dump() == {
        "ocr_requests": constants.TOPIC_OCR_REQUESTS,
        "ocr_results": constants.TOPIC_OCR_RESULTS,
        "ocr_review": constants.TOPIC_OCR_REVIEW,
        "finetune_requests": constants.TOPIC_FINETUNE_REQUESTS,
        "finetune_control": constants.TOPIC_FINETUNE_CONTROL,
        "finetune_events": constants.TOPIC_FINETUNE_EVENTS,
        "dlq": constants.TOPIC_DLQ,
    }


def test_documented_environment_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every documented OCRBOOTH_* name lands in its field, nested sections included."""
    env = {
        "OCRBOOTH_KAFKA_BOOTSTRAP_SERVERS": "broker-1:9092,broker-2:9092",
        "OCRBOOTH_GROUP_ID": "ocr-team",
        "OCRBOOTH_HANDLERS": "ocr, finetune",
        "OCRBOOTH_S3_ENDPOINT_URL": "http://127.0.0.1:8333",
        "OCRBOOTH_S3_BUCKET": "docs",
        "OCRBOOTH_METRICS_PORT": "9500",
        "OCRBOOTH_MAX_IN_FLIGHT": "8",
        "OCRBOOTH_TOPICS_OCR_REQUESTS": "tenant-a.ocr.requests",
        "OCRBOOTH_KAFKA_ENABLE_IDEMPOTENCE": "false",
        "OCRBOOTH_RETRY_MAX_ATTEMPTS": "3",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert s.kafka.bootstrap_servers == "broker-1:9092,broker-2:9092"
    assert s.group_id == "ocr-team"
    assert s.handlers == ["ocr", "finetune"]
    assert s.s3.endpoint_url == "http://127.0.0.1:8333"
    assert s.s3.bucket == "docs"
    assert s.metrics_port == 9500
    assert s.max_in_flight == 8
    assert s.topics.ocr_requests == "tenant-a.ocr.requests"
    assert s.topics.ocr_results == constants.TOPIC_OCR_RESULTS  # a section keeps its other defaults
    assert s.kafka.enable_idempotence is False
    assert s.kafka.client_id == "ocrbooth"
    assert s.retry.max_attempts == 3


def test_handlers_csv_accepts_a_single_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """OCRBOOTH_HANDLERS with one name (no comma) gives a one-element list."""
    monkeypatch.setenv("OCRBOOTH_HANDLERS", "echo")
    assert load_settings().handlers == ["echo"]


def test_yaml_file_is_read_and_environment_overrides_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A YAML file sets values over the defaults, and an environment variable beats the file."""
    config = tmp_path / "ocrbooth.yaml"
    config.write_text(
        "group_id: from-file\n"
        "handlers: [echo]\n"
        "max_in_flight: 16\n"
        "kafka:\n"
        "  bootstrap_servers: file-broker:9092\n"
        "  linger_ms: 20\n"
        "s3:\n"
        "  bucket: file-bucket\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("OCRBOOTH_GROUP_ID", "from-env")
    monkeypatch.setenv("OCRBOOTH_KAFKA_BOOTSTRAP_SERVERS", "env-broker:9092")
    s = load_settings(config)
    assert s.group_id == "from-env"
    assert s.kafka.bootstrap_servers == "env-broker:9092"
    assert s.kafka.linger_ms == 20  # the file's value in a section the environment also touched
    assert s.handlers == ["echo"]
    assert s.max_in_flight == 16
    assert s.s3.bucket == "file-bucket"


def test_yaml_file_applies_only_to_its_own_load(tmp_path: Path) -> None:
    """The file given to one load_settings call does not affect the next call without one."""
    config = tmp_path / "ocrbooth.yaml"
    config.write_text("group_id: from-file\n", encoding="utf-8")
    assert load_settings(config).group_id == "from-file"
    assert load_settings().group_id == "ocrbooth"


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    """A --config path that does not exist is reported as such, not as a crash."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as caught:
        load_settings(missing)
    assert str(missing) in str(caught.value)


def test_unknown_yaml_keys_are_rejected(tmp_path: Path) -> None:
    """A typo in the YAML file, top-level or inside a section, is an error naming the key."""
    config = tmp_path / "ocrbooth.yaml"
    config.write_text("group_idd: oops\nkafka:\n  bootstrap_server: x:9092\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    problems = _problems(caught)
    assert any(p.startswith("group_idd: Extra inputs are not permitted") for p in problems), problems
    assert any(p.startswith("kafka.bootstrap_server: Extra inputs are not permitted") for p in problems), problems


def test_every_problem_is_reported_in_one_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Field-level and cross-field problems all appear in one ConfigError, each with its env name where it has one."""
    missing_ca = tmp_path / "missing-ca.pem"
    monkeypatch.setenv("OCRBOOTH_MAX_IN_FLIGHT", "0")
    monkeypatch.setenv("OCRBOOTH_KAFKA_SESSION_TIMEOUT_MS", "10")
    monkeypatch.setenv("OCRBOOTH_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("OCRBOOTH_KAFKA_SSL_CAFILE", str(missing_ca))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    problems = _problems(caught)
    expected_problems = [
        "max_in_flight: Input should be greater than or equal to 1 (env OCRBOOTH_MAX_IN_FLIGHT)",
        "kafka.session_timeout_ms: Input should be greater than or equal to 1000"
        " (env OCRBOOTH_KAFKA_SESSION_TIMEOUT_MS)",
        "kafka.sasl_mechanism: required when security_protocol is SASL_*",
        "kafka.sasl_username/sasl_password: required when security_protocol is SASL_*",
        f"kafka.ssl_cafile: file {missing_ca} does not exist",
    ]
    for expected in expected_problems:
        assert expected in problems, f"{expected!r} missing from {problems}"
    assert len(problems) == len(set(problems)), "a problem was reported twice"


def test_cross_field_problems_alone_are_all_reported() -> None:
    """With every field valid on its own, each broken relation between fields is still listed."""
    with pytest.raises(ConfigError) as caught:
        load_settings(
            handlers=["echo", "echo"],
            retry={"initial_backoff_ms": 5_000, "max_backoff_ms": 1_000},
            kafka={"heartbeat_interval_ms": 20_000, "ssl_certfile": "cert.pem"},
            topics={"ocr_results": constants.TOPIC_OCR_REQUESTS},
        )
    problems = _problems(caught)
    assert "handlers: a handler is listed twice" in problems
    assert "retry.initial_backoff_ms: must not exceed retry.max_backoff_ms" in problems
    assert "kafka.heartbeat_interval_ms: must be at most a third of session_timeout_ms" in problems
    assert "kafka.ssl_certfile/ssl_keyfile: give both or neither" in problems
    assert "kafka.ssl_certfile: file cert.pem does not exist" in problems
    assert "topics: every topic needs its own name" in problems


def test_empty_handlers_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """OCRBOOTH_HANDLERS set to an empty string means no handler, which is rejected."""
    monkeypatch.setenv("OCRBOOTH_HANDLERS", " , ")
    with pytest.raises(ConfigError, match="at least one handler is required"):
        load_settings()


def _sasl(**kafka: object) -> Settings:
    """SASL settings passed as init overrides (the highest-priority source); a None value leaves the key out."""
    section = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "ocr-user",
        "sasl_password": SASL_PASSWORD,
        **kafka,
    }
    return load_settings(kafka={k: v for k, v in section.items() if v is not None})


def test_redacted_hides_the_sasl_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """The startup log form of the settings never contains the SASL password, but keeps the other values."""
    monkeypatch.setenv("OCRBOOTH_KAFKA_SASL_PASSWORD", "env-secret-pw")
    s = _sasl(sasl_password=None)
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == "env-secret-pw"
    rendered = json.dumps(s.redacted())
    assert "env-secret-pw" not in rendered
    assert "env-secret-pw" not in repr(s)
    assert s.redacted()["kafka"]["sasl_username"] == "ocr-user"
    assert s.redacted()["kafka"]["sasl_password"] == "*" * 10


def test_client_options_map_sasl_settings_to_aiokafka_kwargs() -> None:
    """SASL settings become aiokafka's sasl_mechanism / sasl_plain_username / sasl_plain_password."""
    opts = _sasl(bootstrap_servers="b:9093", request_timeout_ms=12_000).kafka.client_options()
    assert opts == {
        "bootstrap_servers": "b:9093",
        "client_id": "ocrbooth",
        "security_protocol": "SASL_PLAINTEXT",
        "request_timeout_ms": 12_000,
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "ocr-user",
        "sasl_plain_password": SASL_PASSWORD,
    }


def test_client_options_without_sasl_or_tls_are_plain() -> None:
    """The default PLAINTEXT settings pass no SASL or TLS options at all."""
    opts = load_settings().kafka.client_options()
    assert set(opts) == {"bootstrap_servers", "client_id", "security_protocol", "request_timeout_ms"}
    assert opts["security_protocol"] == "PLAINTEXT"


def test_client_options_build_an_ssl_context_for_sasl_ssl() -> None:
    """SASL_SSL adds an SSL context that verifies the brokers' host names."""
    opts = _sasl(security_protocol="SASL_SSL").kafka.client_options()
    assert opts["security_protocol"] == "SASL_SSL"
    assert opts["sasl_plain_password"] == SASL_PASSWORD
    assert isinstance(opts["ssl_context"], ssl.SSLContext)
    assert opts["ssl_context"].check_hostname is True
