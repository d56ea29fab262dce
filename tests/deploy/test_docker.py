"""The container image: deploy/docker/Dockerfile passes hadolint and has the shape Kubernetes needs (CUDA
runtime base matching torch's wheel, non-root numeric user, the package installed from its wheel with pinned
extras, no compilers, writable volumes for a read-only root filesystem, every Tesseract language pack), and
/.dockerignore sends only the package sources.

These checks read the files; they do not build the image. The machines this suite runs on reach no container
registry, so `docker build` could not even pull the base image here; the Dockerfile's own RUN steps check the
installed image (imports, entry point, language packs) when it is built where a registry is reachable.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from ocrbooth.cli import build_parser
from ocrbooth.config import Settings
from ocrbooth.models.ocr.tesseract import SUPPORTED_LANGUAGES
from tests.deploy.tools import DEPLOY, REPO, run, tool

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
HADOLINT_CONFIG = DEPLOY / "docker" / ".hadolint.yaml"
DOCKERIGNORE = REPO / ".dockerignore"
SYSTEM_DEPS = REPO / "scripts" / "install-system-deps.sh"
TMP_VOLUME = "/tmp"  # noqa: S108  (a path inside the image, not a file this test writes)
CACHE_VOLUME = "/cache"

# The CUDA release of each pinned torch's Linux wheel on PyPI: torch 2.13.0 requires cuda-toolkit==13.0.3
# (`pip install --dry-run --no-deps --report - torch==VERSION` prints the metadata without the wheel). A torch
# bump fails here until someone has looked up its CUDA release and moved the base image along.
TORCH_WHEEL_CUDA = {"2.13.0": "13.0"}
# The python3 of each Ubuntu release a base image may be built on.
UBUNTU_PYTHON = {"22.04": (3, 10), "24.04": (3, 12)}
_COMPILER = re.compile(r"(?:gcc|g\+\+|c\+\+|clang(?:\+\+)?|build-essential|python3(?:\.\d+)?-dev|cmake)(?:-\d+)?")
# The paths an image writes unless told otherwise: variables named like these must point into a volume.
_WRITABLE_ENV = re.compile(r".*(?:HOME|DIR|_PATH)|TMPDIR")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    image: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [ins for ins in self.instructions if ins.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name or self.image}: expected one {keyword}, found {len(found)}"
        return found[0]

    def runs(self) -> list[str]:
        return [ins.args for ins in self.all("RUN")]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for ins in self.all("ENV"):
            tokens = shlex.split(ins.args)
            if "=" not in tokens[0]:  # legacy `ENV KEY value with spaces`
                values[tokens[0]] = " ".join(tokens[1:])
                continue
            for token in tokens:
                key, _, value = token.partition("=")
                values[key] = value
        return values


def parse_instructions(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile with continuation lines joined and comments dropped (no heredocs)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, f"instruction from line {start} ends in a line continuation"
    return instructions


@cache
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages of deploy/docker/Dockerfile."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in parse_instructions(DOCKERFILE.read_text()):
        if ins.keyword == "FROM":
            tokens = [token for token in ins.args.split() if not token.startswith("--")]
            name = tokens[2] if len(tokens) == 3 and tokens[1].lower() == "as" else None
            stages.append(Stage(image=tokens[0], name=name, line=ins.line))
        elif stages:
            stages[-1].instructions.append(ins)
        elif ins.keyword == "ARG":
            key, _, value = ins.args.partition("=")
            global_args[key] = value
    assert stages, "no FROM in the Dockerfile"
    return global_args, stages


def final_stage() -> Stage:
    return dockerfile()[1][-1]


def stage_named(name: str) -> Stage:
    found = [stage for stage in dockerfile()[1] if stage.name == name]
    assert found, f"no stage named {name!r}"
    return found[0]


def expand(text: str) -> str:
    """`${NAME}` replaced by the global ARG default (the stages only re-declare them); shell variables stay."""
    args = dockerfile()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_torch() -> str:
    pins = [Requirement(spec) for spec in pyproject()["project"]["optional-dependencies"]["gpu"]]
    (torch,) = [req for req in pins if req.name == "torch"]
    (spec,) = torch.specifier
    assert spec.operator == "==", f"torch is not pinned: {torch}"
    return spec.version


def compilers_in(stage: Stage) -> set[str]:
    """Compiler toolchains named anywhere in the stage's RUN instructions."""
    words = (word for command in stage.runs() for word in re.split(r"[\s;&|()\"'=,]+", command))
    return {word for word in words if _COMPILER.fullmatch(word)}


