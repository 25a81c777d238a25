"""Output keys: the one rule for what a storage key may look like, checked by both sides."""

from __future__ import annotations

import re

MAX_KEY_BYTES = 1024  # S3's own limit
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
REFERENCES = "_references"  # the folder under the storage prefix where reference images travel, by content
MODELS = "_models"  # where `kiln models push` puts a model's files for the fleet, one folder per model
KEPT = (REFERENCES, MODELS)


def reference_key(sha256: str, suffix: str) -> str:
    """Where a reference image travels to the fleet: named by its content, so it is stored once."""
    return f"{REFERENCES}/{sha256}{suffix.lower()}"


def output_key_problem(key: str) -> str | None:
    """Like key_problem, and an output may not land among the reference images or the pushed models."""
    if key.split("/", 1)[0] in KEPT:
        return (f"is inside {key.split('/', 1)[0]}/, which Kiln keeps for reference images and models: choose "
                "another folder")
    return key_problem(key)


def key_problem(key: str) -> str | None:
    """Say why `key` could escape or break its storage prefix, or return None when it is safe.

    A key is relative, uses '/' between parts, and no part is empty, '.', '..' or holds a control character.
    """
    if not key:
        return "is empty"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"is longer than {MAX_KEY_BYTES} bytes"
    if "\\" in key:
        return "contains a backslash: use '/' between folders"
    if key.startswith("/"):
        return "is absolute: keys are relative to the storage prefix"
    if _CONTROL.search(key):
        return "contains a control character"
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "has an empty, '.' or '..' folder: keys must stay inside their prefix"
    if parts[0].endswith(":"):
        return "starts with a drive or scheme name"
    return None
