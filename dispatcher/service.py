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
from celery import Celery
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
    _wait_for(broker)
    # The recorder waits on PostgreSQL for each statement; with Python's default switch interval, a thread whose
    # answer came waits up to 5 ms for the GIL behind busy threads, and the recorder's groups queue up behind it.
    sys.setswitchinterval(SWITCH_SECONDS)
    stopping = threading.Event()
    bookkeeping = Bookkeeping(settings, sessions, clock, policy, bucket, broker, app)
    reader = ReportReader(sessions, clock, policy, bucket, broker, stopping, bookkeeping.taken)
    threading.Thread(target=bookkeeping.run, name="kiln-bookkeeping", daemon=True).start()
    if settings.webhook_url and settings.webhook_secret:
        threading.Thread(target=_deliver_forever, args=(sessions, clock, settings.webhook_url, settings.webhook_secret),
                         name="kiln-webhooks", daemon=True).start()
    if settings.metrics_port:
        from prometheus_client import start_http_server

        from dispatcher.metrics import registry

        start_http_server(settings.metrics_port, registry=registry(
            sessions, clock, timedelta(seconds=settings.worker_timeout_seconds),
            lambda: int(broker.xlen(REPORTS_STREAM))))
        log.info("Prometheus metrics on http://0.0.0.0:%d/metrics", settings.metrics_port)
    reader.stream.join()
    # Several readers: a read waiting on a slow storage answer must not hold up the next reports.
    readers = [threading.Thread(target=reader.run, name=f"kiln-reports-{n}", daemon=True) for n in range(READERS)]
    for thread in readers:
        thread.start()
    log.info("dispatcher ready: reading reports from %s as %s", REPORTS_STREAM, reader.stream.consumer)
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        while not stopping.wait(TICK_SECONDS):
            pass
    except KeyboardInterrupt:
        stopping.set()
    # Stopped: the reads in hand are recorded first (what is left is read again by the next dispatcher).
    for thread in readers:
        thread.join(STOP_SECONDS)
    log.info("dispatcher stopped")


def _wait_for(broker: redis.Redis) -> None:
    """A dispatcher may start before its Redis (compose, a reboot): it waits, saying so."""
    while True:
        try:
            reports.check_broker(broker)
            return
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("the broker (KILN_BROKER_URL) does not answer (%s); trying again in %g s", exc,
                        BROKER_WAIT_SECONDS)
            time.sleep(BROKER_WAIT_SECONDS)


