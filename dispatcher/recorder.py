"""Group commit: many reports recorded in one transaction.

The dispatcher's consumer threads each hand their report to one recorder thread and wait for its answer. The
recorder takes every report waiting (up to GROUP), records them in one transaction, commits once, and answers
each. When recording fails in a group, it records that group's reports one at a time instead, so that one report's
failure never costs another its record (each is a compare-and-set: recording one again is safe); a database that is
away fails the whole group, and each report's consumer tries again later, as it would alone.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("kiln.dispatcher")
GROUP = 64  # reports recorded in one transaction at most
T = TypeVar("T")


class GroupRecorder(Generic[T]):
    """Records items with `record(session, items) -> their outcomes`, as many to a transaction as are waiting."""

    def __init__(self, sessions: sessionmaker[Session], record: Callable[[Session, list[T]], list[str]],
                 away: tuple[type[Exception], ...] = (), group: int = GROUP,
                 order: Callable[[T], str] | None = None) -> None:
        """`away`: the exceptions that mean the database is away (no use recording the group's items singly).
        `order`: a group's items are recorded sorted by it (stable: items of one key keep their order), so that
        transactions that lock several rows lock them in one order, and never wait for each other in a circle."""
        self.sessions, self.record, self.away, self.group, self.order = sessions, record, away, group, order
        self.waiting: queue.SimpleQueue[tuple[T, Future[str]]] = queue.SimpleQueue()
        self.groups = self.recorded = 0  # transactions committed and items recorded in them (the tests read them)
        self._thread: threading.Thread | None = None

    def __call__(self, item: T) -> str:
        """Record `item` (waits for its group's commit); returns its outcome or raises what recording it raised."""
        return self.submit(item).result()

    def submit(self, item: T) -> Future[str]:
        """Hand `item` over for recording: the future holds its outcome, or what recording it raised."""
        if self._thread is None:
            raise RuntimeError("the recorder is not started")
        answer: Future[str] = Future()
        self.waiting.put((item, answer))
        return answer

    def start(self) -> GroupRecorder[T]:
        """Start recording on a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="kiln-recorder", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            group = [self.waiting.get()]
            while len(group) < self.group:
                try:
                    group.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            if self.order is not None:
                order = self.order
                group.sort(key=lambda entry: order(entry[0]))
            try:
                self._record(group)
            except BaseException as exc:  # never leave a consumer waiting forever
                log.exception("the recorder failed")
                for _, answer in group:
                    if not answer.done():
                        answer.set_exception(exc)

    def _record(self, group: list[tuple[T, Future[str]]]) -> None:
        try:
            with self.sessions.begin() as session:
                outcomes = self.record(session, [item for item, _ in group])
        except Exception as exc:
            if len(group) == 1 or isinstance(exc, self.away):
                for _, answer in group:
                    answer.set_exception(exc)
                return
            log.debug("a group of %d failed (%s): recording them one at a time", len(group), exc)
            for one in group:  # whichever failed fails alone; the others are recorded
                self._record([one])
            return
        self.groups += 1
        self.recorded += len(group)
        for (_, answer), outcome in zip(group, outcomes, strict=True):
            answer.set_result(outcome)
