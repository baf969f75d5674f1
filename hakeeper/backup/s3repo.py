"""The S3-compatible repository (aiobotocore), split from :mod:`hakeeper.backup.repo` so that
code using only filesystem repositories never imports aiobotocore."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import AsyncExitStack
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from hakeeper.backup import codec
from hakeeper.backup.errors import CorruptObject, NotFound, RepoError, RepoUnavailable
from hakeeper.backup.repo import CHUNK, KeySource, ListEntry, Repository, check_name
from hakeeper.util.log import get_logger

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = get_logger(__name__)


# ====================================================================== S3


class S3Repository(Repository):
    """An S3-compatible bucket (optionally below ``prefix``), path-style addressing.

    ``put_unique`` checks for the name, then writes with ``If-None-Match: *`` so that the
    server refuses to replace an object created in between (SeaweedFS and AWS enforce it).
    A server that ignores the header leaves a race between check and write; WAL names are
    written by one primary at a time, so in practice only a re-push of the same segment can
    meet it, and that has identical content.

    Besides the trailer inside the body, objects written in one piece carry their checksum and
    size as user metadata (``x-amz-meta-hk-sha256``, ``-hk-size``) for other tools (not when
    encrypted: they would tell about the plaintext); streamed
    (multipart) objects cannot, as the checksum is known only at the end.  The trailer is what
    :meth:`stat` and every read rely on.  botocore's own transfer checksums are off
    (``when_required``): several S3-compatible servers mishandle the streaming variant, and
    the SHA-256 trailer checks the content end to end anyway.
    """

    kind = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        endpoint: str | None = None,
        prefix: str = "",
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        verify: bool | str = True,
        timeout: float = 60.0,
        max_attempts: int = 3,
        part_size: int = 8 << 20,
        name: str = "s3",
        level: int = codec.DEFAULT_LEVEL,
        threads: int = 0,
        offsite: bool = False,
        key: KeySource = None,
    ) -> None:
        super().__init__(name, level=level, threads=threads, offsite=offsite, key=key)
        if part_size < 5 << 20:
            raise ValueError("part_size must be at least 5 MiB (S3's minimum)")
        self.bucket = bucket
        self.endpoint = endpoint
        self.prefix = prefix.strip("/")
        self.region = region
        self.timeout = timeout
        self.part_size = part_size
        self._access_key = access_key
        self._secret_key = secret_key
        self._verify = verify
        self._config = AioConfig(
            s3={"addressing_style": "path"},
            connect_timeout=min(5.0, timeout),
            read_timeout=timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._stack: AsyncExitStack | None = None
        self._client: S3Client | None = None
        self._lock = asyncio.Lock()

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    async def _s3(self) -> S3Client:
        async with self._lock:
            if self._client is None:
                stack = AsyncExitStack()
                self._client = await stack.enter_async_context(
                    get_session().create_client(
                        "s3",
                        endpoint_url=self.endpoint,
                        region_name=self.region,
                        aws_access_key_id=self._access_key,
                        aws_secret_access_key=self._secret_key,
                        verify=self._verify,
                        config=self._config,
                    )
                )
                self._stack = stack
            return self._client

    async def close(self) -> None:
        async with self._lock:
            if self._stack is not None:
                await self._stack.aclose()
            self._stack = None
            self._client = None

    def _error(self, e: BaseException, op: str, name: str) -> RepoError:
        if isinstance(e, ClientError):
            err: Mapping[str, Any] = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code == "NoSuchKey":
                return NotFound(self.name, name)
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return RepoUnavailable(f"{self.name}: {op} {name}: {code} ({status}): {err.get('Message', '')}")
        return RepoUnavailable(f"{self.name}: {op} {name}: {type(e).__name__}: {e}")

    _TRANSIENT = (ClientError, BotoCoreError, aiohttp.ClientError, OSError, TimeoutError)

    async def _store(self, name: str, blob: bytes, trailer: codec.Trailer, *, exclusive: bool) -> bool:
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(name),
            "Body": blob,
            "ContentType": "application/octet-stream" if self.encrypted else "application/zstd",
        }
        if not self.encrypted:  # the content's checksum and size would tell about the plaintext
            args["Metadata"] = {"hk-sha256": trailer.sha256, "hk-size": str(trailer.size)}
        if exclusive:
            args["IfNoneMatch"] = "*"
        try:
            async with asyncio.timeout(self.timeout):
                s3 = await self._s3()
                await s3.put_object(**args)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if exclusive and code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise self._error(e, "put", name) from e
        except self._TRANSIENT as e:
            raise self._error(e, "put", name) from e
        return True

    async def _store_stream(self, name: str, chunks: AsyncIterator[bytes]) -> int:
        key = self._key(name)
        ctype = "application/octet-stream" if self.encrypted else "application/zstd"
        buf = bytearray()
        size = 0
        upload_id: str | None = None
        parts: list[CompletedPartTypeDef] = []
        try:
            s3 = await self._s3()

            async def flush_part() -> None:
                nonlocal upload_id
                if upload_id is None:
                    async with asyncio.timeout(self.timeout):
                        r = await s3.create_multipart_upload(Bucket=self.bucket, Key=key, ContentType=ctype)
                    upload_id = r["UploadId"]
                number = len(parts) + 1
                async with asyncio.timeout(self.timeout):
                    r2 = await s3.upload_part(
                        Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=bytes(buf)
                    )
                parts.append({"PartNumber": number, "ETag": r2["ETag"]})
                buf.clear()

            async for chunk in chunks:
                buf += chunk
                size += len(chunk)
                if len(buf) >= self.part_size:
                    await flush_part()
            async with asyncio.timeout(self.timeout):
                if upload_id is None:
                    await s3.put_object(Bucket=self.bucket, Key=key, Body=bytes(buf), ContentType=ctype)
                else:
                    if buf:
                        await flush_part()
                    await s3.complete_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                    )
                    upload_id = None
        except self._TRANSIENT as e:
            raise self._error(e, "put", name) from e
        finally:
            if upload_id is not None:
                await self._abort(key, upload_id)
        return size

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                s3 = await self._s3()
                await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except self._TRANSIENT as e:
            log.warning("multipart_abort_failed", repo=self.name, key=key, error=str(e))

    async def _load_stream(self, name: str) -> AsyncGenerator[bytes, None]:
        try:
            async with asyncio.timeout(self.timeout):
                s3 = await self._s3()
                resp = await s3.get_object(Bucket=self.bucket, Key=self._key(name))
        except self._TRANSIENT as e:
            raise self._error(e, "get", name) from e
        body = resp["Body"]
        try:
            while True:
                try:
                    async with asyncio.timeout(self.timeout):
                        chunk = await body.read(CHUNK)
                except self._TRANSIENT as e:
                    raise self._error(e, "get", name) from e
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    async def _load_tail(self, name: str, length: int) -> tuple[bytes, int, datetime]:
        try:
            async with asyncio.timeout(self.timeout):
                s3 = await self._s3()
                resp = await s3.get_object(Bucket=self.bucket, Key=self._key(name), Range=f"bytes=-{length}")
                async with resp["Body"] as body:
                    tail = await body.read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "InvalidRange":  # an empty object
                raise CorruptObject(name, "empty object") from e
            raise self._error(e, "stat", name) from e
        except self._TRANSIENT as e:
            raise self._error(e, "stat", name) from e
        content_range = resp.get("ContentRange", "")
        total = int(content_range.rpartition("/")[2]) if "/" in content_range else len(tail)
        return tail, total, resp["LastModified"]

    async def list_objects(self, prefix: str = "") -> list[ListEntry]:
        strip = len(self._key(""))
        out: list[ListEntry] = []
        try:
            async with asyncio.timeout(self.timeout):
                s3 = await self._s3()
                pages = s3.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self._key(prefix)
                )
                async for page in pages:
                    for obj in page.get("Contents", []):
                        out.append(ListEntry(obj["Key"][strip:], obj["Size"], obj["LastModified"]))
        except self._TRANSIENT as e:
            raise self._error(e, "list", prefix) from e
        return sorted(out, key=lambda e: e.name)

    async def delete(self, name: str) -> None:
        check_name(name)
        try:
            async with asyncio.timeout(self.timeout):
                s3 = await self._s3()
                await s3.delete_object(Bucket=self.bucket, Key=self._key(name))
        except self._TRANSIENT as e:
            raise self._error(e, "delete", name) from e

    async def initialize(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                s3 = await self._s3()
                try:
                    await s3.head_bucket(Bucket=self.bucket)
                    return
                except ClientError as e:
                    if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                        raise
                if self.region == "us-east-1":
                    await s3.create_bucket(Bucket=self.bucket)
                else:
                    await s3.create_bucket(
                        Bucket=self.bucket,
                        CreateBucketConfiguration={"LocationConstraint": self.region},  # type: ignore[typeddict-item]
                    )
        except self._TRANSIENT as e:
            raise self._error(e, "create bucket", self.bucket) from e
