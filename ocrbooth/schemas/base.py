"""What every wire model shares: strict base classes, `ErrorInfo`, the offload protocol, the version probe."""

from __future__ import annotations

from typing import Literal, Protocol, Self, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ocrbooth.constants import SCHEMA_VERSION
from ocrbooth.errors import OcrboothError

# An object URI: bucket and a non-empty key (or key prefix).
S3_URI_PATTERN = r"^s3://[^/]+/.+"


class WireObject(BaseModel):
    """A part of a wire message: unknown fields are rejected so producers' typos surface at once, and every
    number is finite (Python's json reads `NaN`, `Infinity` and `1e999`, which JSON itself has no value for)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class WireModel(WireObject):
    """A whole message on a topic, versioned by `schema_version`."""

    schema_version: Literal[1] = Field(
        default=1,
        description="Version of this message's schema. Producers may omit it; any other value is rejected.",
    )

    @field_validator("schema_version", mode="before")
    @classmethod
    def _supported_version(cls, value: object) -> object:
        # The Literal alone would say "Input should be 1" and would take `true` for 1.
        if isinstance(value, bool) or (isinstance(value, int) and value != SCHEMA_VERSION):
            raise ValueError(f"unsupported schema_version {value}: this daemon reads version {SCHEMA_VERSION} only")
        return value


class ErrorInfo(WireObject):
    """Why something failed: a stable machine-readable code and a human-readable message."""

    code: str = Field(min_length=1, description="Stable error code, e.g. `invalid_message`.")
    message: str = Field(description="Human-readable explanation; not stable, do not parse.")

    @classmethod
    def from_error(cls, error: OcrboothError) -> ErrorInfo:
        """The wire form of a classified error."""
        return cls(code=error.code, message=error.message)


@runtime_checkable
class Offloadable(Protocol):
    """An output event whose bulk can move to S3, leaving a small event that points at it."""

    def offloaded(self, uri: str) -> Self:
        """A copy without the bulky part, pointing at `uri` where the full event was stored."""
        ...


def schema_version_of(raw: object) -> int | None:
    """The integer `schema_version` of a decoded JSON object, or None when absent or not an integer."""
    if not isinstance(raw, dict):
        return None
    version = raw.get("schema_version")
    # bool is an int subclass, but `true` is not a version.
    if isinstance(version, int) and not isinstance(version, bool):
        return version
    return None
