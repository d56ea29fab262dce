"""The command line: `schemas` writes the wire contract, `run` refuses bad settings with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ocrbooth.cli import main
from ocrbooth.schemas import ALL_MODELS
from ocrbooth.schemas.registry import render_json_schema


def test_schemas_writes_one_json_schema_per_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ocrbooth schemas --out DIR` writes exactly one schema per wire model, each its model's rendered schema."""
    out = tmp_path / "nested" / "schemas"
    assert main(["schemas", "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{name}.schema.json" for name in ALL_MODELS)
    for name, model in ALL_MODELS.items():
        text = (out / f"{name}.schema.json").read_text(encoding="utf-8")
        schema = json.loads(text)
        assert schema["title"] == name
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert text == render_json_schema(model)
    printed = capsys.readouterr().out.splitlines()
    assert sorted(Path(line).name for line in printed) == written


def test_schemas_removes_stale_schema_files(tmp_path: Path) -> None:
    """A schema file of a model that no longer exists is removed; other files are left alone."""
    (tmp_path / "Renamed.schema.json").write_text("{}", encoding="utf-8")
    (tmp_path / "README.md").write_text("keep me", encoding="utf-8")
    assert main(["schemas", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "Renamed.schema.json").exists()
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == "keep me"


def test_schemas_requires_out(capsys: pytest.CaptureFixture[str]) -> None:
    """`schemas` without --out is a usage error (exit status 2) naming the missing option."""
    with pytest.raises(SystemExit) as caught:
        main(["schemas"])
    assert caught.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_run_with_invalid_env_exits_2_and_prints_every_problem(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ocrbooth run` with bad settings exits 2 before starting anything and lists each problem on stderr."""
    missing_ca = tmp_path / "ca.pem"
    monkeypatch.setenv("OCRBOOTH_MAX_IN_FLIGHT", "0")
    monkeypatch.setenv("OCRBOOTH_METRICS_PORT", "70000")
    monkeypatch.setenv("OCRBOOTH_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("OCRBOOTH_KAFKA_SSL_CAFILE", str(missing_ca))
    assert main(["run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith("ocrbooth: invalid settings:")
    for expected in (
        "max_in_flight: Input should be greater than or equal to 1 (env OCRBOOTH_MAX_IN_FLIGHT)",
        "metrics_port: Input should be less than or equal to 65535 (env OCRBOOTH_METRICS_PORT)",
        "kafka.sasl_mechanism: required when security_protocol is SASL_*",
        "kafka.sasl_username/sasl_password: required when security_protocol is SASL_*",
        f"kafka.ssl_cafile: file {missing_ca} does not exist",
    ):
        assert expected in err, f"{expected!r} missing from {err!r}"


def test_run_with_a_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ocrbooth run --config` naming a file that does not exist exits 2 and names the file."""
    missing = tmp_path / "ocrbooth.yaml"
    assert main(["run", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "--config" in err
    assert str(missing) in err


@pytest.mark.usefixtures("restore_logging")
def test_run_with_an_unknown_handler_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Settings that are valid but name a handler that cannot load also exit 2 with the reason."""
    monkeypatch.setenv("OCRBOOTH_HANDLERS", "echo,nope")
    monkeypatch.setenv("OCRBOOTH_LOG_FORMAT", "json")
    assert main(["run"]) == 2
    assert "handlers: unknown handler 'nope'" in capsys.readouterr().err
