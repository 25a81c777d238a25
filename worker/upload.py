"""Signed transfers, a worker's only way into storage (it holds no credentials): the upload of its one image, and
the download of the job's reference image. Both retry what the network or the server got wrong."""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from schemas.errors import RenderError, StorageError
from schemas.messages import Upload

RETRYABLE = {408, 429, 500, 502, 503, 504}
MAX_PAUSE = 20.0
Sleep = Callable[[float], None]
Clock = Callable[[], float]


def _send(request: urllib.request.Request, what: str, timeout: float, budget: float, sleep: Sleep, clock: Clock,
          accept: frozenset[int] = frozenset()) -> bytes:
    """The answer's body, trying again with backoff for up to `budget` seconds; a status in `accept` counts as
    success (with an empty body). Never says the URL: it is a credential."""
    deadline = clock() + budget
    tries, problem = 0, "no attempt made"
    while True:
        tries += 1
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return bytes(answer.read())
        except urllib.error.HTTPError as exc:
            if exc.code in accept:
                return b""
            problem = f"HTTP {exc.code}"
            if exc.code not in RETRYABLE:
                raise StorageError(f"could not {what}: refused ({problem}); the signed URL may have expired",
                                   exc.code) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            problem = type(getattr(exc, "reason", exc)).__name__
        pause = min(2.0 ** (tries - 1), MAX_PAUSE)
        if clock() + pause > deadline:
            raise StorageError(f"could not {what}: {tries} tries in {budget:g} s failed (last: {problem})")
        sleep(pause)


class SignedUpload:
    """A Storage for exactly one object: PUT once, retry for up to `budget` seconds (a rendered image is worth
    waiting for: rendering it again costs GPU time)."""

    def __init__(self, upload: Upload, timeout: float = 30.0, budget: float = 300.0,
                 sleep: Sleep = time.sleep, clock: Clock = time.monotonic) -> None:
        self.upload, self.timeout, self.budget, self.sleep, self.clock = upload, timeout, budget, sleep, clock

    def uri(self, key: str) -> str:
        """The object's s3:// URI."""
        return self.upload.uri

    def check(self) -> None:
        """Nothing to check before the PUT: the signature is the dispatcher's."""

    def put(self, key: str, data: bytes, job_id: str) -> str:
        """PUT the bytes with Content-MD5 (the server verifies them) and the job's id in signed headers. 412 means
        the key holds an object already: an earlier attempt's or try's image of this job, which stands, or
        another job's. The dispatcher checks which before recording anything."""
        headers = {**self.upload.headers, "Content-MD5": base64.b64encode(hashlib.md5(data).digest()).decode()}
        request = urllib.request.Request(self.upload.url, data=data, headers=headers, method="PUT")
        _send(request, f"upload {self.upload.uri}", self.timeout, self.budget, self.sleep, self.clock,
              accept=frozenset({412}))
        return self.upload.uri


def fetch_reference(url: str, sha256: str, suffix: str, cache: Path, timeout: float = 30.0, budget: float = 300.0,
                    sleep: Sleep = time.sleep, clock: Clock = time.monotonic,
                    what: str = "the reference image") -> Path:
    """A file the job refers to (`what`: a reference image, a LoRA) on this machine: fetched once through its signed
    GET into `cache`, named and checked by its content. A file missing from the bucket is the submission's fault
    (RenderError "bad_input"); one that arrives other than it was submitted, or not at all, is worth another try
    ("error")."""
    path = cache / f"{sha256}{suffix.lower()}"
    if path.is_file():
        return path
    try:
        data = _send(urllib.request.Request(url), f"fetch {what}", timeout, budget, sleep, clock)
    except StorageError as exc:
        if exc.status in (403, 404):
            raise RenderError(f"{what} is not in the bucket: submit the batch again with "
                              "KILN_STORAGE_URL=s3://... set, so that its references are uploaded", "bad_input") \
                from None
        raise RenderError(str(exc), "error") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RenderError(f"{what} fetched from the bucket is not the one submitted (its SHA-256 "
                          "differs)", "error")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=cache)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)
    return path
