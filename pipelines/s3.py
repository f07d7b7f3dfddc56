"""The S3 endpoint and its clients: the standard AWS environment, checked and never echoed.

The endpoint and credentials come from ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... so any
S3-compatible server works; the public OpenNeuro bucket is read with unsigned requests. S3
errors are translated into the project's errors (a transient one is the only kind worth a retry).
"""
from __future__ import annotations

import os
from functools import lru_cache

from .errors import ConfigError, DatasetError, TransientIOError

UNSIGNED_BUCKETS = frozenset({"openneuro.org"})


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key.strip("/")


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def redact_url(url: str | None) -> str | None:
    """`url` fit for a log line: user, password and query (where credentials hide) replaced by ``***``."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a URL at all: show its scheme only
        return url.split("://", 1)[0] + "://***" if "://" in url else "***"
    netloc = ("***@" if parts.username or parts.password else "") + host + port
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def check_endpoint(url: str | None) -> None:
    """Refuse an ``AWS_ENDPOINT_URL`` boto3 cannot use, or one carrying credentials (they would be
    sent in the clear and shown in errors); the message shows the URL redacted."""
    if not url:
        return
    from urllib.parse import urlsplit

    fix = ("give http(s)://host[:port] of the S3 server; credentials go in AWS_ACCESS_KEY_ID / "
           "AWS_SECRET_ACCESS_KEY, never in the URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:  # its message may quote the URL, credentials included: not chained
        raise ConfigError(f"AWS_ENDPOINT_URL is not a valid URL ({redact_url(url)}); {fix}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"AWS_ENDPOINT_URL is not an http(s) URL ({redact_url(url)}); {fix}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(f"AWS_ENDPOINT_URL carries credentials or a query ({redact_url(url)}); {fix}")


def endpoint_identity() -> str:
    """The S3 endpoint this process talks to, normalised, without credentials (``aws`` for AWS's own).

    Part of the download cache's key: two servers that both have a bucket ``b`` never share entries.
    """
    from urllib.parse import urlsplit

    url = endpoint_url()
    if not url:
        return "aws"
    check_endpoint(url)
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number: boto3 refuses it anyway
        port = ""
    return f"{parts.scheme.lower()}://{host}{port}{parts.path.rstrip('/')}"


def client_for(unsigned: bool, endpoint: str | None):
    check_endpoint(endpoint)
    return _cached_client(unsigned, endpoint, os.environ.get("AWS_MAX_ATTEMPTS"), os.environ.get("AWS_RETRY_MODE"))


@lru_cache(maxsize=16)
def _cached_client(unsigned: bool, endpoint: str | None, _attempts: str | None, _mode: str | None):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    # Throttling (503 SlowDown), 5xx and connection errors are retried with exponential backoff
    # and jitter; AWS_MAX_ATTEMPTS / AWS_RETRY_MODE in the environment override these defaults.
    cfg = Config(
        signature_version=UNSIGNED if unsigned else None,
        retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                 "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "10"))},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path"},
    )
    session = boto3.session.Session()
    try:
        return session.client("s3", endpoint_url=endpoint, config=cfg,
                              region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    except ValueError:  # botocore's message holds the whole URL, credentials included: not chained
        raise ConfigError(f"AWS_ENDPOINT_URL is not a valid URL ({redact_url(endpoint)}); give "
                          "http(s)://host:port of the S3 server, with credentials in AWS_ACCESS_KEY_ID / "
                          "AWS_SECRET_ACCESS_KEY, not in the URL") from None


def s3_client(bucket: str):
    """A boto3 S3 client for `bucket` (unsigned for public OpenNeuro)."""
    return client_for(bucket in UNSIGNED_BUCKETS, endpoint_url())


def translate_s3_error(err: Exception, what: str) -> Exception:
    """Map botocore errors to the project's errors with a message naming `what` and a fix."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(err, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
        return TransientIOError(
            f"cannot reach the S3 endpoint for {what} ({redact_url(endpoint_url()) or 'AWS default'}); "
            "check AWS_ENDPOINT_URL and that the server is running"
        )
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchBucket",):
            return DatasetError(f"{what}: the bucket does not exist; check the s3:// URI")
        if code in ("NoSuchKey", "404", "NotFound"):
            return DatasetError(f"{what}: no such object; check the path and the dataset version")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return DatasetError(f"{what}: access denied; check AWS credentials (AWS_ACCESS_KEY_ID, ...)")
        if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
            return TransientIOError(f"{what}: the S3 server answered {code or status}; retry later")
        return DatasetError(f"{what}: S3 error {code or status}: {err}")
    return err
