"""Handler loading (names, `module:Class`, conflicts) and the echo handler's behaviour and fault injection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from pydantic import BaseModel

from ocrbooth.config import Settings, load_settings
from ocrbooth.errors import ConfigError, FatalError, OcrboothError, PoisonError, RetryableError
from ocrbooth.handlers import BUILTIN_HANDLERS, load_handlers
from ocrbooth.handlers.base import Handler
from ocrbooth.handlers.echo import FAULTS_ENV, EchoHandler
from ocrbooth.handlers.finetune import FinetuneHandler
from ocrbooth.handlers.ocr import OcrHandler
from ocrbooth.messages import MessageContext, OutputEvent
from ocrbooth.schemas import DocumentRequest, ErrorInfo, OcrResult, UriSource


class SecondEcho(EchoHandler):
    """Another handler reading the OCR request topic, to provoke a topic conflict."""

    name = "echo2"


class NotAHandler:
    """A class that does not derive from Handler."""


class OnlyFinetune(Handler):
    """A minimal third-party handler on its own topic."""

    name = "only-finetune"

    def input_topics(self) -> Mapping[str, type[BaseModel]]:
        return {self.settings.topics.finetune_requests: DocumentRequest}

    async def handle(self, event: BaseModel, ctx: MessageContext) -> Sequence[OutputEvent]:
        return ()


HERE = __name__  # how pytest imported this module, so `module:Class` specs resolve to the classes above


@pytest.fixture
def settings() -> Settings:
    """Default settings."""
    return load_settings()


def _problems(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    lines = str(exc.value).splitlines()
    assert lines[0] == "invalid settings:"
    return [line.strip() for line in lines[1:]]


def _request(**metadata: str) -> DocumentRequest:
    return DocumentRequest(
        request_id="req-1", document_id="doc-1", source=UriSource(uri="s3://bucket/a.pdf"), metadata=metadata
    )


def _ctx(attempt: int = 1) -> MessageContext:
    return MessageContext("ocr.requests", 0, 42, b"doc-1", 1_700_000_000_000, (), attempt)


def test_load_echo_by_builtin_name(settings: Settings) -> None:
    """The built-in name `echo` loads an EchoHandler reading the configured OCR request topic."""
    (handler,) = load_handlers(["echo"], settings)
    assert isinstance(handler, EchoHandler)
    assert handler.settings is settings
    assert handler.input_topics() == {settings.topics.ocr_requests: DocumentRequest}


def test_load_by_module_and_class(settings: Settings) -> None:
    """A `module:Class` spec loads a third-party Handler, alongside a built-in."""
    handlers = load_handlers(["echo", f"{HERE}:OnlyFinetune"], settings)
    assert [type(h) for h in handlers] == [EchoHandler, OnlyFinetune]


def test_every_loading_problem_is_reported_in_one_error(settings: Settings) -> None:
    """Unknown name, missing class, non-Handler class and a topic consumed twice all appear in one ConfigError."""
    with pytest.raises(ConfigError) as caught:
        load_handlers(
            ["nope", "ocrbooth.handlers.echo:Missing", f"{HERE}:NotAHandler", "echo", f"{HERE}:SecondEcho"],
            settings,
        )
    problems = _problems(caught)
    assert len(problems) == 4, problems
    assert problems[0].startswith("handlers: unknown handler 'nope' (built-in: ")
    assert all(name in problems[0] for name in BUILTIN_HANDLERS)
    assert problems[1] == "handlers: ocrbooth.handlers.echo has no Missing"
    assert problems[2] == f"handlers: {HERE}:NotAHandler is not a Handler subclass"
    assert problems[3] == f"handlers: echo and echo2 both consume {settings.topics.ocr_requests}"


def test_unimportable_module_is_a_config_error(settings: Settings) -> None:
    """A `module:Class` whose module does not exist is reported with the import error."""
    with pytest.raises(ConfigError) as caught:
        load_handlers(["no_such_package.handlers:Thing"], settings)
    (problem,) = _problems(caught)
    assert problem.startswith("handlers: cannot import 'no_such_package.handlers:Thing'")
    assert "no_such_package" in problem


@pytest.mark.parametrize(("name", "cls"), [("ocr", OcrHandler), ("finetune", FinetuneHandler)])
def test_builtin_gpu_handlers_load_by_name(name: str, cls: type[Handler], settings: Settings) -> None:
    """`ocr` and `finetune` load their handler classes by built-in name."""
    (handler,) = load_handlers([name], settings)
    assert type(handler) is cls
    assert handler.name == name


def test_a_builtin_whose_module_is_missing_is_not_part_of_this_build(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, settings: Settings
) -> None:
    """A built-in whose own module is absent says so plainly; one whose module fails to import a dependency
    reports that import error instead."""
    (tmp_path / "needs_a_dependency.py").write_text("import no_such_dependency_of_ocrbooth\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BUILTIN_HANDLERS, "future", "ocrbooth.handlers.future_work:FutureHandler")
    monkeypatch.setitem(BUILTIN_HANDLERS, "broken", "needs_a_dependency:Handler")
    with pytest.raises(ConfigError) as caught:
        load_handlers(["future", "broken"], settings)
    assert _problems(caught) == [
        "handlers: 'future' is not part of this build yet",
        "handlers: cannot import 'needs_a_dependency:Handler': No module named 'no_such_dependency_of_ocrbooth'",
    ]


async def test_echo_answers_with_a_succeeded_result(settings: Settings) -> None:
    """Without faults, echo returns one succeeded OcrResult on the results topic, keyed by document id."""
    handler = EchoHandler(settings)
    (out,) = await handler.handle(_request(tenant="acme"), _ctx())
    assert out.topic == settings.topics.ocr_results
    assert out.key == "doc-1"
    assert isinstance(out.value, OcrResult)
    assert out.value.status == "succeeded"
    assert out.value.engine == "echo"
    assert out.value.request_id == "req-1"
    assert out.value.pages == []
    assert out.value.metadata == {"tenant": "acme"}


async def test_fault_metadata_is_ignored_without_the_env_var(settings: Settings) -> None:
    """Fault-injection keys do nothing unless OCRBOOTH_ECHO_FAULTS is set: production cannot be made to fail."""
    handler = EchoHandler(settings)
    assert handler.faults is False
    for fail in ("poison", "crash", "fatal", "retryable"):
        (out,) = await handler.handle(_request(**{"echo.fail": fail, "echo.pad_bytes": "100"}), _ctx())
        assert isinstance(out.value, OcrResult)
        assert out.value.status == "succeeded"
        assert out.value.pages == []


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> EchoHandler:
    """An echo handler constructed with fault injection enabled."""
    monkeypatch.setenv(FAULTS_ENV, "true")
    handler = EchoHandler(settings)
    assert handler.faults is True
    return handler


@pytest.mark.parametrize(
    ("fail", "error", "code"),
    [
        ("poison", PoisonError, "injected_failure"),
        ("retryable", RetryableError, "injected_transient"),
        ("fatal", FatalError, "fatal"),
        ("crash", RuntimeError, None),
    ],
)
async def test_injected_failures_raise_the_matching_error(
    faulty: EchoHandler, fail: str, error: type[Exception], code: str | None
) -> None:
    """Each echo.fail value raises its class of error, so every failure path of the daemon can be exercised."""
    with pytest.raises(error) as caught:
        await faulty.handle(_request(**{"echo.fail": fail}), _ctx())
    assert type(caught.value) is error
    if code is not None:
        assert isinstance(caught.value, OcrboothError)
        assert caught.value.code == code


async def test_plain_retryable_fails_on_every_attempt(faulty: EchoHandler) -> None:
    """`retryable` without a count never succeeds."""
    for attempt in (1, 5, 100):
        with pytest.raises(RetryableError):
            await faulty.handle(_request(**{"echo.fail": "retryable"}), _ctx(attempt))


async def test_retryable_with_count_succeeds_on_the_next_attempt(faulty: EchoHandler) -> None:
    """`retryable:2` fails attempts 1 and 2 and succeeds on attempt 3."""
    request = _request(**{"echo.fail": "retryable:2"})
    for attempt in (1, 2):
        with pytest.raises(RetryableError):
            await faulty.handle(request, _ctx(attempt))
    (out,) = await faulty.handle(request, _ctx(3))
    assert isinstance(out.value, OcrResult)
    assert out.value.status == "succeeded"


async def test_pad_bytes_adds_a_page_of_that_size(faulty: EchoHandler) -> None:
    """`echo.pad_bytes` makes the result large (to exercise S3 offload) with a page of that much text."""
    (out,) = await faulty.handle(_request(**{"echo.pad_bytes": "5000"}), _ctx())
    assert isinstance(out.value, OcrResult)
    (page,) = out.value.pages
    assert len(page.text) == 5000


def test_failure_outputs_give_a_failed_result_carrying_the_error(settings: Settings) -> None:
    """A failed request is answered with a failed OcrResult carrying the error and the request's metadata."""
    handler = EchoHandler(settings)
    error = ErrorInfo(code="retries_exhausted", message="gave up after 5 attempts")
    (out,) = handler.failure_outputs(_request(tenant="acme"), _ctx(), error)
    assert out.topic == settings.topics.ocr_results
    assert out.key == "doc-1"
    assert isinstance(out.value, OcrResult)
    assert out.value.status == "failed"
    assert out.value.error == error
    assert out.value.request_id == "req-1"
    assert out.value.metadata == {"tenant": "acme"}
