"""Pulling a model from the fleet's bucket: the files `kiln models push` put there, through the signed links of the
sheet the dispatcher keeps in Redis (workers hold no storage keys), each checked by size and SHA-256, and the
folder put in place only whole."""

from __future__ import annotations

import hashlib
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

from schemas.errors import ModelError
from schemas.files import folder_once
from schemas.keys import key_problem
from schemas.messages import ModelFile, ModelSheet
from schemas.models import pulled_path

log = logging.getLogger("kiln.worker")
CHUNK = 1 << 22
TRIES = 3


def pull_model(sheet: ModelSheet, cache_dir: Path, timeout: float = 60.0) -> Path:
    """The model's folder in this machine's cache, downloaded from the bucket when it is not there yet. A file that
    does not arrive as it was pushed fails the pull (ModelError) and leaves nothing behind."""
    def fill(staging: Path) -> None:
        size = sum(f.size for f in sheet.files)
        log.info("pulling %s from the fleet's bucket: %d files, %.2f GB", sheet.model, len(sheet.files), size / 1e9)
        started = time.monotonic()
        for file in sheet.files:
            problem = key_problem(file.path)
            if problem:
                raise ModelError(f"the sheet of {sheet.model} names a file {file.path!r} that {problem}")
            _fetch(file, staging / file.path, sheet.model, timeout)
        if not (staging / "model_index.json").is_file():
            raise ModelError(f"what was pushed as {sheet.model} has no model_index.json: push a diffusers folder")
        log.info("pulled %s in %.0f s", sheet.model, time.monotonic() - started)
    return folder_once(pulled_path(cache_dir, sheet.model), "model_index.json", fill)


def _fetch(file: ModelFile, dest: Path, model: str, timeout: float) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    problem = "no attempt made"
    for attempt in range(TRIES):
        digest, got = hashlib.sha256(), 0
        try:
            with urllib.request.urlopen(file.url, timeout=timeout) as answer, dest.open("wb") as out:
                while chunk := answer.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    got += len(chunk)
        except urllib.error.HTTPError as exc:  # never say the URL: it is a credential
            problem = f"HTTP {exc.code}"
            if exc.code in (403, 404):
                raise ModelError(f"{file.path} of {model} is not in the bucket or its link expired ({problem}): "
                                 f"push it again with `kiln models push {model}`") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            problem = type(getattr(exc, "reason", exc)).__name__
        else:
            if got == file.size and digest.hexdigest() == file.sha256:
                return
            problem = (f"{got} bytes with SHA-256 {digest.hexdigest()[:12]}..., not {file.size} with "
                       f"{file.sha256[:12]}...")
        time.sleep(min(2.0 ** attempt, 10.0))
    raise ModelError(f"{file.path} of {model} did not arrive as it was pushed ({TRIES} tries; last: {problem}): "
                     f"push it again with `kiln models push {model}`")
