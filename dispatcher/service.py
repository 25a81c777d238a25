"""`kiln dispatcher`: the fleet's coordinator. Feeds render queues from the database (publishing Celery tasks the
workers consume), records the reports and heartbeats workers add to their Redis streams, and gives back the jobs of
workers that went silent."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import redis
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import fleet, reports, store, usecases, webhooks
from dispatcher.bucket import Bucket, StoredObject
from dispatcher.fleet import REPORT_RETRIES, REPORT_RETRY_SECONDS
from dispatcher.heartbeats import HeartbeatStream
from dispatcher.recorder import GroupRecorder
from dispatcher.reports import Entry, LegacyQueues, ReportStream
from schemas.broker import make_app
from schemas.errors import ConfigError, StorageError
from schemas.messages import RENDER_TASK, REPORTS_STREAM, Report, waiting_key
from schemas.settings import KilnSettings

log = logging.getLogger("kiln.dispatcher")
TICK_SECONDS = 1.0
FEED_GAP_SECONDS = 0.05  # between two top-ups of the queues that reports asked for
STORAGE_DOWN_AFTER = 3  # failed probes in a row (one a tick) before publishing stops
SHEETS_EVERY_SECONDS = 600.0  # how often the signed sheets of pushed models are renewed (usecases.share_models)
PROBE_SECONDS = 5.0  # how often a reachable bucket is looked at again (a LIST request each time)
READERS = 4  # threads reading report messages from their stream (a read's reports are recorded before the next)
READ_COUNT = 32  # report messages a reader takes at once
READ_BLOCK_MS = 1000  # how long a read waits for one
CHECKS = 32  # uploads checked in the bucket at once (each a HEAD request)
# Connections, so that none waits for one: to storage, one for each check, and the bookkeeping's; to the database,
# each reader's (its touch of the jobs it checks), and the recorder's, the bookkeeping's, the webhooks' and a metrics
# scrape's.
STORAGE_CONNECTIONS = CHECKS + 1
CONNECTIONS = READERS + 4
BROKER_WAIT_SECONDS = 5.0  # between tries to reach the broker at start
SAID = 4  # reports named in a line about reports that wait
STOP_SECONDS = 30.0  # how long a stopping dispatcher waits for the reports in hand to be recorded
LEGACY_SECONDS = 60.0  # how often the queues older workers sent to are looked at (dispatcher.reports.LegacyQueues)
SWITCH_SECONDS = 0.0005  # how long a thread holds the GIL while another waits (Python's default: 5 ms)
WAITING_SECONDS = 10  # a waiting count outlives a few ticks; a silent dispatcher's counts expire (workers then
# look at the queues' lengths)
# A connection dropped mid-query or mid-commit: the transaction may or may not have landed. Every write here is a
# compare-and-set, so doing it again is safe.
DATABASE_AWAY = (OperationalError, InterfaceError)


def serve(settings: KilnSettings, sessions: sessionmaker[Session], clock: Callable[[], datetime]) -> None:
    """Run until stopped (SIGTERM, Ctrl-C): a bookkeeping thread, and readers of the reports stream."""
    if not settings.broker_url:
        raise ConfigError("KILN_BROKER_URL is not set: the dispatcher needs the fleet's Redis, e.g. redis://host:6379/0")
    bucket = Bucket.from_settings(settings, STORAGE_CONNECTIONS)
    bucket.check()
    policy = fleet.Policy.from_settings(settings)
    app = make_app(settings.broker_url)  # publishes render messages; consumes nothing
    broker = redis.Redis.from_url(settings.broker_url, socket_timeout=10)
    while True:  # a dispatcher may start before its Redis (compose, a reboot): it waits, saying so
        try:
            reports.check_broker(broker)
            break
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("the broker (KILN_BROKER_URL) does not answer (%s); trying again in %g s", exc,
                        BROKER_WAIT_SECONDS)
            time.sleep(BROKER_WAIT_SECONDS)
    # The recorder waits on PostgreSQL for each statement; with Python's default switch interval, a thread whose
    # answer came waits up to 5 ms for the GIL behind busy threads, and the recorder's groups queue up behind it.
    sys.setswitchinterval(SWITCH_SECONDS)
    recorder = GroupRecorder[tuple[Report, StoredObject | None]](
        sessions, lambda session, items: fleet.record_reports(session, items, clock(), policy, bucket),
        away=DATABASE_AWAY, order=lambda item: item[0].job_id).start()  # jobs' rows locked in id order, as reap

    stream = ReportStream(broker, f"kiln-dispatcher@{socket.gethostname()}", REPORT_RETRY_SECONDS, REPORT_RETRIES)
    checking = ThreadPoolExecutor(CHECKS, thread_name_prefix="kiln-check")  # a read's uploads checked at once
    stopping = threading.Event()

    def record(entries: list[Entry]) -> None:
        """Record a read's report messages (dispatcher.reports.record); acknowledge those recorded, and leave the
        others to be read again."""
        recorded, later = reports.record(
            entries, lambda found: fleet.check_uploads(sessions, found, clock(), bucket, checking.map),
            lambda report, stored: recorder.submit((report, stored)), DATABASE_AWAY)
        if later:
            # Storage cannot verify an upload, or the database is away: the messages wait in the stream, their
            # finished jobs touched so the reaper leaves them be, and are read again (those of their reports
            # recorded already are recorded again as no change: each is a compare-and-set). One line a read.
            waiting = [r for entry in entries if entry.id in later for r in entry.reports]
            log.warning("%s%s: cannot record the report%s yet (%s); again in %g s", ", ".join(
                f"job {r.job_id} attempt {r.attempt}" for r in waiting[:SAID]),
                f" and {len(waiting) - SAID} more" if len(waiting) > SAID else "", "s" * (len(waiting) > 1),
                _why(next(iter(later.values()))), REPORT_RETRY_SECONDS)
        stream.again(list(later))
        try:
            stream.done(recorded)
        except redis.RedisError as exc:  # read again later, and recorded again as no change
            log.warning("recorded reports not acknowledged (%s: %s)", type(exc).__name__, exc)

    said: dict[str, float] = {}  # what reading the stream was refused with, and when that was said

    def read_forever() -> None:
        while not stopping.is_set():
            try:
                entries = stream.read(READ_COUNT, READ_BLOCK_MS)
            except (redis.ConnectionError, redis.TimeoutError):  # the broker is away: the tick says so
                stopping.wait(TICK_SECONDS)
                continue
            except redis.RedisError as exc:  # it answers, and refuses: say why (once a minute), and try again
                if said.get(str(exc), 0.0) < time.monotonic() - 60:
                    said[str(exc)] = time.monotonic()
                    log.warning("cannot read the reports stream (%s: %s); check the dispatcher's Redis account",
                                type(exc).__name__, exc)
                stopping.wait(TICK_SECONDS)
                continue
            if not entries:
                continue
            try:
                record(entries)
            except Exception:  # something unforeseen: said, and the messages read again later
                log.exception("recording report messages failed; they are read again in %g s", REPORT_RETRY_SECONDS)
                stream.again([entry.id for entry in entries])
            taken.set()  # workers took messages (or are done with them): their queues have room, top them up

    def publish(queue: str, payload: dict[str, Any]) -> None:
        # The message expires with its TTL; the feeder republishes from the database after that.
        # argsrepr: logs, events and Flower show the job, never the signed upload URL (a credential)
        jobs = ", ".join(f"{t['job']['job_id']} attempt {t['job']['attempt']}" for t in payload["tasks"])
        app.send_task(RENDER_TASK, args=[payload], queue=queue, expires=settings.message_ttl_seconds,
                      argsrepr=f"job{'s' if len(payload['tasks']) > 1 else ''} {jobs}")

    def depth(queue: str) -> int:
        return int(broker.llen(queue))

    # An unwanted mark outlives every message it can concern: one taken at the end of its TTL, then rendered.
    unwanted_seconds = int(settings.message_ttl_seconds + settings.job_time_limit_seconds
                           + settings.worker_timeout_seconds)

    def mark(key: str) -> None:
        broker.set(key, "1", ex=unwanted_seconds)

    def tell_waiting(counts: dict[str, int]) -> None:
        """How many jobs each queue has waiting, for workers deciding whether to keep their model."""
        pipe = broker.pipeline(transaction=False)
        for queue, count in counts.items():
            pipe.set(waiting_key(queue), count, ex=WAITING_SECONDS)
        pipe.execute()

    taken = threading.Event()

    def bookkeeping() -> None:
        """Every tick: give back silent workers' jobs, withdraw unwanted messages, top the queues up, publish the
        waiting counts and finish batches. Between ticks, whenever reports come in: top the queues up, so a
        worker faster than a tick's backlog never waits for the next message."""
        gate = StorageGate(bucket)
        chores_at = sheets_at = time.monotonic()
        outlook = fleet.Outlook([], Counter(), {})  # the queues and their consumers, as the last tick found them
        empty_since: dict[str, datetime] = {}  # fleet.feed's memory of queues seen empty
        heartbeats = HeartbeatStream(broker, policy.worker_timeout)
        legacy = LegacyQueues(broker, LEGACY_SECONDS)
        while True:
            if taken.wait(max(chores_at - time.monotonic(), 0)):
                taken.clear()
                if time.monotonic() < chores_at:
                    try:
                        if gate.open():
                            with sessions.begin() as session:
                                fleet.top_up(session, clock(), policy, bucket, publish, outlook)
                    except Exception as exc:  # the tick's full pass says more
                        log.debug("top-up failed: %s", exc)
                    time.sleep(FEED_GAP_SECONDS)
                    continue
            chores_at = time.monotonic() + TICK_SECONDS
            try:
                # The heartbeats first, then the reaper: it judges each worker by its latest, and by heartbeats
                # at all only once it has heard them for a worker timeout without a break. While the broker cannot
                # be read, nothing is reaped, and the tick is tried again.
                beats = heartbeats.latest(clock())
                with sessions.begin() as session:
                    fleet.record_heartbeats(session, beats)
                heartbeats.recorded()
                with sessions.begin() as session:
                    reaped = fleet.reap(session, clock(), policy, heartbeats.heard_since)
                with sessions.begin() as session:
                    withdrawn = fleet.withdraw(session, mark)
                if withdrawn:
                    log.info("told workers %d published jobs are no longer wanted (cancelled or paused)", withdrawn)
                published = 0
                if gate.open():
                    with sessions.begin() as session:
                        outlook = fleet.look(session, clock(), policy)
                        published = fleet.feed(session, clock(), policy, bucket, publish, depth, outlook, empty_since)
                with sessions.begin() as session:
                    counts = fleet.waiting(session, clock())
                tell_waiting(counts)
                with sessions.begin() as session:
                    store.finish_batches(session, clock())
                legacy.clear()
                if time.monotonic() >= sheets_at:
                    sheets_at = time.monotonic() + SHEETS_EVERY_SECONDS
                    try:
                        usecases.share_models(bucket, broker)
                    except StorageError as exc:
                        log.warning("cannot renew the sheets of pushed models (%s); trying again later", exc)
                if reaped or published:
                    log.info("published %d jobs, gave back %d jobs of silent workers", published, reaped)
            except DATABASE_AWAY as exc:
                log.warning("bookkeeping: the database is away (%s); retrying", _why(exc))
            except redis.RedisError as exc:
                log.warning("bookkeeping: the broker is away (%s: %s); nothing is published or taken back until it "
                            "answers; check KILN_BROKER_URL and that Redis runs", type(exc).__name__, exc)
            except Exception:  # something unforeseen: say so and try again next tick
                log.exception("bookkeeping failed; retrying")

    def deliver_forever(url: str, secret: str) -> None:
        while True:
            try:
                webhooks.deliver(sessions, url, secret, clock())
            except DATABASE_AWAY as exc:
                log.warning("webhooks: the database is away (%s); retrying", _why(exc))
            except Exception:
                log.exception("webhook delivery failed; retrying")
            time.sleep(TICK_SECONDS)

    threading.Thread(target=bookkeeping, name="kiln-bookkeeping", daemon=True).start()
    if settings.webhook_url and settings.webhook_secret:
        threading.Thread(target=deliver_forever, args=(settings.webhook_url, settings.webhook_secret),
                         name="kiln-webhooks", daemon=True).start()
    if settings.metrics_port:
        from prometheus_client import start_http_server

        from dispatcher.metrics import registry

        start_http_server(settings.metrics_port, registry=registry(
            sessions, clock, timedelta(seconds=settings.worker_timeout_seconds),
            lambda: int(broker.xlen(REPORTS_STREAM))))
        log.info("Prometheus metrics on http://0.0.0.0:%d/metrics", settings.metrics_port)
    stream.join()
    # Several readers: a read waiting on a slow storage answer must not hold up the next reports.
    readers = [threading.Thread(target=read_forever, name=f"kiln-reports-{n}", daemon=True) for n in range(READERS)]
    for reader in readers:
        reader.start()
    log.info("dispatcher ready: reading reports from %s as %s", REPORTS_STREAM, stream.consumer)
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        while not stopping.wait(TICK_SECONDS):
            pass
    except KeyboardInterrupt:
        stopping.set()
    # Stopped: the reads in hand are recorded first (what is left is read again by the next dispatcher).
    for reader in readers:
        reader.join(STOP_SECONDS)
    log.info("dispatcher stopped")


