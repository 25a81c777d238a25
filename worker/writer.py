"""The writer: encodes and stores finished images on a thread of its own while the device renders the next jobs,
so the GPU does not wait for PNG encoding and uploads. One hand-off waits at most: giving it the next batch waits
until the previous one is stored, which bounds the images held in memory and keeps results in order."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")


class Writer:
    """A one-deep pipeline stage behind the renders."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-writer")
        self._pending: Future[object] | None = None
        self._lock = threading.Lock()

    def submit(self, work: Callable[[], T]) -> Future[T]:
        """Run `work` on the writer thread once the previous hand-off is done (waiting for it here)."""
        with self._lock:
            if self._pending is not None:
                wait([self._pending])  # its outcome is its submitter's to read
            future = self._pool.submit(work)
            self._pending = future  # type: ignore[assignment]
            return future

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for what was handed over to be stored; False if it is still going after `timeout` seconds."""
        pending = self._pending
        return pending is None or bool(wait([pending], timeout).done)