class ReportReader:
    """Reads the workers' report messages from their stream (several threads run `run`), checks a read's uploads
    at once, records its reports through one group recorder, and acknowledges each message once all its reports
    are committed. `taken` hears every read: workers took messages, so their queues have room."""

    def __init__(self, sessions: sessionmaker[Session], clock: Callable[[], datetime], policy: fleet.Policy,
                 bucket: Bucket, broker: redis.Redis, stopping: threading.Event, taken: threading.Event) -> None:
        self.sessions, self.clock, self.bucket, self.stopping, self.taken = sessions, clock, bucket, stopping, taken
        self.recorder = GroupRecorder[tuple[Report, StoredObject | None]](
            sessions, lambda session, items: fleet.record_reports(session, items, clock(), policy, bucket),
            away=DATABASE_AWAY, order=lambda item: item[0].job_id).start()  # rows locked in id order, as reap
        self.stream = ReportStream(broker, f"kiln-dispatcher@{socket.gethostname()}", REPORT_RETRY_SECONDS,
                                   REPORT_RETRIES)
        self.checking = ThreadPoolExecutor(CHECKS, thread_name_prefix="kiln-check")  # a read's uploads at once
        self.said: dict[str, float] = {}  # what reading the stream was refused with, and when that was said

    def run(self) -> None:
        """Read and record until stopping; a broker away or refusing is waited out."""
        while not self.stopping.is_set():
            try:
                entries = self.stream.read(READ_COUNT, READ_BLOCK_MS)
            except (redis.ConnectionError, redis.TimeoutError):  # the broker is away: the tick says so
                self.stopping.wait(TICK_SECONDS)
                continue
            except redis.RedisError as exc:  # it answers, and refuses: say why (once a minute), and try again
                if self.said.get(str(exc), 0.0) < time.monotonic() - 60:
                    self.said[str(exc)] = time.monotonic()
                    log.warning("cannot read the reports stream (%s: %s); check the dispatcher's Redis account",
                                type(exc).__name__, exc)
                self.stopping.wait(TICK_SECONDS)
                continue
            if not entries:
                continue
            try:
                self.record(entries)
            except Exception:  # something unforeseen: said, and the messages read again later
                log.exception("recording report messages failed; they are read again in %g s", REPORT_RETRY_SECONDS)
                self.stream.again([entry.id for entry in entries])
            self.taken.set()

    def record(self, entries: list[Entry]) -> None:
        """Record a read's report messages (dispatcher.reports.record); acknowledge those recorded, and leave the
        others to be read again."""
        recorded, later = reports.record(
            entries, lambda found: fleet.check_uploads(self.sessions, found, self.clock(), self.bucket,
                                                       self.checking.map),
            lambda report, stored: self.recorder.submit((report, stored)), DATABASE_AWAY)
        if later:
            # Storage cannot verify an upload, or the database is away: the messages wait in the stream, their
            # finished jobs touched so the reaper leaves them be, and are read again (those of their reports
            # recorded already are recorded again as no change: each is a compare-and-set). One line a read.
            waiting = [r for entry in entries if entry.id in later for r in entry.reports]
            log.warning("%s%s: cannot record the report%s yet (%s); again in %g s", ", ".join(
                f"job {r.job_id} attempt {r.attempt}" for r in waiting[:SAID]),
                f" and {len(waiting) - SAID} more" if len(waiting) > SAID else "", "s" * (len(waiting) > 1),
                _why(next(iter(later.values()))), REPORT_RETRY_SECONDS)
        self.stream.again(list(later))
        try:
            self.stream.done(recorded)
        except redis.RedisError as exc:  # read again later, and recorded again as no change
            log.warning("recorded reports not acknowledged (%s: %s)", type(exc).__name__, exc)


