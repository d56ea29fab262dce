"""S3 access for the daemon and handlers. boto3 is blocking, so every call runs in a worker thread.

How an S3 failure is classified (`s3_call`), which decides whether the daemon waits or the request fails:

- missing object or bucket (404, NoSuchKey, NoSuchBucket): PoisonError `source_not_found`;
- throttling, timeouts, expired credentials, 5xx, and connection errors: RetryableError `storage_unavailable`
  (an outage: wait it out; the lead's outage detection relies on this code);
- access refused (401, 403): PoisonError `source_forbidden`;
- any other 4xx (400 InvalidRequest/InvalidArgument/InvalidBucketName, 405, 411, 413, 416, ...), and requests
  botocore refuses to send (ParamValidationError): PoisonError `storage_request_rejected`. Retrying the same
  request cannot help.

`parse_s3_uri` refuses keys that are not canonical (`.` or `..` segments, empty segments, backslashes,
control characters) so that a URI never names an object other than the one it spells.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Final

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from ocrbooth.config import S3Settings
from ocrbooth.errors import PoisonError, RetryableError

log = logging.getLogger(__name__)

_MISSING: Final = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket"})

# Error codes that say "try again later" whatever their HTTP status (S3 sends RequestTimeout as a 400, and an
# expired session token as a 400 too). botocore's standard retry mode keeps the same lists
# (botocore/retries/standard.py), but as private attributes, so they are repeated here.
_TRANSIENT_CODES: Final = frozenset(
    {
        # throttling
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "EC2ThrottledException",
        # transient
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "OperationAborted",  # a conflicting operation on the bucket is in progress
        "InternalError",
        "ServiceUnavailable",
        # credentials that the SDK refreshes (pod roles): the request is not at fault
        "ExpiredToken",
        "ExpiredTokenException",
        "TokenRefreshRequired",
        "RequestExpired",
    }
)
_TRANSIENT_STATUS: Final = frozenset({408, 429})


def s3_call(client: Any, op: str, **kwargs: Any) -> Any:
    """`client.<op>(**kwargs)` with boto3's errors classified as the module docstring says."""
    where = f"s3://{kwargs.get('Bucket')}/{kwargs.get('Key', kwargs.get('Prefix', ''))}"
    try:
        return getattr(client, op)(**kwargs)
    except ClientError as exc:
        raise classify_client_error(exc, op, where) from exc
    except ParamValidationError as exc:
        # botocore refused to build the request (a bucket name S3 cannot have, a key too long): no retry helps.
        raise PoisonError(f"S3 {op} on {where} refused: {exc}", code="storage_request_rejected") from exc
    except BotoCoreError as exc:
        raise RetryableError(f"S3 {op} on {where} failed: {exc}", code="storage_unavailable") from exc


def classify_client_error(exc: ClientError, op: str, where: str) -> PoisonError | RetryableError:
    """The daemon's error for an error answer of S3 (see the module docstring)."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in _MISSING or status == 404:
        return PoisonError(f"{where} does not exist", code="source_not_found")
    if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS or status >= 500:
        return RetryableError(f"S3 {op} on {where} failed: {code or status}", code="storage_unavailable")
    if status in (401, 403):
        return PoisonError(f"access to {where} denied ({code})", code="source_forbidden")
    if 400 <= status < 500:
        return PoisonError(f"S3 refused {op} on {where}: {status} {code}".rstrip(), code="storage_request_rejected")
    # No status (or a redirect): nothing says the request is at fault, so wait as for an outage.
    return RetryableError(f"S3 {op} on {where} failed: {code or status}", code="storage_unavailable")


# Bucket names as S3 (legacy us-east-1 rules included) and SeaweedFS accept them.
_BUCKET_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
S3_MAX_KEY_BYTES: Final = 1024


def key_problem(key: str) -> str | None:
    """Why `key` is not a canonical object key or key prefix; None when it is. One trailing `/` (a prefix) is
    canonical; `.`/`..` segments, empty segments, backslashes and control characters are not."""
    if not key:
        return "the key is empty"
    if len(key.encode("utf-8", "surrogatepass")) > S3_MAX_KEY_BYTES:
        return f"the key is over {S3_MAX_KEY_BYTES} bytes"
    if "\\" in key:
        return "the key contains a backslash"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in key):
        return "the key contains a control character or a lone surrogate"
    segments = key.removesuffix("/").split("/")
    if any(s == "" for s in segments):
        return "the key has an empty segment (`//` or a leading `/`)"
    if any(s in (".", "..") for s in segments):
        return "the key has a `.` or `..` segment"
    return None


def parse_s3_uri(uri: str, *, code: str = "invalid_source") -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key), the key canonical (see `key_problem`); else PoisonError(`code`)."""
    shown = uri if len(uri) <= 200 else uri[:200] + "…"
    if not uri.startswith("s3://"):
        raise PoisonError(f"not an s3:// URI: {shown!r}", code=code)
    bucket, _, key = uri[5:].partition("/")
    if not bucket or not key:
        raise PoisonError(f"s3 URI needs a bucket and a key: {shown!r}", code=code)
    if not _BUCKET_RE.fullmatch(bucket):
        raise PoisonError(f"s3 URI has an invalid bucket name: {shown!r}", code=code)
    problem = key_problem(key)
    if problem is not None:
        raise PoisonError(f"s3 URI is not canonical ({problem}): {shown!r}", code=code)
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


def _read_body(stream: Any, uri: str) -> bytes:
    # The connection can still drop while the body streams in, after get_object answered.
    try:
        data: bytes = stream.read()
    except BotoCoreError as exc:
        raise RetryableError(f"reading {uri} failed: {exc}", code="storage_unavailable") from exc
    return data


class S3Storage:
    """A bucket-scoped S3 client whose errors are classified as the module docstring says."""

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
        return await asyncio.to_thread(_read_body, body["Body"], uri)

    async def check(self) -> None:
        """Raise unless the bucket answers: the S3 outage probe (`daemon/app.py`)."""
        await self._call("head_bucket", Bucket=self.bucket)

    async def _call(self, op: str, **kwargs: Any) -> Any:
        return await asyncio.to_thread(s3_call, self._client, op, **kwargs)
