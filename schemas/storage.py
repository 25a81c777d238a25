"""Where images go: one create-once interface, its backend chosen by the URL's scheme.

    a folder, file:///path    worker.storage.LocalStorage   (the embedded default)
    s3://bucket/prefix        dispatcher.bucket.Bucket      (`kiln render` with the dispatcher's credentials)
    one signed PUT            worker.upload.SignedUpload    (a fleet worker: no credentials, one object)

The first two are found through the `kiln.storage` entry point by scheme, so neither side imports the other and
a new backend is one module and one line in pyproject.toml. Every backend writes a key once: a key that already
holds another job's image is refused (KeyTakenError), never overwritten, so an output row always describes the
object it points at.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

from schemas.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from schemas.settings import KilnSettings


class KeyTakenError(StorageError):
    """The key holds another job's image (an edited manifest row, or another batch's template)."""

    kind = "bad_input"  # the manifest's doing: trying again changes nothing

    def __init__(self, uri: str, owner: str | None) -> None:
        whose = f"the image of job {owner}" if owner else "a file Kiln did not write"
        super().__init__(f"{uri} already holds {whose}: delete it or give this manifest another output template")


class WithdrawnError(StorageError):
    """The job was withdrawn (its batch cancelled or paused) while it rendered: its image is not stored."""

    kind = "withdrawn"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was withdrawn (its batch cancelled or paused) while it rendered: not stored")


class Storage(Protocol):
    """Stores one object per key, once, and says where it is."""

    def put(self, key: str, data: bytes, job_id: str) -> str:
        """Store `data` at `key` as job `job_id`'s image and return its URI. A key holding this job's earlier
        image takes the new one (or keeps the old, where the backend cannot tell them apart: the caller checks);
        a key holding another job's image raises KeyTakenError."""
        ...

    def uri(self, key: str) -> str:
        """The URI an object at `key` has (whether or not it exists yet); the prefix's URI for ''."""
        ...

    def check(self) -> None:
        """Raise ConfigError, saying what to do, when nothing can be written here."""
        ...


def scheme(url: str) -> str:
    """The backend a storage URL names: 'file' for a plain path (a Windows drive letter included)."""
    found = urlparse(url).scheme
    return "file" if len(found) <= 1 else found


def open_storage(settings: KilnSettings) -> Storage:
    """The backend for KILN_STORAGE_URL, registered under its scheme in the `kiln.storage` entry point."""
    name = scheme(settings.storage_url)
    found = entry_points(group="kiln.storage", name=name)
    if not found:
        known = sorted(ep.name for ep in entry_points(group="kiln.storage"))
        raise ConfigError(f"KILN_STORAGE_URL: no storage for {name}:// URLs; use a folder or one of "
                          + ", ".join(f"{k}://" for k in known))
    storage: Storage = next(iter(found)).load()(settings)
    return storage