def apt_packages(stage: Stage) -> set[str]:
    """Package names given to `apt-get install` in the stage."""
    packages: set[str] = set()
    for command in stage.runs():
        for part in re.split(r"&&|;|\|\|", command):
            words = part.split()
            if words[:2] == ["apt-get", "install"]:
                packages.update(word for word in words[2:] if not word.startswith("-"))
    return packages


def script_languages() -> tuple[str, ...]:
    """The Tesseract languages scripts/install-system-deps.sh installs for the test suite."""
    match = re.search(r"^for lang in ([a-z ]+); do$", SYSTEM_DEPS.read_text(), re.MULTILINE)
    assert match, "no `for lang in ...; do` loop in scripts/install-system-deps.sh"
    return tuple(match.group(1).split())


def test_hadolint_passes_without_a_single_finding() -> None:
    """hadolint accepts the Dockerfile with our config and prints nothing, not even style notes."""
    done = run(tool("hadolint"), "--config", str(HADOLINT_CONFIG), "--no-color", str(DOCKERFILE), cwd=REPO)
    assert done.stdout.strip() == ""
    assert done.stderr.strip() == ""


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint really runs with our config: a floating tag and a careless apt-get install fail it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    done = run(tool("hadolint"), "--config", str(HADOLINT_CONFIG), "--no-color", str(bad), check=False)
    assert done.returncode != 0
    assert "DL3007" in done.stdout  # `latest`
    assert "DL3014" in done.stdout  # no -y


def test_runtime_base_is_the_cuda_runtime_image_matching_torch() -> None:
    """The final stage starts from an nvidia/cuda runtime image of the CUDA release torch's wheel is built
    for, on an Ubuntu whose python3 satisfies requires-python; the builder uses the same image, so any wheel it
    compiles fits the runtime's Python and glibc."""
    final = final_stage()
    match = re.fullmatch(
        r"nvidia/cuda:(?P<cuda>\d+\.\d+)\.\d+-(?:cudnn\d*-)?runtime-ubuntu(?P<ubuntu>\d+\.\d+)(?:@sha256:[0-9a-f]{64})?",
        final.image,
    )
    assert match, f"final stage base {final.image!r} is not an nvidia/cuda runtime image"
    torch_version = pinned_torch()
    assert torch_version in TORCH_WHEEL_CUDA, f"torch {torch_version}: add its wheel's CUDA release to the table"
    assert match["cuda"] == TORCH_WHEEL_CUDA[torch_version]
    minimum = tuple(int(part) for part in pyproject()["project"]["requires-python"].removeprefix(">=").split("."))
    assert UBUNTU_PYTHON[match["ubuntu"]] >= minimum
    assert stage_named("builder").image == final.image


def test_runs_as_a_numeric_non_root_user() -> None:
    """The final stage switches to a numeric, non-zero UID and GID (which runAsNonRoot can verify) that exists
    in /etc/passwd, before its entry point."""
    final = final_stage()
    users = final.all("USER")
    assert users, "the final stage never sets USER"
    last = users[-1]
    uid, _, gid = last.args.partition(":")
    assert uid.isdigit()
    assert int(uid) != 0
    assert gid == "" or (gid.isdigit() and int(gid) != 0)
    assert last.line < final.one("ENTRYPOINT").line
    # Libraries call getpass.getuser() (torch's caches among them), which fails for a UID without an entry.
    assert any(re.search(rf"useradd\b.*--uid {uid}\b", command) for command in final.runs())