class Bookkeeping:
    """Every tick: give back silent workers' jobs, withdraw unwanted messages, top the queues up, publish the
    waiting counts and finish batches. Between ticks, whenever reports come in (`taken`): top the queues up, so a
    worker faster than a tick's backlog never waits for the next message."""

    def __init__(self, settings: KilnSettings, sessions: sessionmaker[Session], clock: Callable[[], datetime],
                 policy: fleet.Policy, bucket: Bucket, broker: redis.Redis, app: Celery) -> None:
        self.sessions, self.clock, self.policy, self.bucket, self.broker = sessions, clock, policy, bucket, broker
        self.app = app
        self.message_ttl = settings.message_ttl_seconds
        # An unwanted mark outlives every message it can concern: one taken at the end of its TTL, then rendered.
        self.unwanted_seconds = int(settings.message_ttl_seconds + settings.job_time_limit_seconds
                                    + settings.worker_timeout_seconds)
        self.taken = threading.Event()
        self.gate = StorageGate(bucket)
        self.outlook = fleet.Outlook([], Counter(), {})  # the queues and their consumers, as the last tick found them
        self.empty_since: dict[str, datetime] = {}  # fleet.feed's memory of queues seen empty
        self.heartbeats = HeartbeatStream(broker, policy.worker_timeout)
        self.legacy = LegacyQueues(broker, LEGACY_SECONDS)
        self.sheets_at = time.monotonic()

    def run(self) -> None:
        """Tick every TICK_SECONDS, topping up between ticks when `taken` is set (at most every FEED_GAP_SECONDS)."""
        chores_at = time.monotonic()
        while True:
            if self.taken.wait(max(chores_at - time.monotonic(), 0)):
                self.taken.clear()
                if time.monotonic() < chores_at:
                    self.top_up()
                    time.sleep(FEED_GAP_SECONDS)
                    continue
            chores_at = time.monotonic() + TICK_SECONDS
            self.tick()

    def top_up(self) -> None:
        """Top the queues the last tick saw up to their backlog; a failure waits for the tick, which says more."""
        try:
            if self.gate.open():
                with self.sessions.begin() as session:
                    fleet.top_up(session, self.clock(), self.policy, self.bucket, self.publish, self.outlook)
        except Exception as exc:
            log.debug("top-up failed: %s", exc)

    def tick(self) -> None:
        """The chores, once; a database or broker away is said and tried again next tick."""
        try:
            self._chores()
        except DATABASE_AWAY as exc:
            log.warning("bookkeeping: the database is away (%s); retrying", _why(exc))
        except redis.RedisError as exc:
            log.warning("bookkeeping: the broker is away (%s: %s); nothing is published or taken back until it "
                        "answers; check KILN_BROKER_URL and that Redis runs", type(exc).__name__, exc)
        except Exception:  # something unforeseen: say so and try again next tick
            log.exception("bookkeeping failed; retrying")

    def _chores(self) -> None:
        # The heartbeats first, then the reaper: it judges each worker by its latest, and by heartbeats at all only
        # once it has heard them for a worker timeout without a break. While the broker cannot be read, nothing is
        # reaped, and the tick is tried again.
        sessions, clock, policy = self.sessions, self.clock, self.policy
        beats = self.heartbeats.latest(clock())
        with sessions.begin() as session:
            fleet.record_heartbeats(session, beats)
        self.heartbeats.recorded()
        with sessions.begin() as session:
            reaped = fleet.reap(session, clock(), policy, self.heartbeats.heard_since)
        with sessions.begin() as session:
            withdrawn = fleet.withdraw(session, self.mark)
        if withdrawn:
            log.info("told workers %d published jobs are no longer wanted (cancelled or paused)", withdrawn)
        published = 0
        if self.gate.open():
            with sessions.begin() as session:
                self.outlook = fleet.look(session, clock(), policy)
                published = fleet.feed(session, clock(), policy, self.bucket, self.publish, self.depth, self.outlook,
                                       self.empty_since)
        with sessions.begin() as session:
            counts = fleet.waiting(session, clock())
        self.tell_waiting(counts)
        with sessions.begin() as session:
            store.finish_batches(session, clock())
        self.legacy.clear()
        if time.monotonic() >= self.sheets_at:
            self.sheets_at = time.monotonic() + SHEETS_EVERY_SECONDS
            try:
                usecases.share_models(self.bucket, self.broker)
            except StorageError as exc:
                log.warning("cannot renew the sheets of pushed models (%s); trying again later", exc)
        if reaped or published:
            log.info("published %d jobs, gave back %d jobs of silent workers", published, reaped)

    def publish(self, queue: str, payload: dict[str, Any]) -> None:
        """Send a render message; it expires with its TTL, and the feeder republishes from the database after."""
        # argsrepr: logs, events and Flower show the job, never the signed upload URL (a credential)
        jobs = ", ".join(f"{t['job']['job_id']} attempt {t['job']['attempt']}" for t in payload["tasks"])
        self.app.send_task(RENDER_TASK, args=[payload], queue=queue, expires=self.message_ttl,
                           argsrepr=f"job{'s' if len(payload['tasks']) > 1 else ''} {jobs}")

    def depth(self, queue: str) -> int:
        """Messages waiting in a render queue."""
        return int(self.broker.llen(queue))

    def mark(self, key: str) -> None:
        """Tell workers a published message is no longer wanted."""
        self.broker.set(key, "1", ex=self.unwanted_seconds)

    def tell_waiting(self, counts: dict[str, int]) -> None:
        """How many jobs each queue has waiting, for workers deciding whether to keep their model."""
        pipe = self.broker.pipeline(transaction=False)
        for queue, count in counts.items():
            pipe.set(waiting_key(queue), count, ex=WAITING_SECONDS)
        pipe.execute()


def _deliver_forever(sessions: sessionmaker[Session], clock: Callable[[], datetime], url: str, secret: str) -> None:
    while True:
        try:
            webhooks.deliver(sessions, url, secret, clock())
        except DATABASE_AWAY as exc:
            log.warning("webhooks: the database is away (%s); retrying", _why(exc))
        except Exception:
            log.exception("webhook delivery failed; retrying")
        time.sleep(TICK_SECONDS)


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
