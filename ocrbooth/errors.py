"""The error hierarchy: how a failure is handled is decided by its class, not by where it happened."""

from __future__ import annotations


class OcrboothError(Exception):
    """Base of every error the daemon classifies. `code` is the wire error code."""

    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class RetryableError(OcrboothError):
    """Transient trouble (S3, broker, timeouts): back off and retry, then dead-letter."""

    code = "retries_exhausted"


class PoisonError(OcrboothError):
    """The input itself is invalid or unprocessable: dead-letter or fail it with a reason, commit, move on."""

    code = "invalid_message"


class FatalError(OcrboothError):
    """The process is broken (GPU or driver gone): exit non-zero and let the orchestrator restart it."""

    code = "fatal"


class ConfigError(OcrboothError):
    """Settings are invalid; the message lists every problem found."""

    code = "invalid_config"


class RequeueError(OcrboothError):
    """Leave the message uncommitted so that this or another replica handles it again (a job interrupted
    by shutdown, resumable from its checkpoint). No output, no dead letter."""

    code = "requeued"
