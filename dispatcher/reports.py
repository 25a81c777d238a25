"""Report messages, read from the workers' Redis stream (schemas.messages.REPORTS_STREAM) in a consumer group.

A dispatcher process reads as one consumer of REPORTS_GROUP: XREADGROUP hands it up to a read's worth of entries no
one was handed yet, in one command. An entry then stays pending (on the group's list of entries handed out and not
acknowledged) until its reports are recorded, and is then acknowledged and deleted in one transaction. An entry
whose reports could not be recorded yet (storage could not answer, the database was away), or whose reader died
with it (a dispatcher killed or switched off), is pending and goes idle: every `retry_seconds` the pending entries
idle that long are claimed and read again, save those this process has in hand. Recording is a compare-and-set, so
an entry recorded twice (a dispatcher killed between its commit and its acknowledgement) changes nothing the second
time. An entry read `retries` times and never recorded is dropped, saying so; its jobs are then given back by the
reaper, as a lost report's are.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from pydantic import ValidationError

from dispatcher.bucket import StoredObject
from dispatcher.fleet import Uploads
from schemas.errors import ConfigError, StaleStateError, StorageError
from schemas.messages import LEGACY_QUEUES, REPORTS_GROUP, REPORTS_STREAM, Report, reports_in

log = logging.getLogger("kiln.dispatcher")
PENDING_PAGE = 1000  # pending entries looked at per claim
OLDEST_REDIS = (6, 2)  # XPENDING's IDLE filter; the workers' ACL selector (README) needs Redis 7


def check_broker(broker: redis.Redis) -> None:
    """Refuse a Redis too old for the reports stream, saying what to do. Raises redis' errors when it cannot ask."""
    found: Any = broker.info("server")
    version = str(found.get("redis_version", "0"))
    if tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) < OLDEST_REDIS:
        raise ConfigError(f"KILN_BROKER_URL: this Redis is version {version}; Kiln needs Redis "
                          f"{'.'.join(map(str, OLDEST_REDIS))} or later (7 or later for the workers' account rules "
                          "in the README): upgrade it, e.g. the redis:7 image of compose.yaml")


@dataclass(frozen=True)
class Entry:
    """One report message: its stream entry id and its reports (none when it is malformed, with why)."""

    id: str
    reports: list[Report] = field(default_factory=list)
    problem: str | None = None


