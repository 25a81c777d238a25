"""Files Kiln writes through a temporary file (created 0600) get the mode the user's umask asks for; folders it
fills (a built or pulled model) appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back, once, at import
    os.umask(mask)
    return mask


UMASK = _umask()


def publish_mode(fd: int) -> None:
    """Give an open temporary file the mode a plain `open()` would have (0666 less the umask), so images and
    exports can be read by whoever the user's umask allows, as any file they write."""
    os.fchmod(fd, 0o666 & ~UMASK)


def folder_once(target: Path, marker: str, fill: Callable[[Path], None]) -> Path:
    """`target`, filled by `fill(staging)` in a staging folder beside it and renamed into place, unless it already
    holds `marker`. A failed fill leaves nothing; when another process finished first, theirs is as good as ours."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".filling-", dir=target.parent))
    try:
        fill(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
