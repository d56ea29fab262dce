"""`ocrbooth` given malformed command lines, bad files and unreachable services, run as a real subprocess: one
line naming the problem, exit status 2 for usage errors and 1 for runtime failures, never a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ocrbooth.dev.embedded import EmbeddedStack
from tests.support.daemon import REPO

USAGE, FAILURE = 2, 1
# The CLI probes each service at most twice with a 1.5 s timeout; this leaves room for a loaded 2-core machine.
UNREACHABLE_BOUND_S = 20.0
_PARALLEL = 4  # subprocesses at once: each mostly waits on imports and sockets


@dataclass(frozen=True)
class Case:
    """One command line; `{ws}`, `{busy}` and `{silent}` in argv and env are filled in per run."""

    id: str
    argv: list[str]
    status: int
    expect: list[str]
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()


def _cases() -> list[Case]:
    ok = ["--instance-prompt", "a photo of sks dog", "--class-prompt", "a photo of dog"]
    gen = ["--prompt", "a dog", "--out", "{ws}/gen"]
    return [
        # the top level
        Case("no-command", [], USAGE, ["required", "command"]),
        Case("unknown-command", ["frobnicate"], USAGE, ["invalid choice", "frobnicate"]),
        # run
        Case("run-unknown-option", ["run", "--bogus"], USAGE, ["unrecognized arguments", "--bogus"]),
        Case("run-config-missing", ["run", "--config", "{ws}/missing.yaml"], USAGE, ["missing.yaml", "does not exist"]),
        Case("run-config-bad-yaml", ["run", "--config", "{ws}/bad.yaml"], USAGE, ["bad.yaml", "not valid YAML"]),
        Case("run-config-directory", ["run", "--config", "{ws}/adir"], USAGE, ["adir", "is a directory"]),
        Case("run-config-list", ["run", "--config", "{ws}/list.yaml"], USAGE, ["list.yaml", "mapping"]),
        Case("run-config-scalar", ["run", "--config", "{ws}/scalar.yaml"], USAGE, ["scalar.yaml", "mapping"]),
        Case("run-config-binary", ["run", "--config", "{ws}/binary.yaml"], USAGE, ["binary.yaml", "UTF-8"]),
        Case("run-config-unknown-key", ["run", "--config", "{ws}/unknown.yaml"], USAGE, ["nope", "not permitted"]),
        Case("run-config-bad-value", ["run", "--config", "{ws}/zero.yaml"], USAGE, ["max_in_flight"]),
        Case(
            "run-env-bad-value",
            ["run"],
            USAGE,
            ["metrics_port", "OCRBOOTH_METRICS_PORT"],
            {"OCRBOOTH_METRICS_PORT": "70000"},
        ),
        # dev
        Case("dev-kafka-port-too-big", ["dev", "--kafka-port", "99999"], USAGE, ["--kafka-port", "99999"]),
        Case("dev-s3-port-negative", ["dev", "--s3-port", "-1"], USAGE, ["--s3-port", "-1"]),
        Case("dev-port-not-a-number", ["dev", "--kafka-port", "abc"], USAGE, ["--kafka-port", "not a whole number"]),
        Case("dev-same-ports", ["dev", "--kafka-port", "40001", "--s3-port", "40001"], USAGE, ["different ports"]),
        Case("dev-no-partitions", ["dev", "--partitions", "0"], USAGE, ["--partitions", "at least 1"]),
        Case("dev-data-dir-is-a-file", ["dev", "--data-dir", "{ws}/afile"], USAGE, ["--data-dir", "not a directory"]),
        Case(
            "dev-data-dir-unwritable",
            ["dev", "--data-dir", "{ws}/afile/dev", "--kafka-port", "0", "--s3-port", "0"],
            FAILURE,
            ["afile/dev", "--data-dir"],
        ),
        Case(
            "dev-kafka-port-busy",
            ["dev", "--data-dir", "{ws}/dev", "--kafka-port", "{busy}", "--s3-port", "0"],
            FAILURE,
            ["{busy}", "already in use", "--kafka-port 0"],
        ),
        # demo
        Case("demo-unknown-option", ["demo", "--bogus"], USAGE, ["unrecognized arguments", "--bogus"]),
        Case("demo-extra-argument", ["demo", "now"], USAGE, ["unrecognized arguments", "now"]),
        # submit
        Case("submit-no-files", ["submit"], USAGE, ["required", "files"]),
        Case("submit-missing-file", ["submit", "{ws}/missing.pdf"], USAGE, ["no such file", "missing.pdf"]),
        Case("submit-directory", ["submit", "{ws}/adir"], USAGE, ["adir", "is a directory"]),
        Case(
            "submit-bad-languages", ["submit", "--languages", "../x,,", "{ws}/doc.pdf"], USAGE, ["--languages", "../x"]
        ),
        Case("submit-empty-languages", ["submit", "--languages", "", "{ws}/doc.pdf"], USAGE, ["--languages"]),
        Case("submit-unknown-engine", ["submit", "--engine", "nope", "{ws}/doc.pdf"], USAGE, ["--engine", "nope"]),
        Case("submit-zero-tokens", ["submit", "--max-new-tokens", "0", "{ws}/doc.pdf"], USAGE, ["--max-new-tokens"]),
        Case("submit-negative-timeout", ["submit", "--timeout-s", "-5", "{ws}/doc.pdf"], USAGE, ["--timeout-s"]),
        Case("submit-out-is-a-file", ["submit", "--out", "{ws}/afile", "{ws}/doc.pdf"], USAGE, ["--out", "afile"]),
        Case("submit-bad-config", ["submit", "--config", "{ws}/bad.yaml", "{ws}/doc.pdf"], USAGE, ["not valid YAML"]),
        Case(
            "submit-out-unwritable",
            ["submit", "--out", "{ws}/afile/results", "{ws}/doc.pdf"],
            FAILURE,
            ["--out", "afile/results"],
        ),
        Case(
            "submit-services-closed",
            ["submit", "{ws}/doc.pdf"],
            FAILURE,
            ["S3 at http://127.0.0.1:{closed}", "Kafka", "127.0.0.1:{closed}", "ocrbooth dev"],
        ),
        Case(
            "submit-services-silent",
            ["submit", "{ws}/doc.pdf"],
            FAILURE,
            ["S3 at http://127.0.0.1:{silent}", "did not answer", "Kafka", "127.0.0.1:{silent}"],
            {
                "OCRBOOTH_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:{silent}",
                "OCRBOOTH_S3_ENDPOINT_URL": "http://127.0.0.1:{silent}",
            },
        ),
        Case(
            "submit-no-credentials",
            ["submit", "{ws}/doc.pdf"],
            FAILURE,
            ["no AWS credentials", "AWS_ACCESS_KEY_ID"],
            unset=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
        ),
        # finetune
        Case("finetune-no-prompt", ["finetune", "{ws}/imgs"], USAGE, ["required", "--instance-prompt"]),
        Case("finetune-missing-dir", ["finetune", "{ws}/nope", *ok], USAGE, ["no such directory", "nope"]),
        Case("finetune-dir-is-a-file", ["finetune", "{ws}/afile", *ok], USAGE, ["afile", "not a directory"]),
        Case("finetune-no-images", ["finetune", "{ws}/empty", *ok], USAGE, ["no images", "empty"]),
        Case(
            "finetune-zero-steps",
            ["finetune", "{ws}/imgs", *ok, "--max-train-steps", "0"],
            USAGE,
            ["--max-train-steps"],
        ),
        Case(
            "finetune-bad-resolution",
            ["finetune", "{ws}/imgs", *ok, "--resolution", "12"],
            USAGE,
            ["--resolution", "8"],
        ),
        Case(
            "finetune-empty-prompt",
            ["finetune", "{ws}/imgs", "--instance-prompt", "", "--class-prompt", "a dog"],
            USAGE,
            ["--instance-prompt"],
        ),
        Case(
            "finetune-services-closed",
            ["finetune", "{ws}/imgs", *ok],
            FAILURE,
            ["S3 at http://127.0.0.1:{closed}", "Kafka", "OCRBOOTH_KAFKA_BOOTSTRAP_SERVERS"],
        ),
        # generate
        Case("generate-no-prompt", ["generate", "--model", "m", "--out", "{ws}/gen"], USAGE, ["required", "--prompt"]),
        Case(
            "generate-missing-model",
            ["generate", "--model", "{ws}/nonexistent", *gen],
            USAGE,
            ["--model", "nonexistent"],
        ),
        Case("generate-model-not-a-pipeline", ["generate", "--model", "{ws}/adir", *gen], USAGE, ["model_index.json"]),
        Case("generate-zero-images", ["generate", "--model", "m", "--num-images", "0", *gen], USAGE, ["--num-images"]),
        Case(
            "generate-out-is-a-file",
            ["generate", "--model", "m", "--prompt", "a dog", "--out", "{ws}/afile"],
            USAGE,
            ["--out", "afile"],
        ),
        Case(
            "generate-s3-closed",
            ["generate", "--model", "s3://ocrbooth/models/x", *gen],
            FAILURE,
            ["S3 at", "{closed}"],
        ),
        # train
        Case("train-missing-job", ["train", "{ws}/missing.json"], USAGE, ["no such file", "missing.json"]),
        Case("train-job-is-a-directory", ["train", "{ws}/adir"], USAGE, ["adir", "is a directory"]),
        Case("train-job-not-json", ["train", "{ws}/bad.json"], USAGE, ["bad.json", "invalid job file"]),
        Case("train-job-wrong-shape", ["train", "{ws}/list.json"], USAGE, ["list.json", "invalid job file"]),
        Case("train-job-missing-fields", ["train", "{ws}/partial.json"], USAGE, ["partial.json", "Field required"]),
        # schemas
        Case("schemas-no-out", ["schemas"], USAGE, ["required", "--out"]),
        Case("schemas-out-is-a-file", ["schemas", "--out", "{ws}/afile"], USAGE, ["--out", "not a directory"]),
        Case("schemas-out-unwritable", ["schemas", "--out", "{ws}/afile/schemas"], FAILURE, ["afile/schemas", "--out"]),
    ]


CASES = _cases()


@dataclass(frozen=True)
class Outcome:
    """What one subprocess did."""

    status: int
    stdout: str
    stderr: str
    seconds: float


def _closed_port() -> int:
    """A loopback port nothing listens on: connections to it are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _workspace(ws: Path) -> None:
    (ws / "doc.pdf").write_bytes(b"%PDF-1.4\n% not really a PDF; the CLI never gets as far as reading it\n")
    (ws / "afile").write_text("a regular file where a directory is expected\n")
    (ws / "adir").mkdir()
    (ws / "empty").mkdir()
    (ws / "imgs").mkdir()
    (ws / "imgs" / "subject.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (ws / "bad.yaml").write_text("kafka: [unclosed\n")
    (ws / "list.yaml").write_text("- kafka\n- s3\n")
    (ws / "scalar.yaml").write_text("just a sentence\n")
    (ws / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01binary")
    (ws / "unknown.yaml").write_text("nope: 1\n")
    (ws / "zero.yaml").write_text("max_in_flight: 0\n")
    (ws / "bad.json").write_text("{not json\n")
    (ws / "list.json").write_text("[1, 2]\n")
    (ws / "partial.json").write_text(json.dumps({"job_id": "job-1"}) + "\n")


def _base_env(ws: Path, closed: int) -> dict[str, str]:
    """Nothing from the caller's environment: services on a closed loopback port, throwaway credentials."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "HOME": str(ws),
        "OCRBOOTH_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed}",
        "OCRBOOTH_S3_ENDPOINT_URL": f"http://127.0.0.1:{closed}",
        "AWS_ACCESS_KEY_ID": "cli-test",
        "AWS_SECRET_ACCESS_KEY": "cli-test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no credential lookups against a cloud metadata service
        "HF_HUB_OFFLINE": "1",
    }


def _run(argv: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 60) -> Outcome:
    """Run `python -m ocrbooth.cli ARGV`; one that hangs is killed and reported, so it fails only its own case."""
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ocrbooth.cli", *argv],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return Outcome(-1, out, f"{err}\n(still running after {timeout_s:g}s; killed)", time.monotonic() - start)
    return Outcome(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The workspace and ports the cases name: a closed port, a busy one, and a silent one (it accepts
    connections into its backlog and never answers)."""
    ws = tmp_path_factory.mktemp("cli")
    _workspace(ws)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent,
    ):
        for sock in (busy, silent):
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
        yield {
            "ws": str(ws),
            "closed": str(_closed_port()),
            "busy": str(busy.getsockname()[1]),
            "silent": str(silent.getsockname()[1]),
        }


@pytest.fixture(scope="module")
def outcomes(places: dict[str, str]) -> dict[str, Outcome]:
    """Every case, run a few at a time (each is a fresh interpreter importing ocrbooth)."""
    ws = Path(places["ws"])
    base = _base_env(ws, int(places["closed"]))

    def one(case: Case) -> Outcome:
        env = {**base, **{k: v.format(**places) for k, v in case.env.items()}}
        for key in case.unset:
            env.pop(key, None)
        return _run([arg.format(**places) for arg in case.argv], env, ws)

    with ThreadPoolExecutor(max_workers=_PARALLEL) as pool:
        return dict(zip([c.id for c in CASES], pool.map(one, CASES), strict=True))


def _error_line(case: Case, outcome: Outcome) -> str:
    """The one line of error, after checking that nothing else was printed (argparse's usage may come first)."""
    lines = outcome.stderr.strip().splitlines()
    assert lines, f"nothing on stderr; stdout: {outcome.stdout!r}"
    *before, line = lines
    if case.status == USAGE and before:
        assert before[0].startswith("usage: ocrbooth"), outcome.stderr
        assert all(extra.startswith(" ") for extra in before[1:]), (
            f"more than the usage before the error: {outcome.stderr}"
        )
    else:
        assert not before, f"more than one line on stderr: {outcome.stderr}"
    assert line.startswith("ocrbooth"), line
    return line


def test_there_are_enough_cases_for_every_subcommand() -> None:
    """The table covers at least 29 command lines and every subcommand, with both exit statuses."""
    assert len(CASES) >= 29
    assert len({c.id for c in CASES}) == len(CASES)
    commands = {c.argv[0] for c in CASES if c.argv and not c.argv[0].startswith("-")}
    assert {"run", "dev", "demo", "submit", "finetune", "generate", "train", "schemas"} <= commands
    assert {c.status for c in CASES} == {USAGE, FAILURE}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_command_line_gets_one_line_and_its_exit_status(
    case: Case, outcomes: dict[str, Outcome], places: dict[str, str]
) -> None:
    """No traceback; the expected exit status (2 usage, 1 runtime); one error line naming the problem."""
    outcome = outcomes[case.id]
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome.stderr
    assert outcome.status == case.status, f"exit {outcome.status}, not {case.status}: {outcome.stderr}"
    line = _error_line(case, outcome)
    for expected in case.expect:
        assert expected.format(**places) in line, f"{expected!r} not in {line!r}"


def test_unreachable_services_fail_within_seconds(outcomes: dict[str, Outcome]) -> None:
    """Closed and silent S3 and Kafka endpoints are reported within a few seconds, not after the clients'
    default retries and 40 s request timeouts."""
    for name in ("submit-services-closed", "submit-services-silent", "finetune-services-closed", "generate-s3-closed"):
        assert outcomes[name].seconds < UNREACHABLE_BOUND_S, f"{name}: {outcomes[name].seconds:.1f}s"


def test_debug_shows_the_traceback(places: dict[str, str]) -> None:
    """`--debug` prints the traceback before the one-line message, for a person reporting a problem."""
    ws = Path(places["ws"])
    outcome = _run(["--debug", "schemas", "--out", f"{ws}/afile/debug"], _base_env(ws, int(places["closed"])), ws)
    assert outcome.status == FAILURE
    assert "Traceback" in outcome.stderr
    assert outcome.stderr.strip().splitlines()[-1].startswith("ocrbooth: cannot write schemas")


def test_each_unreachable_service_is_named_alone(stack: EmbeddedStack, places: dict[str, str]) -> None:
    """With one service up and the other down, the line names only the one that is down."""
    ws = Path(places["ws"])
    closed = places["closed"]
    live = {**_base_env(ws, int(closed)), **stack.env()}
    kafka_down = _run(
        ["submit", f"{ws}/doc.pdf"], {**live, "OCRBOOTH_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed}"}, ws
    )
    s3_down = _run(["submit", f"{ws}/doc.pdf"], {**live, "OCRBOOTH_S3_ENDPOINT_URL": f"http://127.0.0.1:{closed}"}, ws)
    for outcome, down, up in ((kafka_down, "Kafka", "S3"), (s3_down, "S3", "Kafka")):
        assert outcome.status == FAILURE, outcome.stderr
        assert "Traceback" not in outcome.stderr
        lines = outcome.stderr.strip().splitlines()
        assert len(lines) == 1, outcome.stderr
        assert down in lines[0]
        assert up not in lines[0]
        assert f":{closed}" in lines[0]
