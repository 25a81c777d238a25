"""Writing exports: CSV or JSONL, chosen by extension, written whole or not at all."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from schemas.errors import KilnError
from schemas.files import publish_mode

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def write(rows: list[dict[str, Any]], target: Path | None, stdout: IO[str]) -> None:
    """Write `rows` to `target` (atomically: a temporary file renamed into place) or to `stdout` as CSV."""
    if target is None:
        _write(rows, "csv", stdout)
        return
    fmt = FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise KilnError(f"cannot export to {target.name}: name the file .csv or .jsonl")
    with replacing(target, "w") as fh:
        _write(rows, fmt, fh)


@contextmanager
def replacing(target: Path, mode: str) -> Iterator[IO[Any]]:
    """A file object whose content replaces `target` whole when the block ends, or not at all when it fails;
    the file gets the mode the umask gives any file."""
    target = target.resolve()
    if not target.parent.is_dir():
        raise KilnError(f"cannot export to {target}: folder {target.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise KilnError(f"cannot export to {target}: {exc.strerror} in {target.parent}: choose a folder you can "
                        "write to with -o") from None
    try:
        with os.fdopen(fd, mode) if "b" in mode else os.fdopen(fd, mode, encoding="utf-8", newline="") as fh:
            publish_mode(fh.fileno())
            yield fh
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write(rows: list[dict[str, Any]], fmt: str, fh: IO[str]) -> None:
    if fmt == "jsonl":
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