class ReportStream:
    """This process's reading of the reports stream. Thread-safe: several readers may share it."""

    def __init__(self, broker: redis.Redis, consumer: str, retry_seconds: float, retries: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`consumer`: this process's name in the group. `retries`: how many times an entry is read at most."""
        self.broker, self.consumer, self.clock = broker, consumer, clock
        self.retry_seconds, self.retries = retry_seconds, retries
        self._in_hand: set[str] = set()  # entries read and not yet recorded or given up on, by this process
        self._lock = threading.Lock()
        self._claim_at = 0.0  # the first read claims what a dispatcher before this one held

    def join(self) -> None:
        """Make the stream and the group if they are not there (a new broker, or one that lost them in a restart
        without persistence); a new group reads the stream from its start. Raises redis' errors."""
        try:
            self.broker.xgroup_create(REPORTS_STREAM, REPORTS_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, count: int, block_ms: int) -> list[Entry]:
        """Up to `count` entries to record: pending ones due again first, else new ones, waiting up to `block_ms`
        for them. Each is this process's until `done` or `again`. Raises redis' errors."""
        try:
            due = self._claim(count)
            if due:
                return due
            found: Any = self.broker.xreadgroup(REPORTS_GROUP, self.consumer, {REPORTS_STREAM: ">"}, count=count,
                                                block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.join()  # the broker lost the stream: what it held is gone, and the reaper gives those jobs back
            return []
        return self._take(found[0][1] if found else [])  # RESP2: [[name, entries]], or nothing

    def done(self, ids: list[str]) -> None:
        """These entries are recorded (or dropped): acknowledged and deleted. Raises redis' errors (the entries are
        then read again later, and recorded again as no change)."""
        if not ids:
            return
        try:
            pipe = self.broker.pipeline(transaction=True)
            pipe.xack(REPORTS_STREAM, REPORTS_GROUP, *ids)
            pipe.xdel(REPORTS_STREAM, *ids)
            pipe.execute()
        finally:
            self.again(ids)

    def again(self, ids: list[str]) -> None:
        """These entries could not be recorded yet: read again in `retry_seconds` or so."""
        with self._lock:
            self._in_hand.difference_update(ids)

    def _claim(self, count: int) -> list[Entry]:
        """The pending entries idle for `retry_seconds` (a failed try's, a dead reader's), claimed by this process:
        looked for once every `retry_seconds`, by one reader, and while more are due than one read takes, at every
        read (after an outage, thousands may be due at once)."""
        with self._lock:
            if self.clock() < self._claim_at:
                return []
            self._claim_at = self.clock() + self.retry_seconds
            in_hand = set(self._in_hand)
        idle_ms = int(self.retry_seconds * 1000)
        due: list[str] = []
        spent: list[str] = []
        pending: Any
        for pending in self.broker.xpending_range(REPORTS_STREAM, REPORTS_GROUP, "-", "+", PENDING_PAGE,
                                                  idle=idle_ms):
            entry_id = _text(pending["message_id"])
            if entry_id not in in_hand:
                (spent if int(pending["times_delivered"]) >= self.retries else due).append(entry_id)
        if spent:
            log.error("dropped %d report message%s that could not be recorded in %d tries (%s): their jobs are given "
                      "back when their workers' time is up", len(spent), "s" * (len(spent) > 1), self.retries,
                      ", ".join(spent[:5]))
            self.done(spent)
        if not due:
            return []
        if len(due) > count:
            with self._lock:
                self._claim_at = 0.0
        ids: list[Any] = due[:count]
        claimed: Any = self.broker.xclaim(REPORTS_STREAM, REPORTS_GROUP, self.consumer, idle_ms, ids)
        return self._take(claimed)

    def _take(self, raw: list[tuple[Any, Any]]) -> list[Entry]:
        entries = []
        for entry_id, fields in raw:
            entry = _text(entry_id)
            try:
                entries.append(Entry(entry, reports_in(json.loads(fields[b"reports"]))))
            except (TypeError, KeyError, ValueError, ValidationError) as exc:  # fields None: deleted meanwhile
                why = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else f"{type(exc).__name__}"
                entries.append(Entry(entry, problem=why))
        with self._lock:
            self._in_hand.update(entry.id for entry in entries)
        return entries


def record(entries: list[Entry], check: Callable[[list[Report]], Uploads],
           submit: Callable[[Report, StoredObject | None], Future[str]],
           away: tuple[type[Exception], ...]) -> tuple[list[str], dict[str, Exception]]:
    """Record a read's report messages: their uploads checked at once (`check`: what the bucket holds for each
    finished report's job, or the StorageError that kept it from saying; dispatcher.fleet.check_uploads), their
    reports handed to `submit` (the recorder's group commit: they may share a transaction) and their outcomes
    logged. A message is recorded when all its reports are (or it is malformed: said, and dropped); one whose
    upload storage could not check, or whose recording met storage or a database that is away (`away`), is
    recorded later, in full. Returns the ids of the messages recorded, and why each of the others waits."""
    recorded = []
    for entry in entries:
        if entry.problem:
            log.error("dropped a malformed report message (stream entry %s): %s", entry.id, entry.problem)
            recorded.append(entry.id)
    entries = [entry for entry in entries if not entry.problem]
    waits: tuple[type[Exception], ...] = (StorageError, *away)  # what a message is recorded later for
    later: dict[str, Exception] = {}
    try:
        stored = check([report for entry in entries for report in entry.reports])
    except away as exc:
        stored, later = {}, {entry.id: exc for entry in entries}
    answers: dict[str, list[Future[str]]] = {}
    for entry in entries:
        found = [stored.get((report.job_id, report.attempt)) for report in entry.reports]
        problem = next((answer for answer in found if isinstance(answer, StorageError)), None)
        if problem is not None:
            later[entry.id] = problem
        elif entry.id not in later:
            answers[entry.id] = [submit(report, cast(StoredObject | None, answer))
                                 for report, answer in zip(entry.reports, found, strict=True)]
    for entry in entries:
        if entry.id not in answers:
            continue
        for report, answer in zip(entry.reports, answers[entry.id], strict=True):
            try:
                outcome = answer.result()
            except StaleStateError as exc:  # lost a race with the reaper: the job is someone else's now
                outcome = f"stale ({exc})"
            except waits as exc:
                later.setdefault(entry.id, exc)
                continue
            except Exception:  # a report Kiln cannot record, whatever is tried: said, and not tried again
                log.exception("job %s attempt %d: the report cannot be recorded", report.job_id, report.attempt)
                continue
            log.info("job %s attempt %d on %s: %s", report.job_id, report.attempt, report.worker, outcome)
        if entry.id not in later:
            recorded.append(entry.id)
    return recorded, later


class LegacyQueues:
    """The broker queues Kiln before protocol 5 sent reports and heartbeats to, as Celery tasks. Nothing reads them:
    a worker of that Kiln refuses this dispatcher's render messages (and says why), but what it sent meanwhile would
    pile up. `clear` says so and deletes it, at most once every `every` seconds."""

    def __init__(self, broker: redis.Redis, every: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.broker, self.every, self.clock = broker, every, clock
        self._at = 0.0

    def clear(self) -> int:
        """How many old messages were found (and deleted). Raises redis' errors."""
        if self.clock() < self._at:
            return 0
        self._at = self.clock() + self.every
        pipe = self.broker.pipeline(transaction=True)
        for queue in LEGACY_QUEUES:
            pipe.llen(queue)
        pipe.delete(*LEGACY_QUEUES)
        found = sum(pipe.execute()[:len(LEGACY_QUEUES)])
        if found:
            log.warning("deleted %d messages that workers of an older Kiln (message protocol 4 or before) sent to %s: "
                        "install the same Kiln version on the dispatcher and every worker (`kiln workers` names them)",
                        found, " and ".join(LEGACY_QUEUES))
        return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
