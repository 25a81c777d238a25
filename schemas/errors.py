"""Kiln's errors: one root, so the CLI can print any of them as one line without a traceback.

    KilnError
    ├── ConfigError      a KILN_* setting or option is wrong
    ├── ManifestError    a manifest cannot become a batch (lists every problem found)
    ├── ModelError       a model is unknown, unlicensed for this use, or its weights are missing
    ├── RenderError      one job could not be rendered (recorded on the job; the batch goes on)
    ├── StorageError     an output could not be written
    │   ├── KeyTakenError    its key holds another job's image (schemas.storage)
    │   └── WithdrawnError   its job was cancelled or paused while it rendered (schemas.storage)
    └── StaleStateError  a status change lost its compare-and-set (a late or duplicate writer)
"""

from __future__ import annotations

from dataclasses import dataclass


def first_line(exc: BaseException) -> str:
    """An error's first line, without the rest of a long library message."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


class KilnError(Exception):
    """Root of every error Kiln raises on purpose; its message says what to do."""


class ConfigError(KilnError):
    """A setting (environment variable or option) has an illegal value."""


class ModelError(KilnError):
    """A model cannot be used: unknown name, licence not declared, or weights not available."""

    kind = "worker"  # met while rendering, it is the worker's fault: submit checked the model (dispatcher.lifecycle)


class StorageError(KilnError):
    """An output could not be stored, or a stored object reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status that refused the request, when one did


class StaleStateError(KilnError):
    """A compare-and-set on a job's status matched no row: someone else moved the job first."""


class RenderError(KilnError):
    """One job failed to render; `kind` tells the scheduler whether trying again can help."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind  # "oom", "nan", "bad_input", "worker" or "error" (dispatcher.lifecycle)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, located as precisely as the format allows."""

    where: str  # "catalog.csv line 14", "catalog.json items[3]"
    message: str  # 'column "steps": must be a whole number from 1 to 100, got 0'

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ManifestError(KilnError):
    """A manifest was rejected; nothing was written. Carries every problem found, in file order."""

    SHOWN = 20

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        shown = "\n".join(str(p) for p in problems[: self.SHOWN])
        more = len(problems) - self.SHOWN
        if more > 0:
            shown += f"\n... and {more} more problems"
        super().__init__(shown)
