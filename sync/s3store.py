"""``S3Store``: the ``ObjectStore`` on any S3-compatible server, through boto3.

Credentials come from boto3's standard chain (environment, shared files, instance role) and
are never logged. Large files go up in parts (``TransferConfig``); the sha256 of the whole
object travels as user metadata (``x-amz-meta-sha256``) because a multipart ETag is not a
checksum of the bytes. botocore's errors are wrapped here into ``RetryableError`` (connection
problems, 5xx, throttling, a multipart upload whose completion answer was lost, a clock more
than 15 minutes off the server's: NTP sets it) or ``PermanentError`` (credentials rejected,
bucket missing, ...). A HEAD's refusal has no body (a bare 400 or 403), so ``head`` and
``check`` ask the same key with a one-byte GET for the reason before they wrap it.
"""
from __future__ import annotations

import email.utils
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                 HTTPClientError, NoCredentialsError, ParamValidationError,
                                 PartialCredentialsError)

from .errors import ObjectNotFound, PermanentError, RetryableError, SyncError
from .objectstore import (CHUNK, ObjectInfo, PendingUpload, TimedListing, check_key, join_prefix, open_source, read_chunks,
                          sha256_of)

log = logging.getLogger(__name__)

SSE_MODES = ("AES256", "aws:kms")
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired", "AuthorizationHeaderMalformed", "InvalidClientTokenId"}
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
                "InternalError", "ServiceUnavailable", "TooManyRequestsException", "RequestThrottled",
                # a retried CompleteMultipartUpload whose first answer was lost: S3 forgot the upload
                # id when it completed it; the next attempt heads the key (found, or sent afresh)
                "NoSuchUpload",
                # fewer bytes arrived than were sent (a connection cut mid-upload by a proxy): sent again
                "IncompleteBody"}
MAX_SKEW = 900.0  # seconds: S3 refuses a request signed more than 15 minutes off its own clock


def server_time(response: dict[str, Any]) -> float | None:
    """The server's clock (epoch seconds) from the ``Date`` header of a boto3 answer (or of an
    error's ``response``); None when it has none."""
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders") or {}
    try:
        return email.utils.parsedate_to_datetime(str(headers.get("date", ""))).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def clock_skew(exc: ClientError, now: float) -> float | None:
    """How many seconds this box's clock ``now`` is ahead of the server's (behind: negative),
    from the ``Date`` of a refused answer, when that is more than S3 allows; else None."""
    server = server_time(exc.response)
    if server is None:
        return None
    skew = now - server
    return skew if abs(skew) > MAX_SKEW else None


def wrap_boto_error(exc: Exception, bucket: str, what: str, setting: str = "[sync.target] bucket") -> SyncError:
    """Sort a botocore/boto3 error into ``RetryableError`` or ``PermanentError`` with a clear message.

    ``what`` names the operation and key (e.g. "put images/ab.jpg"); no credentials are quoted.
    """
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = err.get("Message") or code
        skew = clock_skew(exc, time.time()) if status in (400, 403) else None
        if code == "RequestTimeTooSkewed" or skew is not None:
            # Not the keys: an edge box without a real-time clock starts before NTP has set the
            # time, and NTP fixes it without anyone (so retried, not a stop).
            off = f"{abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'}" if skew is not None else "off from"
            return RetryableError(f"{what}: refused because this box's clock is {off} the server's "
                                  "(more than 15 minutes is refused); set the time (NTP: timedatectl set-ntp true)")
        if code in ("ExpiredToken", "TokenRefreshRequired"):
            return PermanentError(f"credentials rejected: the session token expired ({code} on {what} in bucket "
                                  f"{bucket}); renew the temporary credentials (AWS_SESSION_TOKEN or the profile's "
                                  "role) and restart the agent")
        if code in _CREDENTIAL_CODES:
            return PermanentError(f"credentials rejected: {code} on {what} in bucket {bucket}; check "
                                  "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile in use")
        if code == "AccessDenied" or status == 403:
            return PermanentError(f"credentials rejected: access denied on {what} in bucket {bucket} "
                                  "(wrong keys, or the identity lacks permission)")
        if code == "NoSuchBucket":
            return PermanentError(f"bucket {bucket} does not exist (on {what}); create it or fix {setting}")
        if code in _RETRY_CODES or status >= 500 or status == 429:
            return RetryableError(f"{what}: server said {code or status}: {message}")
        return PermanentError(f"{what} in bucket {bucket}: {code or status}: {message}")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return PermanentError(f"no usable AWS credentials for bucket {bucket}: {exc.__class__.__name__}; "
                              "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or an instance role")
    if isinstance(exc, ParamValidationError):
        return PermanentError(f"{what}: invalid request: {exc}")
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return RetryableError(f"{what}: cannot reach the S3 endpoint: {exc}")
    if isinstance(exc, BotoCoreError):
        return RetryableError(f"{what}: {exc}")
    return RetryableError(f"{what}: {exc.__class__.__name__}: {exc}")


