"""A batch's stored images, read back for people to look at: the contact sheet and the dashboard's gallery. An
image is in the local folder its file:// URI names, or in the fleet's bucket under its output key."""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from dispatcher.bucket import Bucket
from schemas.settings import KilnSettings
from schemas.storage import scheme

THUMB = 256  # pixels on a thumbnail's longer side


class StoredImages:
    """Finds the images a batch made, through the storage the settings name."""

    def __init__(self, settings: KilnSettings) -> None:
        self.bucket = Bucket.from_settings(settings) if scheme(settings.storage_url) == "s3" else None

    def path(self, uri: str) -> Path | None:
        """The local file of a file:// URI (None for an object in a bucket)."""
        return Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else None

    def read(self, uri: str, key: str) -> bytes | None:
        """An image's bytes, or None when it is gone (or in a bucket this process was not given)."""
        path = self.path(uri)
        if path is not None:
            try:
                return path.read_bytes()
            except OSError:
                return None
        return self.bucket.get(key) if self.bucket is not None and uri.startswith("s3://") else None

    def link(self, uri: str, key: str, seconds: int = 3600) -> str | None:
        """A signed download link for an image in the bucket (None for a local file)."""
        return self.bucket.download_url(key, seconds) if self.bucket is not None and uri.startswith("s3://") else None


def thumbnail(data: bytes | None, size: int = THUMB) -> Image.Image | None:
    """An RGB thumbnail of image bytes, or None when they are missing or not an image."""
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            small = image.convert("RGB")
            small.thumbnail((size, size))
            return small
    except (OSError, UnidentifiedImageError):
        return None


def jpeg(image: Image.Image, quality: int = 82) -> bytes:
    """An image as JPEG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
