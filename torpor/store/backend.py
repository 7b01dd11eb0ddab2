"""Where a tiered store keeps its objects: the ``Backend`` protocol and S3.

Role: a :class:`Backend` stores named, immutable objects (``get`` / ``put`` /
``exists`` / ``list`` / ``delete``); :class:`S3Backend` is one on any S3-compatible
object store, through ``boto3`` (the ``s3`` extra).  The store layout inside the
bucket mirrors the local folder under the configured prefix::

    <prefix>/FORMAT                    "torpor-store 2" + the key id (see tiered)
    <prefix>/packs/<aa>/<hash>.pack    a checkpoint's new chunk frames, concatenated;
                                       <hash> = BLAKE3 of the whole pack object
    <prefix>/snapshots/<id>.index      where each chunk of <id> is (pack, offset, length)
    <prefix>/snapshots/<id>.manifest   exactly the local manifest file's bytes
    <prefix>/snapshots/<id>.removed    tombstone (MAC of the id)
    <prefix>/condemned/<hash>          gc: the pack <hash> was found unreferenced
    <prefix>/gc/lock                   gc: one gc at a time across hosts

(The formats of packs, indexes and the gc rule are in :mod:`torpor.store.tiered`.)

Invariants:

- Configuration is AWS's own: ``TORPOR_STORE=s3://bucket/prefix`` names the place;
  endpoint (``AWS_ENDPOINT_URL``), region, credentials and profiles come from the
  standard AWS configuration chain that boto3 reads.  Nothing torpor-specific holds
  a secret.
- ``put(..., if_absent=True)`` never replaces an existing object: it is sent with
  ``If-None-Match: *`` (SeaweedFS, MinIO and AWS S3 refuse with 412 when the object
  exists), so two hosts uploading the same chunk cannot overwrite each other, and
  an object is never replaced by other bytes.
- Every failure is a :class:`~torpor.errors.RemoteStoreError` subclass naming the
  endpoint and bucket: unreachable (after botocore's retries and ours, with
  exponential backoff), access denied / bad credentials, no such bucket.  Nothing
  from botocore escapes as a bare exception.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from torpor.errors import (
    NoSuchBucketError,
    RemoteAccessError,
    RemoteStoreError,
    RemoteUnreachableError,
    UsageError,
)

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    """A listed object: name (relative to the store), size, last-modified time (the
    server's clock, seconds since the epoch)."""

    name: str
    size: int
    mtime: float


# Our own retries wrap botocore's (which already retries throttling, 5xx and
# connection errors a few times): a store upload that fails after both is an error
# the caller sees, so the total wait is kept to a few seconds.
RETRIES = int(os.environ.get("TORPOR_S3_RETRIES", "3"))
BACKOFF_S = 0.2
MAX_POOL = 32


class Backend(Protocol):
    """Named immutable objects (names are ``/``-separated, relative to the store)."""

    requests: int  # requests sent so far (stats)
    bytes_up: int
    bytes_down: int

    def describe(self) -> str: ...

    def get(self, name: str) -> bytes | None:
        """The object's bytes, or None if there is no such object."""
        ...

    def put(self, name: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Store ``data``; with ``if_absent`` only if absent.  False if it existed."""
        ...

    def get_range(self, name: str, offset: int, length: int) -> bytes | None:
        """Bytes ``[offset, offset+length)`` of the object (short if it is shorter),
        or None if there is no such object."""
        ...

    def exists(self, name: str) -> bool: ...

    def list(self, prefix: str) -> list[str]:
        """Names under ``prefix`` (complete: paged through)."""
        ...

    def list_info(self, prefix: str) -> tuple[list[ObjectInfo], float]:
        """Objects under ``prefix`` with sizes and times, and the server's "now" (its
        clock, as the object times are: gc's grace periods are measured on it)."""
        ...

    def delete(self, name: str) -> None: ...


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at either end)."""
    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc:
        raise UsageError(f"a store URL must look like s3://bucket/prefix, got {url!r}")
    prefix = u.path.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise UsageError(f"bad prefix in store URL {url!r}")
    return u.netloc, prefix


def _server_time(date: str | None) -> float:
    """The server's clock from a response's ``Date`` header (ours if it has none or
    it does not parse: a broken header must not fail a listing)."""
    try:
        return parsedate_to_datetime(date).timestamp() if date else time.time()
    except (TypeError, ValueError):
        return time.time()


class S3Backend:
    """One bucket (and prefix) on an S3-compatible object store."""

    def __init__(self, url: str, *, client: Any = None) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self._client = client
        self._lock = threading.Lock()
        self.requests = 0  # counted for the stats / benchmarks
        self.bytes_up = 0
        self.bytes_down = 0

    # -- plumbing ------------------------------------------------------------

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError as e:  # the extra is not installed
                    raise RemoteStoreError(
                        "TORPOR_STORE=s3://... needs boto3: pip install 'torpor[s3]'",
                        step="open store",
                    ) from e
                cfg = Config(
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=60,
                    max_pool_connections=MAX_POOL,
                )
                self._client = boto3.session.Session().client("s3", config=cfg)
            return self._client

    @property
    def endpoint(self) -> str:
        try:
            return str(self.client.meta.endpoint_url)
        except RemoteStoreError:
            return "?"

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, what: str, name: str, fn: Callable[[], T]) -> T:
        """``fn()`` with our retries; every failure as a RemoteStoreError."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )

        delay = BACKOFF_S
        for attempt in range(RETRIES + 1):
            self.requests += 1
            try:
                return fn()
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
                where = f"{self.describe()} ({what} {name})"
                if code == "NoSuchBucket":
                    raise NoSuchBucketError(
                        f"bucket {self.bucket!r} does not exist at {self.endpoint}",
                        step=what,
                    ) from e
                if status == 403 or code in (
                    "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "403",
                ):  # fmt: skip
                    raise RemoteAccessError(
                        f"access denied by {where}: {code or status} — check the credentials "
                        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and the "
                        "bucket's policy",
                        step=what,
                    ) from e
                if status >= 500 and attempt < RETRIES:
                    self._sleep(delay)
                    delay *= 4
                    continue
                raise RemoteStoreError(f"{where} failed: {code or status} {e}", step=what) from e
            except NoCredentialsError as e:
                raise RemoteAccessError(
                    f"no credentials for {self.describe()}: set AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
                    step=what,
                ) from e
            except (EndpointConnectionError, BotoConnectionError, ConnectionError) as e:
                if attempt < RETRIES:
                    self._sleep(delay)
                    delay *= 4
                    continue
                raise RemoteUnreachableError(
                    f"cannot reach the object store {self.describe()}: {e}", step=what
                ) from e
            except BotoCoreError as e:
                raise RemoteStoreError(f"{self.describe()} ({what} {name}): {e}", step=what) from e
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _sleep(delay: float) -> None:
        time.sleep(delay * (0.5 + random.random()))  # jitter: hosts do not retry in step

    # -- the protocol ----------------------------------------------------------

    def check_bucket(self) -> None:
        """Raise NoSuchBucketError / RemoteAccessError / RemoteUnreachableError now."""
        from botocore.exceptions import ClientError

        def head() -> None:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as e:
                # HEAD has no body: a 404 is the bucket, a 403 is access
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404:
                    e.response.setdefault("Error", {})["Code"] = "NoSuchBucket"
                raise

        self._call("check bucket", "", head)

    def get(self, name: str) -> bytes | None:
        from botocore.exceptions import ClientError

        def fetch() -> bytes | None:
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return r["Body"].read()

        data = self._call("download", name, fetch)
        if data is not None:
            self.bytes_down += len(data)
        return data

    def get_range(self, name: str, offset: int, length: int) -> bytes | None:
        from botocore.exceptions import ClientError

        if length <= 0:
            return b""

        def fetch() -> bytes | None:
            try:
                r = self.client.get_object(
                    Bucket=self.bucket, Key=self._key(name),
                    Range=f"bytes={offset}-{offset + length - 1}",
                )  # fmt: skip
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404"):
                    return None
                if code == "InvalidRange":  # past the end: the object is shorter
                    return b""
                raise
            return r["Body"].read(length + 1)  # (a server ignoring Range: bounded read)

        data = self._call("download", name, fetch)
        if data is not None:
            self.bytes_down += len(data)
        return data

    def put(self, name: str, data: bytes, *, if_absent: bool = False) -> bool:
        from botocore.exceptions import ClientError

        def send() -> bool:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(name), "Body": data}
            if if_absent:
                kw["IfNoneMatch"] = "*"
            try:
                self.client.put_object(**kw)
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if if_absent and (status == 412 or e.response.get("Error", {}).get("Code") in (
                    "PreconditionFailed", "ConditionalRequestConflict",
                )):  # fmt: skip
                    return False
                raise
            return True

        wrote = self._call("upload", name, send)
        if wrote:
            self.bytes_up += len(data)
        return wrote

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False
                raise
            return True

        return self._call("check", name, head)

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        cut = len(self.prefix) + 1 if self.prefix else 0

        def page_all() -> list[str]:
            out: list[str] = []
            pager = self.client.get_paginator("list_objects_v2")
            for n, page in enumerate(pager.paginate(Bucket=self.bucket, Prefix=full)):
                self.requests += n > 0  # (the first page is counted by _call)
                out.extend(o["Key"][cut:] for o in page.get("Contents", ()))
            return out

        return self._call("list", prefix, page_all)

    def list_info(self, prefix: str) -> tuple[list[ObjectInfo], float]:
        full = self._key(prefix)
        cut = len(self.prefix) + 1 if self.prefix else 0

        def page_all() -> tuple[list[ObjectInfo], float]:
            out: list[ObjectInfo] = []
            now = 0.0
            pager = self.client.get_paginator("list_objects_v2")
            for n, page in enumerate(pager.paginate(Bucket=self.bucket, Prefix=full)):
                self.requests += n > 0
                if n == 0:
                    date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
                    now = _server_time(date)
                out.extend(
                    ObjectInfo(o["Key"][cut:], int(o.get("Size", 0)), o["LastModified"].timestamp())
                    for o in page.get("Contents", ())
                )
            return out, now

        return self._call("list", prefix, page_all)

    def delete(self, name: str) -> None:
        key = self._key(name)
        self._call("delete", name, lambda: self.client.delete_object(Bucket=self.bucket, Key=key))