class S3Store:
    """Objects under ``s3://<bucket>/<prefix>/``.

    ``endpoint_url``: an S3-compatible server (path-style addressing is used then);
    ``sse``: "AES256" (SSE-S3), "aws:kms" (SSE-KMS, with ``kms_key_id`` or the bucket's key) or
    None; ``multipart_threshold``/``multipart_chunksize`` in bytes (at least 5 MiB for S3);
    ``client``: an existing boto3 S3 client (tests), else one is built from the standard chain.
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, sse: str | None = None, kms_key_id: str | None = None,
                 multipart_threshold: int = 16 * 1024 * 1024, multipart_chunksize: int | None = None,
                 max_concurrency: int = 4, connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 client: Any = None, setting: str = "[sync.target] bucket") -> None:
        """``setting``: where the user gave this bucket, for the message when it does not exist."""
        if sse not in (None, *SSE_MODES):
            raise ValueError(f"sse: expected one of {SSE_MODES} or None, got {sse!r}")
        if kms_key_id and sse != "aws:kms":
            raise ValueError("kms_key_id is only meaningful with sse = 'aws:kms'")
        self.bucket, self.setting = bucket, setting
        self.prefix = prefix.strip("/")
        self.sse, self.kms_key_id = sse, kms_key_id
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                       multipart_chunksize=multipart_chunksize or max(multipart_threshold, 8 << 20),
                                       max_concurrency=max_concurrency, use_threads=max_concurrency > 1)
        if client is None:
            config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=connect_timeout,
                            read_timeout=read_timeout,
                            s3={"addressing_style": "path"} if endpoint_url else None)
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                                     config=config)
        self.client = client
        self._no_date_said = False  # list_with_times: a server that sends no Date, said once

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.bucket}/{self.prefix})"

    def _key(self, key: str) -> str:
        return join_prefix(self.prefix, check_key(key))

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise wrap_boto_error(exc, self.bucket, what, self.setting) from exc

    def _reason(self, exc: ClientError, full_key: str) -> ClientError:
        """The error a HEAD's refusal stands for. A HEAD answer has no body, so botocore knows
        only "400" or "403": an expired session token, a wrong region or a clock that is off
        read as the same bare code (and the uploader heads every key before it puts one). A
        one-byte GET of the same key is refused with the reason (``ExpiredToken``,
        ``AccessDenied``, ...); the HEAD's own error when it tells nothing more."""
        if str(exc.response.get("Error", {}).get("Code", "")) not in ("400", "403"):
            return exc
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=full_key, Range="bytes=0-0")
            r["Body"].close()
        except ClientError as other:
            if str(other.response.get("Error", {}).get("Code", "")) not in ("", "400", "403", "404", "NoSuchKey"):
                return other
        except BotoCoreError:
            pass
        return exc

    def put(self, key: str, data: bytes | Path, content_type: str = "application/octet-stream",
            sha256: str | None = None, metadata: dict[str, str] | None = None) -> None:
        meta = dict(metadata or {})
        meta["sha256"] = sha256 or sha256_of(data)
        extra: dict[str, Any] = {"ContentType": content_type, "Metadata": meta}
        if self.sse:
            extra["ServerSideEncryption"] = self.sse
            if self.kms_key_id:
                extra["SSEKMSKeyId"] = self.kms_key_id
        with open_source(data) as src:
            self._call(f"put {key}", self.client.upload_fileobj, Fileobj=src, Bucket=self.bucket,
                       Key=self._key(key), ExtraArgs=extra, Config=self.transfer)
        log.debug("put s3://%s/%s", self.bucket, self._key(key))

    def head(self, key: str) -> ObjectInfo | None:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise wrap_boto_error(self._reason(exc, self._key(key)), self.bucket, f"head {key}", self.setting) from exc
        except BotoCoreError as exc:
            raise wrap_boto_error(exc, self.bucket, f"head {key}", self.setting) from exc
        meta = {str(k).lower(): str(v) for k, v in (r.get("Metadata") or {}).items()}
        return ObjectInfo(key, int(r.get("ContentLength", 0)), meta.get("sha256"), meta)

    def get(self, key: str, progress: Callable[[], None] | None = None) -> bytes:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return read_chunks(r["Body"].iter_chunks(CHUNK), progress)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(f"no object {key} in s3://{self.bucket}/{self.prefix}") from exc
            raise wrap_boto_error(exc, self.bucket, f"get {key}", self.setting) from exc
        except BotoCoreError as exc:
            raise wrap_boto_error(exc, self.bucket, f"get {key}", self.setting) from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        full = join_prefix(self.prefix, prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        try:
            keys = [obj["Key"][strip:] for page in pages for obj in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as exc:
            raise wrap_boto_error(exc, self.bucket, f"list {prefix or '/'}", self.setting) from exc
        return iter(sorted(keys))

    def list_with_times(self, prefix: str = "") -> TimedListing:
        """``list`` with each object's LastModified and size, and ``now`` from the ``Date`` of the
        listing's first answer: LastModified is the server's clock, and this box's may be off
        from it by up to the 15 minutes S3 signs with (more on a server that does not check).
        The box's own clock only when the server sends no Date (said). ``writing``: the
        multipart uploads in progress under ``prefix`` (their newest part, else Initiated), which no object
        listing shows: a model file going up for an hour over a slow link is one. An identity
        not allowed to list them (s3:ListBucketMultipartUploads) gets none, said."""
        full = join_prefix(self.prefix, prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        objects: dict[str, tuple[float, int]] = {}
        writing: dict[str, float] = {}
        uploads: list[PendingUpload] = []
        now = None
        try:
            # The uploads in progress first: one that completes between the two listings is then
            # an object in the second (listed the other way round, it was in neither).
            try:
                for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                         Prefix=full):
                    for up in page.get("Uploads", []):
                        key, (last, size) = up["Key"][strip:], self._last_part(up)
                        writing[key] = max(last, writing.get(key, last))
                        uploads.append(PendingUpload(key, str(up["UploadId"]), last, size))
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code not in ("AccessDenied", "NotImplemented"):  # not allowed; a server without them
                    raise
                log.warning("s3://%s/%s: cannot list multipart uploads in progress (%s; s3:ListBucketMultipart"
                            "Uploads); a file going up now is not seen", self.bucket, full, code)
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                now = server_time(page) if now is None else now
                for obj in page.get("Contents", []):
                    objects[obj["Key"][strip:]] = (obj["LastModified"].timestamp(), int(obj.get("Size", 0)))
        except (ClientError, BotoCoreError) as exc:
            raise wrap_boto_error(exc, self.bucket, f"list {prefix or '/'}", self.setting) from exc
        if now is None:
            # Said once a store: clean-registry listed again for each folder it removed, and said
            # it each time (5 lines for 3 folders). What it risks is said with it: a box clock
            # ahead makes objects older, and where the server checks no signature's time (only
            # there: S3 refuses one 15 minutes off), 2 h ahead removed publications running now.
            (log.warning if not self._no_date_said else log.debug)(
                "s3://%s/%s: the server's answers have no Date; objects are aged by this box's clock "
                "(one ahead of the server's makes them older: keep it set by NTP)", self.bucket, full)
            self._no_date_said = True
            now = time.time()
        return TimedListing(objects, now, writing, tuple(uploads))

    def _last_part(self, upload: dict[str, Any]) -> tuple[float, int]:
        """When a multipart upload last made progress: its newest part's LastModified, else its
        Initiated (a model file going up for two hours over a slow link is as young as its last
        part, not two hours old); and the bytes of its parts."""
        last, size = upload["Initiated"].timestamp(), 0
        try:
            for page in self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=upload["Key"],
                                                                        UploadId=upload["UploadId"]):
                for part in page.get("Parts", []):
                    last = max(last, part["LastModified"].timestamp())
                    size += int(part.get("Size", 0))
        except ClientError as exc:  # finished or aborted since the listing, or not allowed: its start
            log.debug("s3://%s/%s: parts of upload not listed: %s", self.bucket, upload["Key"], exc)
        return last, size

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort the multipart upload ``upload_id`` of ``key`` (listed by ``list_with_times``):
        its parts, kept and billed until then, are freed. One gone already is no error."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("NoSuchUpload", "404"):
                return
            raise wrap_boto_error(exc, self.bucket, f"abort upload of {key}", self.setting) from exc
        except BotoCoreError as exc:
            raise wrap_boto_error(exc, self.bucket, f"abort upload of {key}", self.setting) from exc

    def folders(self, prefix: str) -> list[str]:
        """The names of the "folders" right under ``prefix`` (a delimiter listing: one entry per
        folder, not one per object in it), sorted."""
        full = join_prefix(self.prefix, prefix.strip("/")) + "/" if prefix.strip("/") else \
            (f"{self.prefix}/" if self.prefix else "")
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full, Delimiter="/")
        try:
            names = [p["Prefix"][len(full):].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])]
        except (ClientError, BotoCoreError) as exc:
            raise wrap_boto_error(exc, self.bucket, f"list {prefix or '/'}", self.setting) from exc
        return sorted(n for n in names if n)

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise PermanentError(f"bucket {self.bucket} does not exist; create it or fix {self.setting}") from exc
            raise wrap_boto_error(self._reason(exc, join_prefix(self.prefix, "images/")), self.bucket,
                                  "head bucket", self.setting) from exc
        except BotoCoreError as exc:
            raise wrap_boto_error(exc, self.bucket, "head bucket", self.setting) from exc

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"
