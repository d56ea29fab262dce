"""The dead-letter topic: inputs the daemon could not process, kept byte for byte with the reason."""

from __future__ import annotations

from pydantic import AwareDatetime, Field

from ocrbooth.schemas.base import ErrorInfo, WireModel, WireObject


class Header(WireObject):
    """One Kafka record header of the failed message."""

    key: str = Field(description="Header key.")
    value_base64: str | None = Field(default=None, description="Header value bytes, base64; null for a null value.")


class DeadLetter(WireModel):
    """A message that failed for good. Keyed like the message that failed."""

    source_topic: str = Field(min_length=1, description="Topic the message was read from.")
    partition: int = Field(ge=0, description="Partition the message was read from.")
    offset: int = Field(ge=0, description="Offset of the message in its partition.")
    key_base64: str | None = Field(default=None, description="Record key bytes, base64; null for no key.")
    key_truncated: bool = Field(
        default=False,
        description="Whether `key_base64` (and this record's own key) holds only the first part of a too-long key.",
    )
    value_base64: str | None = Field(
        default=None, description="Record value bytes, base64; null for a null value (tombstone)."
    )
    value_truncated: bool = Field(
        default=False, description="Whether `value_base64` holds only the first part of a too-large value."
    )
    headers: list[Header] = Field(default_factory=list, description="Record headers, in order.")
    headers_truncated: bool = Field(
        default=False, description="Whether `headers` holds only the first headers of the message (too many bytes)."
    )
    error: ErrorInfo = Field(description="Why the message was dead-lettered.")
    failed_at: AwareDatetime = Field(description="When the message was dead-lettered (UTC).")
