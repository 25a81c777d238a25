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


class SignedUpload:
    """A Storage for exactly one object: PUT once, retry what the network or the server got wrong."""

    def __init__(self, upload: Upload, tries: int = 5, timeout: float = 60.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.upload, self.tries, self.timeout, self.sleep = upload, tries, timeout, sleep

    def uri(self, key: str) -> str:
        """The object's s3:// URI."""
        return self.upload.uri

    def put(self, key: str, data: bytes) -> str:
        """PUT the bytes with Content-MD5 (the server verifies them). 412 means an earlier attempt of this job
        already stored its image, which stands: the dispatcher checks which one it recorded."""
        headers = {**self.upload.headers, "Content-MD5": base64.b64encode(hashlib.md5(data).digest()).decode()}
        problem = "no attempt made"
        for attempt in range(self.tries):
            if attempt:
                self.sleep(min(2.0 ** attempt, 20.0))
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
        raise StorageError(f"could not upload {self.upload.uri} after {self.tries} tries ({problem})")
