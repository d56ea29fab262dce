"""S3 error classification (real botocore errors) and canonical s3:// URIs."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from ocrbooth.config import S3Settings
from ocrbooth.errors import PoisonError, RetryableError
from ocrbooth.storage import classify_client_error, key_problem, parse_s3_uri, s3_call, s3_client


def _client_error(status: int, code: str) -> ClientError:
    """The error botocore raises for an S3 error answer (as parsed from the XML body)."""
    response: dict[str, object] = {
        "Error": {"Code": code, "Message": "from S3"},
        "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "r1"},
    }
    return ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("status", "code", "kind", "wire_code"),
    [
        # the request is at fault: no retry helps
        (400, "InvalidRequest", PoisonError, "storage_request_rejected"),
        (400, "InvalidArgument", PoisonError, "storage_request_rejected"),
        (400, "InvalidBucketName", PoisonError, "storage_request_rejected"),
        (400, "BadDigest", PoisonError, "storage_request_rejected"),
        (400, "KeyTooLongError", PoisonError, "storage_request_rejected"),
        (405, "MethodNotAllowed", PoisonError, "storage_request_rejected"),
        (409, "BucketAlreadyExists", PoisonError, "storage_request_rejected"),
        (411, "MissingContentLength", PoisonError, "storage_request_rejected"),
        (412, "PreconditionFailed", PoisonError, "storage_request_rejected"),
        (413, "EntityTooLarge", PoisonError, "storage_request_rejected"),
        (416, "InvalidRange", PoisonError, "storage_request_rejected"),
        (404, "NoSuchKey", PoisonError, "source_not_found"),
        (404, "NoSuchBucket", PoisonError, "source_not_found"),
        (404, "", PoisonError, "source_not_found"),
        (403, "AccessDenied", PoisonError, "source_forbidden"),
        (401, "Unauthorized", PoisonError, "source_forbidden"),
        # throttling, timeouts, server trouble: an outage to wait out
        (429, "TooManyRequests", RetryableError, "storage_unavailable"),
        (503, "SlowDown", RetryableError, "storage_unavailable"),
        (400, "Throttling", RetryableError, "storage_unavailable"),
        (400, "RequestTimeout", RetryableError, "storage_unavailable"),  # S3 sends its idle timeout as a 400
        (408, "RequestTimeout", RetryableError, "storage_unavailable"),
        (400, "ExpiredToken", RetryableError, "storage_unavailable"),  # a pod role's token, refreshed by the SDK
        (409, "OperationAborted", RetryableError, "storage_unavailable"),
        (500, "InternalError", RetryableError, "storage_unavailable"),
        (502, "", RetryableError, "storage_unavailable"),
        (503, "ServiceUnavailable", RetryableError, "storage_unavailable"),
        (504, "GatewayTimeout", RetryableError, "storage_unavailable"),
        (0, "", RetryableError, "storage_unavailable"),  # no status at all: nothing blames the request
    ],
)
def test_client_errors_are_classified(
    status: int, code: str, kind: type[PoisonError | RetryableError], wire_code: str
) -> None:
    """4xx other than throttling and timeouts is poison with a specific code; 5xx and throttling wait."""
    error = classify_client_error(_client_error(status, code), "get_object", "s3://b/k")
    assert type(error) is kind
    assert error.code == wire_code
    assert "s3://b/k" in error.message


def test_a_request_botocore_refuses_to_send_is_poison() -> None:
    """A bucket name S3 cannot have is refused by botocore itself (ParamValidationError): not retried."""
    client = s3_client(S3Settings(endpoint_url="http://127.0.0.1:9", region="us-east-1"), max_attempts=1)
    with pytest.raises(PoisonError) as caught:
        s3_call(client, "get_object", Bucket="no/such bucket", Key="k")
    assert caught.value.code == "storage_request_rejected"


def test_an_unreachable_endpoint_is_storage_unavailable() -> None:
    """Connection refused (nothing listens on the discard port) is an outage: RetryableError(storage_unavailable)."""
    client = s3_client(
        S3Settings(endpoint_url="http://127.0.0.1:9", region="us-east-1", connect_timeout_s=2), max_attempts=1
    )
    with pytest.raises(RetryableError) as caught:
        s3_call(client, "head_object", Bucket="bucket", Key="k")
    assert caught.value.code == "storage_unavailable"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a.pdf", ("bucket", "a.pdf")),
        ("s3://bucket/dir/sub/a.pdf", ("bucket", "dir/sub/a.pdf")),
        ("s3://bucket/dir/", ("bucket", "dir/")),  # one trailing slash: a prefix
        ("s3://my.bucket_01/a..b/.hidden/x", ("my.bucket_01", "a..b/.hidden/x")),  # dots inside names are fine
        ("s3://bucket/é ü/名前.pdf", ("bucket", "é ü/名前.pdf")),
    ],
)
def test_canonical_uris_parse(uri: str, expected: tuple[str, str]) -> None:
    """Canonical URIs (prefixes, dots inside names, non-ASCII) parse into bucket and key."""
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/../other/a.pdf",
        "s3://bucket/dir/../../a.pdf",
        "s3://bucket/dir/..",
        "s3://bucket/./a.pdf",
        "s3://bucket/dir/.",
        "s3://bucket//a.pdf",
        "s3://bucket/dir//a.pdf",
        "s3://bucket/dir//",
        "s3://bucket/dir\\a.pdf",
        "s3://bucket/..\\a.pdf",
        "s3://bucket/a\x00.pdf",
        "s3://bucket/a\n.pdf",
        "s3://bucket/a\x7f.pdf",
        "s3://bucket/a\u0085.pdf",
        "s3://bucket/a\ud800.pdf",
        "s3://bucket/" + "k" * 1025,
        "s3://bucket/",
        "s3://bucket",
        "s3:///a.pdf",
        "s3://bad bucket/a.pdf",
        "s3://-bucket/a.pdf",
        "s3://bucket\\x/a.pdf",
        "S3://bucket/a.pdf",
        "file:///etc/passwd",
        "http://bucket/a.pdf",
    ],
)
def test_non_canonical_uris_are_invalid_source(uri: str) -> None:
    """`..`, `.`, empty segments, backslashes, control characters, long keys and malformed URIs are refused
    with invalid_source (what an OCR request's source gets)."""
    with pytest.raises(PoisonError) as caught:
        parse_s3_uri(uri)
    assert caught.value.code == "invalid_source"
    assert len(caught.value.message) < 400


def test_callers_choose_their_code() -> None:
    """The fine-tune validation asks for its own code with the same canonical check."""
    with pytest.raises(PoisonError) as caught:
        parse_s3_uri("s3://bucket/a/../b", code="invalid_uri")
    assert caught.value.code == "invalid_uri"
    assert key_problem("a/../b") == "the key has a `.` or `..` segment"
    assert key_problem("a/b/") is None
