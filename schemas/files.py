"""Files Kiln writes through a temporary file (created 0600) get the mode the user's umask asks for."""

from __future__ import annotations

import os


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back, once, at import
    os.umask(mask)
    return mask


UMASK = _umask()


def publish_mode(fd: int) -> None:
    """Give an open temporary file the mode a plain `open()` would have (0666 less the umask), so images and
    exports can be read by whoever the user's umask allows, as any file they write."""
    os.fchmod(fd, 0o666 & ~UMASK)
