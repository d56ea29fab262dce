"""S3 access for the daemon and handlers. boto3 is blocking, so every call runs in a worker thread."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ocrbooth.daemon.config import S3Settings
from ocrbooth.errors import PoisonError, RetryableError

log = logging.getLogger(__name__)

_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}


def s3_call(client: Any, op: str, **kwargs: Any) -> Any:
    """`client.<op>(**kwargs)` with boto3's errors classified: a missing object or bucket and a refused access
    are poison (retrying cannot help), anything else is retryable."""
    where = f"s3://{kwargs.get('Bucket')}/{kwargs.get('Key', kwargs.get('Prefix', ''))}"
    try:
        return getattr(client, op)(**kwargs)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _MISSING or status == 404:
            raise PoisonError(f"{where} does not exist", code="source_not_found") from exc
        if status in (401, 403):
            raise PoisonError(f"access to {where} denied ({code})", code="source_forbidden") from exc
        raise RetryableError(f"S3 {op} on {where} failed: {code or status}", code="storage_unavailable") from exc
    except BotoCoreError as exc:
        raise RetryableError(f"S3 {op} on {where} failed: {exc}", code="storage_unavailable") from exc


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    if not uri.startswith("s3://"):
        raise PoisonError(f"not an s3:// URI: {uri!r}", code="invalid_uri")
    bucket, _, key = uri[5:].partition("/")
    if not bucket or not key:
        raise PoisonError(f"s3 URI needs a bucket and a key: {uri!r}", code="invalid_uri")
    return bucket, key


def s3_client(settings: S3Settings, *, max_attempts: int = 3) -> Any:
    """A boto3 S3 client for the configured endpoint (path-style addressing, our timeouts and retries)."""
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        config=Config(
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
    )


class S3Storage:
    """A bucket-scoped S3 client with error classification: missing objects are poison, the rest retryable."""

    def __init__(self, settings: S3Settings) -> None:
        self.bucket = settings.bucket
        self._client: Any = s3_client(settings)

    def uri(self, key: str, bucket: str | None = None) -> str:
        return f"s3://{bucket or self.bucket}/{key}"

    async def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> str:
        """Write an object in the configured bucket; return its s3:// URI."""
        await self._call("put_object", Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        return self.uri(key)

    async def get(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        """Read a whole object; `max_bytes` guards against huge objects before reading them."""
        bucket, key = parse_s3_uri(uri)
        if max_bytes is not None:
            head = await self._call("head_object", Bucket=bucket, Key=key)
            if int(head["ContentLength"]) > max_bytes:
                raise PoisonError(f"{uri} is {head['ContentLength']} bytes, over {max_bytes}", code="source_too_large")
        body = await self._call("get_object", Bucket=bucket, Key=key)
        return await asyncio.to_thread(body["Body"].read)

    async def exists(self, uri: str) -> bool:
        bucket, key = parse_s3_uri(uri)
        try:
            await self._call("head_object", Bucket=bucket, Key=key)
        except PoisonError as exc:
            if exc.code == "source_not_found":
                return False
            raise
        return True

    async def check(self) -> None:
        """Fail fast at startup when the bucket is unreachable."""
        await self._call("head_bucket", Bucket=self.bucket)

    async def _call(self, op: str, **kwargs: Any) -> Any:
        return await asyncio.to_thread(s3_call, self._client, op, **kwargs)
