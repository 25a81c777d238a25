"""S3-compatible storage on the dispatcher's side: the only holder of storage credentials.

Workers get a signed, create-once PUT per job (If-None-Match: *), so a late upload from a timed-out attempt
cannot replace a good image; the dispatcher then checks the object before recording it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import mimetypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from schemas.capacity import model_key
from schemas.errors import ConfigError, StorageError
from schemas.job import JobSpec
from schemas.keys import MODELS, key_problem, reference_key
from schemas.messages import ModelFile, ModelSheet, Upload
from schemas.params import content_type
from schemas.settings import KilnSettings
from schemas.storage import KeyTakenError

log = logging.getLogger("kiln.dispatcher")
JOB_META = "kiln-job"
UPLOAD_SECONDS = 24 * 3600  # a signed PUT outlives any wait in a bounded queue
MODEL_LISTING = "kiln-files.json"  # in a pushed model's folder: its files, sizes and SHA-256s, written last


@dataclass(frozen=True)
class StoredObject:
    """What the bucket says about one object."""

    md5: str  # the ETag of a single-part PUT
    size: int
    job_id: str | None


class Bucket:
    """One bucket and key prefix, reached with the usual AWS_* credentials."""

    def __init__(self, storage_url: str, endpoint_url: str | None = None, timeout: float = 30.0,
                 connections: int = 10) -> None:
        parsed = urlparse(storage_url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(f"KILN_STORAGE_URL: {storage_url!r} is not s3://bucket/prefix")
        self.name = parsed.netloc
        self.prefix = parsed.path.strip("/")
        config = Config(
            signature_version="s3v4",
            # MinIO and most S3-compatible services want path-style addressing.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # boto3 1.36+ adds checksums that MinIO and R2 reject; we verify with Content-MD5 and the ETag.
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
            # 500/503 bursts, throttling and stalls past the read timeout are retried with jittered backoff.
            retries={"total_max_attempts": 5, "mode": "standard"}, connect_timeout=min(timeout, 5),
            # One connection for each thread that may call at once (the dispatcher's report consumers check uploads
            # side by side); past the pool, each call would open a connection of its own and throw it away.
            read_timeout=timeout, max_pool_connections=connections)
        # A session of its own: credentials come from the environment now, not from whatever boto3's default
        # session cached earlier in the process.
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)
        # One quick question, no retries: is the bucket there right now? (the dispatcher holds work while not)
        self.probe = session.client("s3", endpoint_url=endpoint_url, config=config.merge(Config(
            retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=min(timeout, 5))))

    def key(self, output_key: str) -> str:
        """The full object key of an output key."""
        problem = key_problem(output_key)
        if problem:
            raise StorageError(f"output key {output_key!r} {problem}")
        return f"{self.prefix}/{output_key}" if self.prefix else output_key

    def uri(self, output_key: str) -> str:
        """s3://bucket/key; the prefix's URI for ''."""
        if not output_key:
            return f"s3://{self.name}/{self.prefix}"
        return f"s3://{self.name}/{self.key(output_key)}"

    def check(self) -> None:
        """Fail at start, with what to do, when the bucket cannot be reached or read."""
        try:
            self._look(self.client)
        except (ClientError, BotoCoreError) as exc:
            raise ConfigError(f"KILN_STORAGE_URL: cannot reach bucket {self.name!r} ({_reason(exc)}): check "
                              "KILN_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, and that the key "
                              f"may list {self.uri('')}/ (s3:ListBucket on the prefix)") from None

    def reachable(self) -> str | None:
        """None when the bucket answers now; else why not, in a few words."""
        try:
            self._look(self.probe)
        except (ClientError, BotoCoreError) as exc:
            return _reason(exc)
        return None

    def _look(self, client: Any) -> None:
        # A one-key listing under the prefix, not HeadBucket: it needs only s3:ListBucket limited to the prefix
        # (README, least privilege), where HeadBucket would need the whole bucket.
        client.list_objects_v2(Bucket=self.name, Prefix=f"{self.prefix}/" if self.prefix else "", MaxKeys=1)

    def upload_for(self, job_id: str, output_key: str) -> Upload:
        """A signed create-once PUT for one job's output."""
        kind = content_type(output_key)
        headers = {"If-None-Match": "*", f"x-amz-meta-{JOB_META}": job_id, "Content-Type": kind}
        url = self.client.generate_presigned_url(
            "put_object", ExpiresIn=UPLOAD_SECONDS,
            Params={"Bucket": self.name, "Key": self.key(output_key), "IfNoneMatch": "*",
                    "Metadata": {JOB_META: job_id}, "ContentType": kind})
        return Upload(url=url, headers=headers, uri=self.uri(output_key))

    def stat(self, output_key: str) -> StoredObject | None:
        """The object at an output key, or None."""
        try:
            head = self.client.head_object(Bucket=self.name, Key=self.key(output_key))
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise StorageError(f"cannot check {self.uri(output_key)}: {_reason(exc)}") from None
        except BotoCoreError as exc:  # no connection, or no answer within the read timeout, after retries
            raise StorageError(f"cannot check {self.uri(output_key)}: {_reason(exc)}") from None
        return StoredObject(md5=head["ETag"].strip('"'), size=head["ContentLength"],
                            job_id=head.get("Metadata", {}).get(JOB_META))

    def get(self, output_key: str) -> bytes | None:
        """The bytes of the object at an output key, or None when it is not there."""
        try:
            return bytes(self.client.get_object(Bucket=self.name, Key=self.key(output_key))["Body"].read())
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise StorageError(f"cannot read {self.uri(output_key)}: {_reason(exc)}") from None
        except BotoCoreError as exc:
            raise StorageError(f"cannot read {self.uri(output_key)}: {_reason(exc)}") from None

    @classmethod
    def from_settings(cls, settings: KilnSettings, connections: int = 10) -> Bucket:
        """The bucket KILN_STORAGE_URL names, through KILN_S3_ENDPOINT_URL, for `connections` threads at once."""
        return cls(settings.storage_url, settings.s3_endpoint_url, settings.storage_timeout_seconds, connections)

    def put(self, key: str, data: bytes, job_id: str, kind: str | None = None) -> str:
        """Write with the dispatcher's own credentials (the embedded `kiln render` to S3), MD5-verified and once:
        created only where nothing is; over this job's own earlier image, replaced; another job's is refused."""
        body = {"Bucket": self.name, "Key": self.key(key), "Body": data, "ContentType": kind or content_type(key),
                "ContentMD5": base64.b64encode(hashlib.md5(data).digest()).decode(), "Metadata": {JOB_META: job_id}}
        try:
            try:
                self.client.put_object(IfNoneMatch="*", **body)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "PreconditionFailed":
                    raise
                owner = (self.stat(key) or StoredObject("", 0, None)).job_id
                if owner != job_id:
                    raise KeyTakenError(self.uri(key), owner) from None
                self.client.put_object(**body)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot write {self.uri(key)}: {_reason(exc)}") from None
        return self.uri(key)

    def put_reference(self, path: Path, sha256: str) -> str:
        """Upload a file jobs refer to (a reference image, a LoRA) once, named by its content, so that workers on
        other PCs can fetch it."""
        key = reference_key(sha256, path.suffix)
        if self.stat(key) is None:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise StorageError(f"cannot read the reference {path}: {exc.strerror}") from None
            self.put(key, data, sha256, mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        return self.uri(key)

    def reference_urls(self, job: JobSpec) -> list[str]:
        """A signed GET of each of a job's reference images (uploaded at submit), in order."""
        return [self._file_url(f.sha256, f.path) for f in job.params.reference_files]

    def lora_urls(self, job: JobSpec) -> list[str]:
        """A signed GET of each of a job's LoRAs (uploaded at submit), in order."""
        return [self._file_url(lora.sha256, lora.path) for lora in job.params.loras]

    def _file_url(self, sha256: str, path: str) -> str:
        return self.download_url(reference_key(sha256, Path(path).suffix), UPLOAD_SECONDS)

    def push_model(self, name: str, folder: Path, said: Callable[[str, int, bool], None]) -> ModelSheet:
        """Upload every file of a model's folder under _models/ (hidden files aside), each checked by SHA-256 and
        skipped when the bucket has it already (so a push that broke off resumes), then its listing, last: a
        half-pushed model is never offered to workers. `said(path, size, uploaded)` after each file."""
        prefix = f"{MODELS}/{model_key(name)}"
        files = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(folder).parts)):
            relative, size = path.relative_to(folder).as_posix(), path.stat().st_size
            with path.open("rb") as data:
                sha256 = hashlib.file_digest(data, "sha256").hexdigest()
            key = f"{prefix}/{relative}"
            there = self.stat(key)
            upload = there is None or there.size != size or there.job_id != sha256
            if upload:
                try:  # boto3's managed transfer: multipart, in parallel, for files of many GB
                    self.client.upload_file(str(path), self.name, self.key(key), ExtraArgs={
                        "Metadata": {JOB_META: sha256}, "ContentType": "application/octet-stream"})
                except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
                    raise StorageError(f"cannot upload {path} to {self.uri(key)} ({_reason(exc)}): push again when "
                                       "the bucket answers; files already there are skipped") from None
            files.append(ModelFile(path=relative, size=size, sha256=sha256))
            said(relative, size, upload)
        sheet = ModelSheet(model=name, files=files)
        self.put(f"{prefix}/{MODEL_LISTING}", sheet.model_dump_json().encode(), name, "application/json")
        return sheet

    def pushed_models(self) -> list[ModelSheet]:
        """Every model pushed to this bucket, as its listing says (files without URLs)."""
        sheets = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=self.key(MODELS) + "/", Delimiter="/")
            folders = [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])]
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot list {self.uri(MODELS)}/: {_reason(exc)}") from None
        for folder in folders:
            where = f"{MODELS}/{folder.rstrip('/').rsplit('/', 1)[-1]}/{MODEL_LISTING}"
            listing = self.get(where)
            try:
                if listing is not None:
                    sheets.append(ModelSheet.model_validate_json(listing))
            except ValidationError:
                log.warning("%s is not a listing Kiln wrote: push that model again", self.uri(where))
        return sheets

    def signed_sheet(self, sheet: ModelSheet, seconds: int) -> ModelSheet:
        """The sheet with a signed GET of each file, valid for `seconds`."""
        prefix = f"{MODELS}/{model_key(sheet.model)}"
        return sheet.model_copy(update={"files": [
            f.model_copy(update={"url": self.download_url(f"{prefix}/{f.path}", seconds)}) for f in sheet.files]})

    def fetch_uri(self, uri: str, folder: Path) -> Path:
        """An object a manifest names by URI (s3://bucket/key: this bucket or another the keys may read), as a
        local file in `folder`, downloaded once per version of the object (its ETag)."""
        parsed = urlparse(uri)
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        try:
            etag = self.client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        except ClientError as exc:
            if _not_found(exc):
                raise StorageError(f"{uri} does not exist") from None
            raise StorageError(f"cannot read {uri}: {_reason(exc)}") from None
        except BotoCoreError as exc:
            raise StorageError(f"cannot read {uri}: {_reason(exc)}") from None
        name = hashlib.sha256(f"{uri}#{etag}".encode()).hexdigest()[:32] + Path(key).suffix.lower()
        path = folder / name
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            try:  # s3transfer downloads to a temporary name and renames it when whole
                self.client.download_file(bucket, key, str(path))
            except (ClientError, BotoCoreError) as exc:
                raise StorageError(f"cannot download {uri}: {_reason(exc)}") from None
        return path

    def download_url(self, output_key: str, seconds: int) -> str:
        """A signed GET link, for exports that ask for one."""
        return str(self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.name, "Key": self.key(output_key)}, ExpiresIn=seconds))


def _not_found(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def _reason(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')} {error.get('Message', '')}".strip()
    return type(exc).__name__
