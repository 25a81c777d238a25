"""The worker's outbox: started reports ride with the next finished ones, or go alone after the linger."""

from __future__ import annotations

import threading
import time

from schemas.job import RenderResult
from schemas.messages import Report
from worker.outbox import Outbox


def started(job: str) -> Report:
    return Report(kind="started", job_id=job, attempt=1, worker="w1")


def finished(job: str) -> Report:
    return Report(kind="finished", job_id=job, attempt=1, worker="w1",
                  result=RenderResult(job_id=job, attempt=1, ok=False, worker="w1", seconds=0.0, error="x"))


class Sent:
    def __init__(self, fail: int = 0) -> None:
        self.messages: list[list[tuple[str, str]]] = []
        self.arrived = threading.Condition()
        self.fail = fail

    def __call__(self, reports: list[Report]) -> None:
        with self.arrived:
            if self.fail:
                self.fail -= 1
                self.arrived.notify_all()
                raise ConnectionError("the broker is away")
            self.messages.append([(r.kind, r.job_id) for r in reports])
            self.arrived.notify_all()

    def wait(self, count: int, seconds: float = 10) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.messages) >= count, seconds), self.messages


def test_a_started_report_rides_with_the_next_finished_one() -> None:
    sent = Sent()
    outbox = Outbox(sent, linger=30)
    outbox.started([started("a")])
    outbox.finished([finished("z")])  # the previous job's image stored while "a" renders
    outbox.started([started("b"), started("c")])
    outbox.finished([finished("a")])
    assert sent.messages == [[("started", "a"), ("finished", "z")],
                             [("started", "b"), ("started", "c"), ("finished", "a")]]


def test_a_started_report_with_no_company_goes_alone_after_the_linger() -> None:
    sent = Sent()
    outbox = Outbox(sent, linger=0.3)
    began = time.monotonic()
    outbox.started([started("a")])
    outbox.started([started("b")])  # the linger runs from the first report waiting, not the last
    sent.wait(1)
    assert time.monotonic() - began >= 0.3
    assert sent.messages == [[("started", "a"), ("started", "b")]]
    outbox.finished([finished("a")])  # nothing waits any more: the finished report goes alone
    assert sent.messages[1:] == [[("finished", "a")]]


def test_a_send_that_fails_on_the_flusher_loses_only_those_hints() -> None:
    sent = Sent(fail=1)
    outbox = Outbox(sent, linger=0.05)
    outbox.started([started("a")])  # the broker is away as it goes: logged, dropped (the finished report covers it)
    with sent.arrived:
        assert sent.arrived.wait_for(lambda: sent.fail == 0, 10)
    outbox.started([started("b")])
    sent.wait(1)
    assert sent.messages == [[("started", "b")]]


def test_flushing_an_empty_outbox_sends_nothing() -> None:
    sent = Sent()
    Outbox(sent).flush()
    assert sent.messages == []


def test_a_report_says_how_long_it_was_held_so_the_start_is_dated_when_it_happened() -> None:
    reports: list[Report] = []
    outbox = Outbox(reports.extend, linger=30)
    outbox.started([started("a")])
    time.sleep(0.2)
    outbox.finished([finished("z")])
    [(a, held), (z, sent_at_once)] = [(r.job_id, r.held) for r in reports]
    assert (a, z, sent_at_once) == ("a", "z", 0.0) and 0.2 <= held < 5
