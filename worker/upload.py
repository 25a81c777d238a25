"""Uploading through a signed URL: the worker's only way into storage. It holds no credentials."""

from __future__ import annotations

import base64
import hashlib
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from schemas.errors import StorageError
from schemas.messages import Upload

RETRYABLE = {408, 429, 500, 502, 503, 504}
MAX_PAUSE = 20.0


class SignedUpload:
    """A Storage for exactly one object: PUT once, retry what the network or the server got wrong for up to
    `budget` seconds (a rendered image is worth waiting for: rendering it again costs GPU time)."""

    def __init__(self, upload: Upload, timeout: float = 30.0, budget: float = 300.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
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
        deadline = self.clock() + self.budget
        tries, problem = 0, "no attempt made"
        while True:
            tries += 1
            request = urllib.request.Request(self.upload.url, data=data, headers=headers, method="PUT")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout):
                    return self.upload.uri
            except urllib.error.HTTPError as exc:
                if exc.code == 412:
                    return self.upload.uri
                problem = f"HTTP {exc.code}"  # never the URL: it is a credential
                if exc.code not in RETRYABLE:
                    raise StorageError(f"the upload of {self.upload.uri} was refused ({problem}); "
                                       "the signed URL may have expired") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                problem = type(getattr(exc, "reason", exc)).__name__
            pause = min(2.0 ** (tries - 1), MAX_PAUSE)
            if self.clock() + pause > deadline:
                raise StorageError(f"could not upload {self.upload.uri}: {tries} tries in {self.budget:g} s "
                                   f"failed (last: {problem})")
            self.sleep(pause)