def test_entrypoint_and_cmd_run_the_daemon() -> None:
    """ENTRYPOINT ["ocrbooth"] and CMD ["run"] in exec form, naming the package's console script and a command
    its parser accepts."""
    final = final_stage()
    for keyword in ("ENTRYPOINT", "CMD"):
        assert final.one(keyword).args.startswith("["), f"{keyword} is not in exec (JSON) form"
    entrypoint = json.loads(final.one("ENTRYPOINT").args)
    cmd = json.loads(final.one("CMD").args)
    assert entrypoint == ["ocrbooth"]
    assert cmd == ["run"]
    assert "ocrbooth" in pyproject()["project"]["scripts"]
    assert build_parser().parse_args(cmd).command == "run"


def test_no_compilers_in_the_runtime_stage() -> None:
    """No RUN of the final stage installs or calls a compiler; the builder, which may compile, is where the
    detector does find one."""
    assert compilers_in(final_stage()) == set()
    assert "build-essential" in compilers_in(stage_named("builder"))
    assert not final_stage().all("ADD")


def test_runtime_installs_the_package_wheel_with_pinned_extras() -> None:
    """The final stage pip-installs the builder's ocrbooth wheel (of pyproject's version) with the extras the
    builder made wheels for, from those wheels only; every requirement of those extras is pinned."""
    installs = [command for command in final_stage().runs() if "pip install" in command]
    assert len(installs) == 1
    install = expand(installs[0])
    wheel = re.search(r"/ocrbooth-(?P<version>[^-\s\"]+)-py3-none-any\.whl\[(?P<extras>[\w,]+)\]", install)
    assert wheel, f"no ocrbooth wheel with extras in: {install}"
    assert wheel["version"] == pyproject()["project"]["version"]
    extras = set(wheel["extras"].split(","))
    assert extras == {"gpu", "train"}
    assert "--no-index" in install
    assert "from=builder" in install  # the wheels are mounted from the builder, not copied into a layer

    built = [command for command in stage_named("builder").runs() if "pip wheel" in command]
    assert len(built) == 1
    built_extras = re.search(r"\.\[(?P<extras>[\w,]+)\]", built[0])
    assert built_extras
    assert set(built_extras["extras"].split(",")) == extras

    optional = pyproject()["project"]["optional-dependencies"]
    for extra in sorted(extras):
        for spec in optional[extra]:
            operators = [s.operator for s in Requirement(spec).specifier]
            assert operators == ["=="], f"[{extra}] {spec} is not pinned"


def test_writable_paths_point_into_volumes() -> None:
    """For a read-only root filesystem: /tmp and /cache are volumes, HOME, the temp dir and every cache
    directory variable point into one, bytecode is never written, and /cache belongs to the runtime user."""
    final = final_stage()
    raw = final.one("VOLUME").args
    volumes = json.loads(raw) if raw.startswith("[") else raw.split()
    assert {TMP_VOLUME, CACHE_VOLUME} <= set(volumes)

    def in_volume(path: str) -> bool:
        return any(path == volume or path.startswith(volume.rstrip("/") + "/") for volume in volumes)

    env = final.env()
    for name in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR"):
        assert name in env, f"{name} is not set"
    writable = {name: value for name, value in env.items() if _WRITABLE_ENV.fullmatch(name)}
    outside = {name: value for name, value in writable.items() if not in_volume(value)}
    assert outside == {}
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"

    uid = final.all("USER")[-1].args.partition(":")[0]
    for volume in set(volumes) - {TMP_VOLUME}:  # /tmp is world-writable (sticky) in every base image
        pattern = rf"install\s+-d\b[^&;|]*\s-o\s+{uid}\b[^&;|]*\s{re.escape(volume)}(?:\s|$)"
        assert any(re.search(pattern, command) for command in final.runs()), f"{volume} is not owned by {uid}"


