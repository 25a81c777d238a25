"""A worker's reports and heartbeats on their way to the dispatcher. Reports go in fewer broker messages for the
same news: a `finished` report goes at once and takes along every `started` report waiting; a `started` report
waits up to `linger` seconds for that company. At one job a message the next job starts while the last one's
image uploads, so its `started` rides with the last one's `finished`: one report message a job instead of two, and
half the Celery tasks, transactions and queue top-ups on the dispatcher.

A `started` report is the dispatcher's hint that a published job is running: one that comes late, or never
(the worker switched off in the linger), is covered by the `finished` report, which starts the job when it must
(dispatcher.fleet._record), and by the heartbeats, which name the jobs in hand. Neither is a Celery task: a report
message is an entry of a Redis stream the dispatcher reads in a consumer group (schemas.messages.REPORTS_STREAM), a
heartbeat an entry of another that it reads once a tick (HEARTBEATS_STREAM)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from schemas.messages import HEARTBEATS_KEPT, HEARTBEATS_STREAM, REPORTS_STREAM, Heartbeat, Report, Reports

log = logging.getLogger("kiln.worker")
LINGER_SECONDS = 1.0  # the longest a started report waits: the dashboard shows a job running at most this late


class Outbox:
    """Reports batched for `send` (which puts a list of reports in one broker message). Thread-safe: the
    renders add `started` reports, the writer thread `finished` ones; a daemon thread of its own sends the
    `started` reports nobody took along (started when first needed, so a forked process starts its own)."""

    def __init__(self, send: Callable[[list[Report]], None], linger: float = LINGER_SECONDS) -> None:
        self._send, self.linger = send, linger
        self._waiting: list[tuple[Report, float]] = []  # with when it came (time.monotonic)
        self._due = 0.0
        self._changed = threading.Condition()
        self._sending = threading.Lock()  # reports leave in the order they were taken out of the outbox
        self._flusher: threading.Thread | None = None

    def started(self, reports: list[Report]) -> None:
        """Jobs started: told within `linger` seconds, sooner with the next finished report."""
        with self._changed:
            now = time.monotonic()
            if not self._waiting:
                self._due = now + self.linger
            self._waiting.extend((report, now) for report in reports)
            if self._flusher is None or not self._flusher.is_alive():
                self._flusher = threading.Thread(target=self._flush_forever, name="kiln-reports", daemon=True)
                self._flusher.start()
            self._changed.notify()

    def finished(self, reports: list[Report]) -> None:
        """Jobs finished: sent now, with the started reports waiting (in this thread: what sending raises, the
        caller hears)."""
        self.flush(reports)

    def flush(self, more: list[Report] | None = None) -> None:
        """Send what waits (each saying how long it was held), and `more`, now (one message; none if there is
        nothing)."""
        with self._sending:
            with self._changed:
                now = time.monotonic()
                reports = [report.model_copy(update={"held": round(now - came, 3)}) for report, came in self._waiting]
                reports += more or []
                self._waiting = []
            if reports:
                self._send(reports)

    def send_waiting(self) -> None:
        """Send the started reports waiting, now; if the broker is away, say so and drop them (the finished
        reports, or the heartbeats, tell the dispatcher later)."""
        try:
            self.flush()
        except Exception as exc:
            log.warning("started reports not sent: %s", type(exc).__name__)

    def _flush_forever(self) -> None:
        while True:
            with self._changed:
                while not self._waiting or time.monotonic() < self._due:
                    self._changed.wait(self._due - time.monotonic() if self._waiting else None)
            self.send_waiting()


def send_heartbeat(broker: redis.Redis, beat: Heartbeat) -> None:
    """Add a heartbeat to the fleet's stream of them (schemas.messages.HEARTBEATS_STREAM), trimmed to about the
    entries it keeps. Raises redis' errors."""
    broker.xadd(HEARTBEATS_STREAM, {"beat": beat.model_dump_json()}, maxlen=HEARTBEATS_KEPT, approximate=True)


def send_reports(broker: redis.Redis, reports: list[Report]) -> None:
    """Add one report message to the fleet's stream of them (schemas.messages.REPORTS_STREAM). Never trimmed: the
    dispatcher deletes each entry once it is recorded. Raises redis' errors."""
    broker.xadd(REPORTS_STREAM, {"reports": Reports(reports=reports).model_dump_json()})
