"""`kiln dispatcher`: the fleet's coordinator. Feeds render queues from the database, records the reports and
heartbeats workers send, and gives back the jobs of workers that went silent."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import redis
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import fleet, store, usecases, webhooks
from dispatcher.bucket import Bucket, StoredObject
from dispatcher.fleet import REPORT_RETRIES, REPORT_RETRY_SECONDS
from dispatcher.heartbeats import HeartbeatStream
from dispatcher.recorder import GroupRecorder
from schemas.broker import make_app
from schemas.errors import ConfigError, StaleStateError, StorageError
from schemas.messages import (
    HEARTBEAT_TASK,
    HEARTBEATS_QUEUE,
    RENDER_TASK,
    REPORT_TASK,
    REPORTS_QUEUE,
    Report,
    heartbeat_in,
    reports_in,
    waiting_key,
)
from schemas.settings import KilnSettings

log = logging.getLogger("kiln.dispatcher")
TICK_SECONDS = 1.0
FEED_GAP_SECONDS = 0.05  # between two top-ups of the queues that reports asked for
STORAGE_DOWN_AFTER = 3  # failed probes in a row (one a tick) before publishing stops
SHEETS_EVERY_SECONDS = 600.0  # how often the signed sheets of pushed models are renewed (usecases.share_models)
PROBE_SECONDS = 5.0  # how often a reachable bucket is looked at again (a LIST request each time)
CONSUMERS = 32  # report messages in hand at once (recorded in groups: dispatcher.recorder), old workers' heartbeats
CONNECTIONS = CONSUMERS + 4  # each consumer may hold one (a touch; a storage check), and the recorder, bookkeeping,
# webhooks and a metrics scrape one each: none waits for a connection, to the database or to storage
SWITCH_SECONDS = 0.0005  # how long a thread holds the GIL while another waits (Python's default: 5 ms)
WAITING_SECONDS = 10  # a waiting count outlives a few ticks; a silent dispatcher's counts expire (workers then
# look at the queues' lengths)
# A connection dropped mid-query or mid-commit: the transaction may or may not have landed. Every write here is a
# compare-and-set, so doing it again is safe.
DATABASE_AWAY = (OperationalError, InterfaceError)


def serve(settings: KilnSettings, sessions: sessionmaker[Session], clock: Callable[[], datetime]) -> None:
    """Run until stopped: a bookkeeping thread, and a Celery consumer of the reports queue."""
    if not settings.broker_url:
        raise ConfigError("KILN_BROKER_URL is not set: the dispatcher needs the fleet's Redis, e.g. redis://host:6379/0")
    bucket = Bucket.from_settings(settings, CONNECTIONS)
    bucket.check()
    policy = fleet.Policy.from_settings(settings)
    app = make_app(settings.broker_url)
    # No task events from this consumer: a report's received/started/succeeded events cost more CPU than
    # recording it, and say nothing Kiln's own tables do not (Flower still shows the render tasks).
    app.conf.worker_send_task_events = False
    broker = redis.Redis.from_url(settings.broker_url, socket_timeout=10)
    # The recorder waits on PostgreSQL for each statement; with Python's default switch interval, a thread whose
    # answer came waits up to 5 ms for the GIL behind busy threads, and the recorder's groups queue up behind it.
    sys.setswitchinterval(SWITCH_SECONDS)
    recorder = GroupRecorder[tuple[Report, StoredObject | None]](
        sessions, lambda session, items: fleet.record_reports(session, items, clock(), policy, bucket),
        away=DATABASE_AWAY, order=lambda item: item[0].job_id).start()  # jobs' rows locked in id order, as reap

    @app.task(name=REPORT_TASK, bind=True, acks_late=True, max_retries=REPORT_RETRIES)
    def report(task: Any, payload: dict[str, Any]) -> None:
        try:
            reports = reports_in(payload)
        except ValidationError as exc:
            log.error("dropped a malformed report: %s", exc.errors()[0]["msg"])
            return
        problem: Exception | None = None
        try:  # every report of the message into the recorder at once: they may share its next transaction
            answers = fleet.receive_reports(sessions, reports, clock, policy, bucket,
                                            lambda report, stored: recorder.submit((report, stored)))
        except (StorageError, *DATABASE_AWAY) as exc:
            answers, problem = [], exc
        for message, answer in zip(reports, answers, strict=False):
            try:
                outcome = answer.result()
            except StaleStateError as exc:  # lost a race with the reaper: the job is someone else's now
                outcome = f"stale ({exc})"
            except (StorageError, *DATABASE_AWAY) as exc:
                problem = exc
                continue
            log.info("job %s attempt %d on %s: %s", message.job_id, message.attempt, message.worker, outcome)
        if problem is not None:
            # Storage cannot verify an upload, or the database is away: keep the reports (a new message, so
            # heartbeats and other reports go on meanwhile) and keep their jobs from looking abandoned. Those
            # recorded already are recorded again as no change (each is a compare-and-set).
            log.warning("%s: cannot record the report yet (%s); again in %g s", ", ".join(
                f"job {m.job_id} attempt {m.attempt}" for m in reports), _why(problem), REPORT_RETRY_SECONDS)
            try:
                with sessions.begin() as session:
                    fleet.touch(session, reports, clock())
            except DATABASE_AWAY:
                pass
            raise task.retry(countdown=REPORT_RETRY_SECONDS) from None
        taken.set()  # a worker took a message (or is done with one): its queue has room, top it up now

    @app.task(name=HEARTBEAT_TASK)
    def heartbeat(payload: dict[str, Any]) -> None:  # a worker before protocol 4: shown, with why it cannot work
        try:
            beat = heartbeat_in(payload)
        except ValidationError:
            log.error("dropped a malformed heartbeat")
            return
        try:
            with sessions.begin() as session:
                fleet.record_heartbeat(session, beat, clock())
        except DATABASE_AWAY as exc:  # the next one comes in seconds
            log.warning("heartbeat of %s not recorded (%s)", beat.worker, _why(exc))

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
            sessions, clock, timedelta(seconds=settings.worker_timeout_seconds)))
        log.info("Prometheus metrics on http://0.0.0.0:%d/metrics", settings.metrics_port)
    # Threads: a report waiting on a slow storage answer must not hold up the others. The heartbeats queue of
    # workers before protocol 4 first, as they expect.
    app.worker_main(["worker", "--pool", "threads", "--concurrency", str(CONSUMERS), "-Q",
                     f"{HEARTBEATS_QUEUE},{REPORTS_QUEUE}",
                     "-n", "kiln-dispatcher@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"])


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
