"""Report messages through their Redis stream: each handed to one reader, kept until recorded, read again when
recording failed or its reader died, dropped after its tries; the queues of older workers cleared; and the
messages waiting, a metric."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from prometheus_client import generate_latest

from dispatcher import store
from dispatcher.bucket import StoredObject
from dispatcher.fleet import Uploads
from dispatcher.metrics import registry
from dispatcher.reports import Entry, LegacyQueues, ReportStream, check_broker, record
from schemas.errors import ConfigError, StaleStateError, StorageError
from schemas.job import RenderResult
from schemas.messages import LEGACY_QUEUES, REPORTS_GROUP, REPORTS_STREAM, Report
from tests.services import redis_server
from worker.outbox import send_reports

RETRY = 0.3  # seconds before a pending entry is read again (the dispatcher's: REPORT_RETRY_SECONDS)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[redis.Redis]:
    """A private Redis of its own."""
    with redis_server(tmp_path) as server:
        yield redis.Redis(port=server.port)


def started(job: str) -> Report:
    return Report(kind="started", job_id=job, attempt=1, worker="w1")


def pending(broker: redis.Redis) -> int:
    return int(broker.xpending(REPORTS_STREAM, REPORTS_GROUP)["pending"])


def test_each_message_is_read_once_and_deleted_when_recorded(broker: redis.Redis) -> None:
    send_reports(broker, [started("a"), started("b")])  # before any dispatcher: read by the first one
    one = ReportStream(broker, "d1", RETRY, retries=5)
    one.join()
    one.join()  # a second join (a restart) keeps the group and where it has read to
    send_reports(broker, [started("c")])
    broker.xadd(REPORTS_STREAM, {"reports": b"not json"})
    broker.xadd(REPORTS_STREAM, {"reports": b'{"reports": []}'})
    two = ReportStream(broker, "d2", RETRY, retries=5)

    first = one.read(2, block_ms=10)
    rest = two.read(10, block_ms=10)
    assert [[r.job_id for r in e.reports] for e in first] == [["a", "b"], ["c"]]
    assert [(e.reports, e.problem is not None) for e in rest] == [([], True), ([], True)]  # malformed, said why
    assert two.read(10, block_ms=10) == [] and one.read(10, block_ms=10) == []  # nothing handed out twice
    assert pending(broker) == 4

    one.done([e.id for e in first])
    two.done([e.id for e in rest])
    assert pending(broker) == 0 and broker.xlen(REPORTS_STREAM) == 0  # acknowledged and deleted: nothing kept


def test_a_message_not_recorded_is_read_again_and_one_in_hand_is_not(broker: redis.Redis) -> None:
    stream = ReportStream(broker, "d1", RETRY, retries=5)
    stream.join()
    send_reports(broker, [started("a")])
    send_reports(broker, [started("b")])
    [a, b] = stream.read(10, block_ms=10)
    stream.again([a.id])  # storage could not answer for a's upload: a waits; b is still being recorded
    time.sleep(RETRY + 0.1)
    assert [e.id for e in stream.read(10, block_ms=10)] == [a.id]  # read again; b, in hand, is not taken
    stream.done([a.id, b.id])
    assert broker.xlen(REPORTS_STREAM) == 0


def test_after_an_outage_every_message_due_again_is_read_at_once_not_a_read_every_few_seconds(
        broker: redis.Redis) -> None:
    now = [0.0]  # the stream's own clock, stopped below: no read may wait for the next round of claims
    stream = ReportStream(broker, "d1", RETRY, retries=5, clock=lambda: now[0])
    stream.join()
    for n in range(100):
        send_reports(broker, [started(f"j{n}")])
    failed = stream.read(100, block_ms=10)  # the database was away: none could be recorded
    stream.again([e.id for e in failed])
    time.sleep(RETRY + 0.1)  # Redis' idle time
    now[0] = 1.0
    again = []
    for _ in range(10):
        again += stream.read(10, block_ms=10)
    assert sorted(e.id for e in again) == sorted(e.id for e in failed)


def test_a_dead_dispatchers_messages_are_read_by_the_next(broker: redis.Redis) -> None:
    dead = ReportStream(broker, "d1", RETRY, retries=5)
    dead.join()
    send_reports(broker, [started("a")])
    [held] = dead.read(10, block_ms=10)  # ...and then its process was killed
    successor = ReportStream(broker, "d1", RETRY, retries=5)  # the same host's next dispatcher
    time.sleep(RETRY + 0.1)
    [again] = successor.read(10, block_ms=10)
    assert (again.id, again.reports) == (held.id, held.reports)


def test_a_message_that_is_never_recorded_is_dropped_after_its_tries(broker: redis.Redis,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    stream = ReportStream(broker, "d1", RETRY, retries=3)
    stream.join()
    send_reports(broker, [started("a")])
    tries = 0
    with caplog.at_level(logging.ERROR, "kiln.dispatcher"):
        for _ in range(6):
            entries = stream.read(10, block_ms=10)
            tries += len(entries)
            stream.again([e.id for e in entries])
            time.sleep(RETRY + 0.1)
        assert stream.read(10, block_ms=10) == []
    assert tries == 3
    assert broker.xlen(REPORTS_STREAM) == 0 and pending(broker) == 0
    assert "dropped 1 report message that could not be recorded in 3 tries" in caplog.text


def test_a_broker_that_lost_the_stream_gets_it_again(broker: redis.Redis) -> None:
    stream = ReportStream(broker, "d1", RETRY, retries=5)
    stream.join()
    broker.delete(REPORTS_STREAM)  # a restart without persistence
    assert stream.read(10, block_ms=10) == []
    send_reports(broker, [started("a")])
    assert [[r.job_id for r in e.reports] for e in stream.read(10, block_ms=10)] == [["a"]]


def test_what_older_workers_sent_to_the_old_queues_is_said_and_cleared(broker: redis.Redis,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    legacy = LegacyQueues(broker, every=60)
    broker.lpush(LEGACY_QUEUES[0], b"a report", b"another")
    broker.lpush(LEGACY_QUEUES[1], b"a heartbeat")
    with caplog.at_level(logging.WARNING, "kiln.dispatcher"):
        assert legacy.clear() == 3
        broker.lpush(LEGACY_QUEUES[1], b"a heartbeat")
        assert legacy.clear() == 0  # looked at once a minute
    assert not broker.exists(LEGACY_QUEUES[0])
    assert "deleted 3 messages that workers of an older Kiln" in caplog.text
    assert "install the same Kiln version" in caplog.text
    assert LegacyQueues(broker, every=60).clear() == 1


class Away(Exception):
    """The database is away."""


def finished(job: str) -> Report:
    result = RenderResult(job_id=job, attempt=1, ok=True, worker="w1", md5="m", sha256="s", seconds=1.0)
    return Report(kind="finished", job_id=job, attempt=1, worker="w1", result=result)


def test_a_message_waits_in_full_when_one_of_its_reports_cannot_be_recorded_yet(
        caplog: pytest.LogCaptureFixture) -> None:
    stored = StoredObject(md5="m", size=1, job_id="x")
    checked: Uploads = {
        ("a2", 1): StorageError("storage did not answer"), ("b1", 1): stored, ("d1", 1): stored}
    outcomes: dict[str, Exception | str] = {"b1": "succeeded", "b2": StaleStateError("taken back"),
                                            "c1": "started", "d1": Away("connection lost"), "e1": ValueError("bug")}
    submitted: list[tuple[str, StoredObject | None]] = []

    def submit(report: Report, found: StoredObject | None) -> Future[str]:
        submitted.append((report.job_id, found))
        answer: Future[str] = Future()
        outcome = outcomes.get(report.job_id, "started")
        answer.set_exception(outcome) if isinstance(outcome, Exception) else answer.set_result(outcome)
        return answer

    entries = [Entry("1-0", [started("a1"), finished("a2")]),  # storage could not check a2: a1 waits with it
               Entry("2-0", [finished("b1"), started("b2")]),  # b2 lost a race with the reaper: that is an outcome
               Entry("3-0", problem="not JSON"),
               Entry("4-0", [started("c1")]),
               Entry("5-0", [finished("d1")]),  # the database went away while recording it
               Entry("6-0", [started("e1")])]  # Kiln cannot record it at all: said, not tried for an hour
    with caplog.at_level(logging.INFO, "kiln.dispatcher"):
        recorded, later = record(entries, lambda reports: checked, submit, (Away,))
    assert sorted(recorded) == ["2-0", "3-0", "4-0", "6-0"]
    assert {entry: type(why) for entry, why in later.items()} == {"1-0": StorageError, "5-0": Away}
    assert [job for job, _ in submitted] == ["b1", "b2", "c1", "d1", "e1"]  # nothing of the waiting message
    assert dict(submitted)["b1"] == stored and dict(submitted)["c1"] is None
    assert "dropped a malformed report message (stream entry 3-0): not JSON" in caplog.text
    assert "job b2 attempt 1 on w1: stale (taken back)" in caplog.text
    assert "job e1 attempt 1: the report cannot be recorded" in caplog.text


def test_a_database_away_while_touching_leaves_every_message_waiting() -> None:
    def check(reports: list[Report]) -> Uploads:
        raise Away("no connection")

    def submit(report: Report, found: StoredObject | None) -> Future[str]:
        raise AssertionError("nothing is recorded before the uploads are checked")

    recorded, later = record([Entry("1-0", [finished("a")]), Entry("2-0", [started("b")]),
                              Entry("3-0", problem="junk")], check, submit, (Away,))
    assert recorded == ["3-0"] and sorted(later) == ["1-0", "2-0"]


def test_the_report_messages_waiting_are_a_metric_and_a_broker_away_leaves_the_others(tmp_path: Path) -> None:
    sessions = store.open_database(f"sqlite:///{tmp_path / 'kiln.db'}")
    now = lambda: datetime.now(UTC).replace(tzinfo=None)  # noqa: E731

    def away() -> int:
        raise redis.ConnectionError("no broker")

    scraped = generate_latest(registry(sessions, now, timedelta(seconds=60), lambda: 7)).decode()
    assert "kiln_reports_waiting 7.0" in scraped and 'kiln_jobs{status="queued"} 0.0' in scraped
    scraped = generate_latest(registry(sessions, now, timedelta(seconds=60), away)).decode()
    assert "kiln_reports_waiting" not in scraped and 'kiln_jobs{status="queued"} 0.0' in scraped


def test_a_redis_too_old_for_the_stream_is_refused_saying_what_to_do(broker: redis.Redis) -> None:
    class Old:
        def info(self, section: str) -> dict[str, str]:
            return {"redis_version": "6.0.16"}

    with pytest.raises(ConfigError, match=r"version 6\.0\.16; Kiln needs Redis 6\.2 or later .* upgrade it"):
        check_broker(Old())  # type: ignore[arg-type]
    check_broker(broker)  # this machine's Redis 7