def test_tesseract_has_every_supported_language() -> None:
    """The final stage installs tesseract-ocr and a pack for each supported language, the same list that
    install-system-deps.sh installs for the tests, and its build-time check walks that list too."""
    assert script_languages() == SUPPORTED_LANGUAGES
    final = final_stage()
    packages = apt_packages(final)
    assert "tesseract-ocr" in packages
    assert {f"tesseract-ocr-{lang}" for lang in SUPPORTED_LANGUAGES} <= packages
    checks = [re.search(r"for lang in ([a-z ]+); do", command) for command in final.runs()]
    (check,) = [match for match in checks if match]
    assert tuple(check.group(1).split()) == SUPPORTED_LANGUAGES


def test_metrics_port_and_host_for_a_pod() -> None:
    """The image exposes the settings' metrics port and binds it on all interfaces, as a pod needs."""
    final = final_stage()
    port = Settings.model_fields["metrics_port"].default
    assert final.one("EXPOSE").args.split() == [str(port)]
    env = final.env()
    assert env["OCRBOOTH_METRICS_HOST"] == "0.0.0.0"
    assert env.get("OCRBOOTH_METRICS_PORT", str(port)) == str(port)


def test_oci_labels_describe_the_package() -> None:
    """OCI labels name the image, its version (pyproject's) and its licence (pyproject's)."""
    labels: dict[str, str] = {}
    for ins in final_stage().all("LABEL"):
        for token in shlex.split(expand(ins.args)):
            key, _, value = token.partition("=")
            labels[key] = value
    project = pyproject()["project"]
    assert labels["org.opencontainers.image.title"] == project["name"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]["text"]
    assert labels["org.opencontainers.image.base.name"].endswith(final_stage().image)


# .dockerignore, with Docker's rules: patterns are globs on slash-separated paths relative to the context
# (`*` stays within one segment, `**` spans any number), a pattern that matches a directory covers everything
# below it, and the last matching pattern wins (`!` lets a path back in).


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out)


@cache
def dockerignore_rules() -> tuple[tuple[re.Pattern[str], bool], ...]:
    rules: list[tuple[re.Pattern[str], bool]] = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        rules.append((_glob_regex(pattern), keep))
    return tuple(rules)


def ignored(path: str) -> bool:
    """Whether Docker leaves `path` (relative to the repository root) out of the build context."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for regex, keep in dockerignore_rules():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not keep
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        ".whl/torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl",
        ".ocrbooth/demo-results/invoice.md",
        ".mypy_cache/3.11/ocrbooth/cli.meta.json",
        ".pytest_cache/v/cache/lastfailed",
        ".env",
        "tests/unit/test_config.py",
        "bench/results/runtime_overhead.json",
        "ocrbooth.egg-info/PKG-INFO",
        "build/lib/ocrbooth/cli.py",
        "ocrbooth/__pycache__/cli.cpython-311.pyc",
        "ocrbooth/daemon/__pycache__/app.cpython-312.pyc",
    ],
)
def test_dockerignore_leaves_out_local_state(path: str) -> None:
    """Virtualenvs, git history, caches, tests, benchmark results, local state and build leftovers stay out
    of the build context."""
    assert ignored(path)


def test_dockerignore_keeps_everything_the_dockerfile_copies() -> None:
    """Every file under every COPY source of the build context (pyproject's readme included) is sent."""
    sources: list[str] = []
    for stage in dockerfile()[1]:
        for ins in stage.all("COPY"):
            words = [word for word in ins.args.split() if not word.startswith("--")]
            if not any(word.startswith("--from") for word in ins.args.split()):
                sources.extend(words[:-1])
    assert pyproject()["project"]["readme"] in sources
    files: list[str] = []
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY source {source} does not exist"
        below = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files.extend(
            p.relative_to(REPO).as_posix() for p in below if "__pycache__" not in p.parts and p.suffix != ".pyc"
        )
    assert "ocrbooth/schemas/json" in {str(Path(f).parent) for f in files}  # package data is among them
    sent_out = [f for f in files if ignored(f)]
    assert sent_out == []