class StorageGate:
    """Whether to publish now. While storage is away, publishing would only burn attempts on uploads that cannot
    land. One failed probe is a hiccup (S3 answers 503 now and then); STORAGE_DOWN_AFTER in a row, one a tick,
    is an outage, and one success ends it. A reachable bucket is looked at every PROBE_SECONDS."""

    def __init__(self, bucket: Bucket, clock: Callable[[], float] = time.monotonic) -> None:
        self.bucket, self.clock = bucket, clock
        self.failed, self.last_ok = 0, -PROBE_SECONDS

    def open(self) -> bool:
        """True when new render messages may go out."""
        if not self.failed and self.clock() - self.last_ok < PROBE_SECONDS:
            return True
        was_down = self.failed >= STORAGE_DOWN_AFTER
        problem = self.bucket.reachable()
        if problem:
            self.failed += 1
            if self.failed == STORAGE_DOWN_AFTER:
                log.warning("storage unreachable (%s): holding new render messages until it is back", problem)
        else:
            self.failed, self.last_ok = 0, self.clock()
            if was_down:
                log.info("storage reachable again: publishing")
        return self.failed < STORAGE_DOWN_AFTER


def _why(exc: Exception) -> str:
    return f"{type(getattr(exc, 'orig', None) or exc).__name__}: {store.first_line(exc)}"
