"""`kiln dispatcher`: the fleet's coordinator. Feeds render queues from the database, records the reports and
heartbeats workers send, and gives back the jobs of workers that went silent."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import redis
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import fleet
from dispatcher.bucket import Bucket
from schemas.broker import make_app
from schemas.errors import ConfigError, StaleStateError
from schemas.messages import HEARTBEAT_TASK, RENDER_TASK, REPORT_TASK, REPORTS_QUEUE, Heartbeat, Report
from schemas.settings import KilnSettings

log = logging.getLogger("kiln.dispatcher")
TICK_SECONDS = 1.0


def serve(settings: KilnSettings, sessions: sessionmaker[Session], clock: Callable[[], datetime]) -> None:
    """Run until stopped: a bookkeeping thread, and a Celery consumer of the reports queue."""
    if not settings.broker_url:
        raise ConfigError("KILN_BROKER_URL is not set: the dispatcher needs the fleet's Redis, e.g. redis://host:6379/0")
    bucket = Bucket(settings.storage_url, settings.s3_endpoint_url)
    bucket.check()
    policy = fleet.Policy.from_settings(settings)
    app = make_app(settings.broker_url)
    broker = redis.Redis.from_url(settings.broker_url, socket_timeout=10)

    @app.task(name=REPORT_TASK, acks_late=True)
    def report(payload: dict[str, Any]) -> None:
        try:
            message = Report.model_validate(payload)
        except ValidationError as exc:
            log.error("dropped a malformed report: %s", exc.errors()[0]["msg"])
            return
        try:
            with sessions.begin() as session:
                outcome = fleet.record_report(session, message, clock(), policy, bucket)
        except StaleStateError as exc:  # lost a race with the reaper: the job is someone else's now
            outcome = f"stale ({exc})"
        log.info("job %s attempt %d on %s: %s", message.job_id, message.attempt, message.worker, outcome)

    @app.task(name=HEARTBEAT_TASK)
    def heartbeat(payload: dict[str, Any]) -> None:
        try:
            beat = Heartbeat.model_validate(payload)
        except ValidationError:
            log.error("dropped a malformed heartbeat")
            return
        with sessions.begin() as session:
            fleet.record_heartbeat(session, beat, clock())

    def publish(queue: str, payload: dict[str, Any]) -> None:
        # The message expires with its TTL; the feeder republishes from the database after that.
        # argsrepr: logs, events and Flower show the job, never the signed upload URL (a credential)
        app.send_task(RENDER_TASK, args=[payload], queue=queue, expires=settings.message_ttl_seconds,
                      argsrepr=f"job {payload['job']['job_id']} attempt {payload['job']['attempt']}")

    def depth(queue: str) -> int:
        return int(broker.llen(queue))

    def bookkeeping() -> None:
        while True:
            try:
                with sessions.begin() as session:
                    reaped = fleet.reap(session, clock(), policy)
                with sessions.begin() as session:
                    published = fleet.feed(session, clock(), policy, bucket, publish, depth)
                if reaped or published:
                    log.info("published %d render messages, gave back %d jobs of silent workers", published, reaped)
            except Exception:  # the broker or database is away: say so and try again next tick
                log.exception("bookkeeping failed; retrying")
            time.sleep(TICK_SECONDS)

    threading.Thread(target=bookkeeping, name="kiln-bookkeeping", daemon=True).start()
    app.worker_main(["worker", "--pool", "solo", "-Q", REPORTS_QUEUE, "-n", "kiln-dispatcher@%h",
                     "--loglevel", "INFO", "--without-gossip", "--without-mingle"])
