"""Where images go, behind one small interface. The local-folder backend serves the embedded default."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from schemas.errors import StorageError
from schemas.keys import key_problem
from schemas.renderer import Storage


class LocalStorage:
    """A folder on this machine; writes are atomic (a temporary file renamed into place)."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()

    def _path(self, key: str) -> Path:
        problem = key_problem(key)
        if problem:
            raise StorageError(f"output key {key!r} {problem}")
        return self.root / key

    def uri(self, key: str) -> str:
        """A file:// URI; the folder's own URI for the empty key."""
        return self._path(key).as_uri() if key else self.root.as_uri()

    def put(self, key: str, data: bytes) -> str:
        """Write atomically: readers see the old file or the whole new one, never a torn PNG."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".part-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from None
        return path.as_uri()


def open_storage(url: str) -> Storage:
    """The storage backend for KILN_STORAGE_URL: a folder path or file:// URL."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(Path(unquote(parsed.netloc + parsed.path)))
    if parsed.scheme in ("", ) or len(parsed.scheme) == 1:  # a plain path, or a Windows drive letter
        return LocalStorage(Path(url))
    raise StorageError(f"KILN_STORAGE_URL: a worker writes {parsed.scheme}:// storage only through the "
                       "signed uploads the dispatcher hands it; here, use a folder path or file:///path")
