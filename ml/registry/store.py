"""A small S3 client: the one place the library talks to object storage.

Works with AWS S3 and any S3-compatible store (SeaweedFS, MinIO). Conditional writes
(``If-None-Match: *`` for immutable keys, ``If-Match: <etag>`` for the production pointer) are
what make publishing safe without locks; their refusals surface as `ObjectExistsError` and
`PromotionConflict`. Every botocore error is translated into an `ml.errors` exception whose
message names the endpoint, bucket and key -- and never the secret key.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ml.errors import (  # noqa: F401 - MissingObjectError is re-exported for callers
    MissingObjectError,
    ObjectExistsError,
    PromotionConflict,
    StorageAuthError,
    StorageError,
)

if TYPE_CHECKING:
    from ml.config import StorageConfig

log = logging.getLogger(__name__)

_AUTH_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                         "AuthorizationHeaderMalformed", "InvalidSecurity", "AccessDenied", "AllAccessDisabled"})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_CONDITION_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_CHUNK = 1024 * 1024  # 1 MiB reads when streaming downloads




def store_from_credentials(
    storage: StorageConfig,
    *,
    login: str | None = None,
    password: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ObjectStore:
    """The pipeline's store, from an Airflow-style connection's fields or, when absent, the environment.

    The one place credentials become a client: the DAG's tasks and failure callback, the registry
    plugin and the CLI all call it (each finds the fields its own way: the Task SDK, the api-server's
    secrets backends, the demo's state file).

    Args:
        storage: bucket, endpoint and region from the config.
        login / password: access key id and secret key (None: ``AWS_ACCESS_KEY_ID`` /
            ``AWS_SECRET_ACCESS_KEY``, then boto3's own chain).
        extra: the connection's extras; ``endpoint_url`` and ``region_name`` override the config's.
    """
    extra = extra or {}
    return ObjectStore(
        storage.bucket,
        endpoint_url=extra.get("endpoint_url") or storage.endpoint_url,
        access_key=login or os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=password or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region=extra.get("region_name") or storage.region,
    )


class ObjectStore:
    """One bucket on an S3-compatible endpoint.

    Args:
        bucket: bucket name.
        endpoint_url: e.g. ``http://127.0.0.1:8333``; None for AWS S3 itself.
        access_key / secret_key: credentials; None lets boto3 find them (environment,
            ``~/.aws``, instance role).
        region: signing region.
        connect_timeout / read_timeout: seconds per attempt.
        max_attempts: total attempts per request, including the first (botocore "standard" mode).
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        if not bucket:
            raise StorageError("bucket name must be non-empty")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self._access_key = access_key
        self._secret_key = secret_key
        self._timeouts = (connect_timeout, read_timeout, max_attempts)
        self._client_obj: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show credentials
        return f"ObjectStore(bucket={self.bucket!r}, endpoint={self.endpoint_name!r})"

    @classmethod
    def from_config(
        cls, storage: StorageConfig, *, access_key: str | None = None, secret_key: str | None = None
    ) -> ObjectStore:
        """A store for `storage.bucket`; credentials default to AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""
        return store_from_credentials(storage, login=access_key, password=secret_key)

    def for_bucket(self, name: str) -> ObjectStore:
        """The same endpoint and credentials, another bucket (shares the client)."""
        other = ObjectStore(
            name,
            endpoint_url=self.endpoint_url,
            access_key=self._access_key,
            secret_key=self._secret_key,
            region=self.region,
        )
        other._timeouts = self._timeouts
        other._client_obj = self._client_obj
        return other

    @property
    def endpoint_name(self) -> str:
        """The endpoint as shown in messages."""
        return self.endpoint_url or f"AWS S3 ({self.region})"

    @property
    def _client(self) -> Any:
        # boto3 clients are thread-safe once built, but building one is not: build under a lock,
        # from a private Session (the default session is shared global state).
        if self._client_obj is None:
            with self._lock:
                if self._client_obj is None:
                    import boto3
                    from botocore.config import Config

                    connect_timeout, read_timeout, max_attempts = self._timeouts
                    config = Config(
                        region_name=self.region,
                        retries={"mode": "standard", "max_attempts": max_attempts},
                        connect_timeout=connect_timeout,
                        read_timeout=read_timeout,
                        # custom endpoints rarely resolve <bucket>.<host>; path style always works
                        s3={"addressing_style": "path"} if self.endpoint_url else {},
                    )
                    session = boto3.session.Session()
                    self._client_obj = session.client(
                        "s3",
                        endpoint_url=self.endpoint_url,
                        aws_access_key_id=self._access_key,
                        aws_secret_access_key=self._secret_key,
                        config=config,
                    )
        return self._client_obj

    # -- URIs ------------------------------------------------------------------------------------
    def uri(self, key: str) -> str:
        """``s3://<bucket>/<key>``."""
        return f"s3://{self.bucket}/{key}"

    @staticmethod
    def parse_uri(uri: str) -> tuple[str, str]:
        """Split ``s3://bucket/key`` into (bucket, key); the key may be empty for a bucket URI."""
        if not uri.startswith("s3://"):
            raise StorageError(f"not an s3:// URI: {uri!r}; expected s3://<bucket>/<key>")
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket:
            raise StorageError(f"s3 URI {uri!r} has no bucket; expected s3://<bucket>/<key>")
        return bucket, key

    # -- error translation ------------------------------------------------------------------------
    def _fail(self, exc: Exception, op: str, key: str | None = None, *,
              if_match: str | None = None, if_none_match: bool = False) -> NoReturn:
        """Raise the ml.errors exception for a botocore failure (messages carry no secrets)."""
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        where = self.uri(key) if key is not None else f"bucket {self.bucket!r}"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = str(err.get("Message", "")).strip()
            if code in _CONDITION_CODES or status in (409, 412):
                if if_match is not None:
                    raise PromotionConflict(
                        f"{op} {where} refused: it no longer has ETag {if_match} (another writer changed "
                        f"it first; {code or status})"
                    ) from None
                if if_none_match:
                    raise ObjectExistsError(
                        f"{op} {where} refused: the key already exists and is write-once "
                        f"(If-None-Match: *; {code or status})"
                    ) from None
            if code in _MISSING_KEY_CODES or (status == 404 and code not in ("NoSuchBucket",)):
                raise MissingObjectError(f"{where} does not exist on {self.endpoint_name}") from None
            if code == "NoSuchBucket":
                raise StorageError(
                    f"bucket {self.bucket!r} does not exist on {self.endpoint_name} "
                    f"({op} {where}); create it with ObjectStore.ensure_bucket()"
                ) from None
            if code in _AUTH_CODES or status in (401, 403):
                raise StorageAuthError(
                    f"credentials for {self.endpoint_name} were rejected ({code or status}) during {op} "
                    f"{where}; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the Airflow connection"
                ) from None
            raise StorageError(f"{op} {where} on {self.endpoint_name} failed: {code or status} {message}") from None
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)):
            raise StorageError(
                f"cannot reach object store endpoint {self.endpoint_name} ({op} {where}): "
                f"{type(exc).__name__}"
            ) from None
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            raise StorageError(
                f"no usable credentials for {self.endpoint_name} ({op} {where}); set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        raise StorageError(f"{op} {where} on {self.endpoint_name} failed: {type(exc).__name__}: {exc}") from None

    @staticmethod
    def _boto_errors() -> tuple[type[Exception], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError)

    # -- buckets --------------------------------------------------------------------------------
    def list_buckets(self) -> list[str]:
        """Names of the buckets these credentials can see (also a cheap authenticated ping)."""
        try:
            response = self._client.list_buckets()
        except self._boto_errors() as exc:
            self._fail(exc, "list buckets")
        return [b["Name"] for b in response.get("Buckets", [])]

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists already (safe to call concurrently)."""
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status != 404:
                self._fail(exc, "head bucket")
        except self._boto_errors() as exc:
            self._fail(exc, "head bucket")
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
            log.info("created bucket %s on %s", self.bucket, self.endpoint_name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                self._fail(exc, "create bucket")
        except self._boto_errors() as exc:
            self._fail(exc, "create bucket")

    # -- writes ----------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, *,
                  if_none_match: bool = False, if_match: str | None = None, content_type: str | None = None) -> str:
        """Write `data` to `key` and return the new ETag.

        Args:
            if_none_match: write only if the key does not exist (else `ObjectExistsError`).
            if_match: write only if the key's current ETag is this one (else `PromotionConflict`).
            content_type: the object's Content-Type.
        """
        return self._put(key, data, if_none_match=if_none_match, if_match=if_match, content_type=content_type)

    def put_file(self, key: str, path: str | Path, *,
                 if_none_match: bool = False, if_match: str | None = None, content_type: str | None = None) -> str:
        """Upload a local file in one PUT (so the conditions apply to it); returns the ETag."""
        with Path(path).open("rb") as fh:
            return self._put(key, fh, if_none_match=if_none_match, if_match=if_match, content_type=content_type)

    def put_json(
        self,
        key: str,
        obj: Any,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str | None = "application/json",
    ) -> str:
        """Write `obj` as indented, key-sorted JSON; returns the ETag."""
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        return self._put(key, data, if_none_match=if_none_match, if_match=if_match, content_type=content_type)

    def _put(self, key: str, body: Any, *, if_none_match: bool, if_match: str | None, content_type: str | None) -> str:
        if if_none_match and if_match is not None:
            raise StorageError(f"put {self.uri(key)}: give if_none_match or if_match, not both")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": body}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        if content_type:
            kwargs["ContentType"] = content_type
        try:
            response = self._client.put_object(**kwargs)
        except self._boto_errors() as exc:
            self._fail(exc, "put", key, if_match=if_match, if_none_match=if_none_match)
        log.debug("put %s (etag %s)", self.uri(key), response.get("ETag"))
        return str(response["ETag"])

    def put_file_once(self, key: str, path: str | Path) -> None:
        """Write-once upload (If-None-Match); an identical object left by an interrupted earlier attempt
        is accepted, so a retried publish resumes. Other content under the key: ObjectExistsError."""
        from ml.io import file_digest

        try:
            self.put_file(key, path, if_none_match=True)
        except ObjectExistsError:
            head = self.head(key)
            # A single-part PUT's ETag is the MD5 of the bytes: same ETag, same content.
            if head is None or head["etag"].strip('"') != file_digest(path, "md5"):
                raise ObjectExistsError(
                    f"{self.uri(key)} already exists with different content; it is write-once"
                ) from None
            log.info("%s already holds identical content (resumed publish)", self.uri(key))

    def upload_dir(self, local_dir: str | Path, prefix: str, *, if_none_match: bool = False) -> list[str]:
        """Upload every file under `local_dir` to `<prefix>/<relative path>`; returns the keys."""
        root = Path(local_dir)
        if not root.is_dir():
            raise StorageError(f"upload_dir: {root} is not a directory")
        keys = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = f"{prefix.rstrip('/')}/{path.relative_to(root).as_posix()}"
            self.put_file(key, path, if_none_match=if_none_match)
            keys.append(key)
        log.info("uploaded %d files from %s to %s", len(keys), root, self.uri(prefix))
        return keys

    # -- reads -----------------------------------------------------------------------------------
    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        """(content, ETag) of `key`, or None when the key does not exist."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read(), str(response["ETag"])
        except self._boto_errors() as exc:
            try:
                self._fail(exc, "get", key)
            except MissingObjectError:
                return None

    def get_bytes(self, key: str) -> bytes:
        """The content of `key`; `MissingObjectError` (a KeyError) when it does not exist."""
        found = self.get_with_etag(key)
        if found is None:
            raise MissingObjectError(f"{self.uri(key)} does not exist on {self.endpoint_name}")
        return found[0]

    def get_json(self, key: str) -> Any:
        """Parse `key` as JSON; StorageError naming the key when it is not valid JSON."""
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StorageError(f"{self.uri(key)} is not valid JSON: {exc}") from None

    def head(self, key: str) -> dict[str, Any] | None:
        """{etag, size, last_modified, content_type} of `key`, or None when it does not exist."""
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=key)
        except self._boto_errors() as exc:
            try:
                self._fail(exc, "head", key)
            except MissingObjectError:
                return None
        return {
            "etag": str(response["ETag"]),
            "size": int(response["ContentLength"]),
            "last_modified": response.get("LastModified"),
            "content_type": response.get("ContentType"),
        }

    def exists(self, key: str) -> bool:
        """Whether `key` exists."""
        return self.head(key) is not None

    def iter_objects(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[dict[str, Any]]:
        """{key, size, last_modified, etag} of every object under `prefix`, in S3's (lexicographic) order.

        The listing carries sizes and times, so callers that need them (retention, source limits)
        make no HEAD request per object.
        """
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}):
                for item in page.get("Contents", []):
                    yield {"key": item["Key"], "size": int(item.get("Size", 0)),
                           "last_modified": item.get("LastModified"), "etag": str(item.get("ETag", ""))}
        except self._boto_errors() as exc:
            self._fail(exc, "list", prefix)

    def iter_keys(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[str]:
        """Every key under `prefix`, in S3's (lexicographic) order, across pages of `page_size`."""
        for item in self.iter_objects(prefix, page_size=page_size):
            yield item["key"]

    def list_keys(self, prefix: str = "", *, page_size: int = 1000) -> list[str]:
        """Every key under `prefix` (all pages), sorted."""
        return sorted(self.iter_keys(prefix, page_size=page_size))

    def download_file(self, key: str, path: str | Path, *, max_bytes: int | None = None) -> Path:
        """Stream `key` to `path` via a temporary file beside it, so `path` is never partial.

        Args:
            max_bytes: refuse (StorageError, nothing left behind) an object larger than this,
                counted while streaming: a store cannot fill the disk past what the caller expects.
        """
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    response = self._client.get_object(Bucket=self.bucket, Key=key)
                    body = response["Body"]
                    written = 0
                    for chunk in iter(lambda: body.read(_CHUNK), b""):
                        written += len(chunk)
                        if max_bytes is not None and written > max_bytes:
                            raise StorageError(
                                f"{self.uri(key)} is larger than the {max_bytes} bytes expected of it; "
                                "refusing to download more"
                            )
                        out.write(chunk)
                except self._boto_errors() as exc:
                    self._fail(exc, "download", key)
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return dest

    # -- deletes ---------------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        """Delete `key` (no error when it is already gone)."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except self._boto_errors() as exc:
            self._fail(exc, "delete", key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; returns how many were deleted."""
        if not prefix:
            raise StorageError("delete_prefix needs a non-empty prefix (refusing to empty the whole bucket)")
        keys = self.list_keys(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[start : start + 1000]
            try:
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except self._boto_errors() as exc:
                self._fail(exc, "delete", prefix)
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"could not delete {len(errors)} keys under {self.uri(prefix)}, e.g. "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
        return len(keys)
