"""The dispatcher's Prometheus metrics, read from the database at each scrape (so they hold across restarts and
whoever recorded the change): jobs by status, images rendered (rate() gives images per second), each worker's
heartbeat age, speed and whether it is online; and, from the broker, the report messages waiting to be recorded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import store, usecases
from schemas.job import JobStatus


class KilnCollector(Collector):
    """Collects on each scrape, in one short transaction."""

    def __init__(self, sessions: sessionmaker[Session], clock: Callable[[], datetime], timeout: timedelta,
                 reports_waiting: Callable[[], int] | None = None) -> None:
        self.sessions, self.clock, self.timeout = sessions, clock, timeout
        self.reports_waiting = reports_waiting

    def collect(self) -> Iterator[Metric]:
        """The metrics, as of now."""
        now = self.clock()
        with self.sessions.begin() as session:
            counts = store.batch_counts(session, None)
            workers = usecases.workers(session, now, self.timeout)
        jobs = GaugeMetricFamily("kiln_jobs", "Jobs in each status", labels=["status"])
        for status, n in counts.items():
            jobs.add_metric([status], n)
        yield jobs
        yield CounterMetricFamily("kiln_images", "Images rendered and recorded (rate() is images per second)",
                                  value=counts[JobStatus.SUCCEEDED.value])
        online = GaugeMetricFamily("kiln_worker_online", "1 while a worker's heartbeats arrive", labels=["worker"])
        age = GaugeMetricFamily("kiln_worker_heartbeat_age_seconds", "Seconds since a worker's last heartbeat",
                                labels=["worker"])
        speed = GaugeMetricFamily("kiln_worker_seconds_per_image", "A worker's last measured seconds per image",
                                  labels=["worker"])
        done = CounterMetricFamily("kiln_worker_images", "Images each worker rendered", labels=["worker"])
        for w in workers:
            online.add_metric([w.name], 1 if w.online else 0)
            age.add_metric([w.name], max((now - w.last_seen).total_seconds(), 0.0))
            if w.seconds_per_image:
                speed.add_metric([w.name], w.seconds_per_image)
            done.add_metric([w.name], w.done)
        yield from (online, age, speed, done)
        if self.reports_waiting is not None:
            try:
                waiting = self.reports_waiting()
            except Exception:  # the broker is away: the database's metrics still count
                return
            yield GaugeMetricFamily("kiln_reports_waiting", "Report messages in the broker not yet recorded (one that "
                                    "keeps growing: the dispatcher is falling behind)", value=waiting)


def registry(sessions: sessionmaker[Session], clock: Callable[[], datetime], timeout: timedelta,
             reports_waiting: Callable[[], int] | None = None) -> CollectorRegistry:
    """A registry holding Kiln's metrics only (no process metrics of the scraping thread's own)."""
    found = CollectorRegistry(auto_describe=False)
    found.register(KilnCollector(sessions, clock, timeout, reports_waiting))
    return found
