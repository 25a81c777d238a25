"""A folder on this machine as storage (schemas.storage): the embedded default."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from schemas.errors import ConfigError, StorageError
from schemas.files import publish_mode
from schemas.keys import key_problem
from schemas.settings import KilnSettings
from schemas.storage import KeyTakenError


class LocalStorage:
    """A folder on this machine; each image written atomically and once."""

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

    @classmethod
    def from_settings(cls, settings: KilnSettings) -> LocalStorage:
        """The folder KILN_STORAGE_URL names (a path, or file:///path)."""
        parsed = urlparse(settings.storage_url)
        return cls(Path(unquote(parsed.netloc + parsed.path)) if parsed.scheme == "file"
                   else Path(settings.storage_url))

    def check(self) -> None:
        """Fail at start when the folder cannot be made or written (creating nothing yet)."""
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"KILN_STORAGE_URL: cannot use {self.root}: {existing} is not a writable folder; "
                              "choose another folder with --out")

    def put(self, key: str, data: bytes, job_id: str) -> str:
        """Write atomically (readers see no file or the whole PNG, never a torn one) and once: a file of another
        job's is refused; this job's own earlier file (a crash before it was recorded) is replaced."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".part-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    publish_mode(out.fileno())
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                if not _create(tmp, path):
                    owner = _owner(path)
                    if owner != job_id:
                        raise KeyTakenError(path.as_uri(), owner)
                    os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from None
        return path.as_uri()


def _create(tmp: str, path: Path) -> bool:
    """Put `tmp` at `path` only if nothing is there (a hard link: atomic, no window for another writer); False
    when something is. Filesystems without hard links get a check first, which is as good for one writer."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        if path.exists():
            return False
        os.replace(tmp, path)
        return True


def _owner(path: Path) -> str | None:
    """The job a stored image belongs to, from its `kiln` PNG chunk; None for a file Kiln did not write."""
    try:
        with Image.open(path) as image:
            owner = json.loads(image.info.get("kiln", "{}")).get("job_id")
    except (OSError, ValueError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None
