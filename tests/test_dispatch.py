"""The dispatcher's bookkeeping on SQLite and PostgreSQL with a real S3 endpoint: feeding, reports, retries,
out-of-memory moves, silent workers, pause and priority. The broker is the boundary: publishing is recorded."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from pydantic import ValidationError
from sqlalchemy import create_engine, event, func, select, update
from sqlalchemy.orm import sessionmaker

from dispatcher import fleet, store, usecases
from dispatcher.bucket import Bucket, StoredObject
from dispatcher.expand import Options, expand
from dispatcher.reader import parse_manifest
from dispatcher.recorder import GroupRecorder
from dispatcher.service import Bookkeeping, StorageGate
from schemas.broker import make_app
from schemas.job import JobStatus, RenderResult
from schemas.messages import (
    PROTOCOL,
    Heartbeat,
    RenderMessage,
    RenderTask,
    Report,
    Reports,
    on_the_wire,
    reports_in,
    unwanted_key,
    waiting_key,
)
from schemas.settings import KilnSettings
from schemas.tables import Attempt, Batch, BatchJob, Job, Output, Worker
from tests.services import free_port, redis_server, s3_server
from worker.upload import SignedUpload

T0 = datetime(2026, 1, 1, 12, 0, 0)
POLICY = fleet.Policy(backlog=2, message_ttl=timedelta(minutes=15), worker_timeout=timedelta(seconds=60),
                      max_attempts=3, retry_base=timedelta(seconds=10))


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with s3_server(tmp_path_factory.mktemp("s3")) as url:
        yield url


@pytest.fixture
def bucket(endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Bucket:
    for k, v in {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    name = f"b{abs(hash(request.node.nodeid)) % 10**8}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return Bucket(f"s3://{name}/out", endpoint)


class Broker:
    """The broker boundary: what was published, and how deep each queue is."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.depth: dict[str, int] = {}

    def publish(self, queue: str, payload: dict[str, Any]) -> None:
        self.sent.append((queue, payload))
        self.depth[queue] = self.depth.get(queue, 0) + 1

    def take(self) -> RenderTask:
        """The next message, which holds one job."""
        (task,) = self.take_message().tasks
        return task

    def take_message(self) -> RenderMessage:
        queue, payload = self.sent.pop(0)
        self.depth[queue] -= 1
        return RenderMessage.model_validate(payload)


def setup(database_url: str, rows: str, batch: str = "b1", priority: int = 0, paused: bool = False):
    sessions = store.open_database(database_url)
    expansion = expand(parse_manifest(rows.encode(), "m.csv"), Options(batch=batch, base_dir=Path.cwd(),
                                                                       non_commercial=True))
    with sessions.begin() as s:
        store.record_batch(s, Batch(id=batch, name=batch, manifest="m.csv", manifest_sha256="0", created_at=T0,
                                    priority=priority, paused=paused), expansion, T0)
    return sessions


def feed(sessions, bucket: Bucket, broker: Broker, now: datetime = T0) -> int:
    with sessions.begin() as s:
        return fleet.feed(s, now, POLICY, bucket, broker.publish, lambda q: broker.depth.get(q, 0))


def report(sessions, bucket: Bucket, message: Report, now: datetime = T0) -> str:
    return fleet.receive_report(sessions, message, lambda: now, POLICY, bucket)


def render(task: RenderTask, worker: str, data: bytes = b"\x89PNG fake") -> Report:
    """What a worker does with a task: upload through the signed URL and report."""
    SignedUpload(task.upload).put(task.job.output_key, data, task.job.job_id)
    job = task.job
    return Report(kind="finished", job_id=job.job_id, attempt=job.attempt, worker=worker, result=RenderResult(
        job_id=job.job_id, attempt=job.attempt, ok=True, worker=worker, seconds=0.1, uri=task.upload.uri,
        sha256=hashlib.sha256(data).hexdigest(), md5=hashlib.md5(data).hexdigest(), bytes=len(data)))


def failed(task: RenderTask, worker: str, kind: str) -> Report:
    job = task.job
    return Report(kind="finished", job_id=job.job_id, attempt=job.attempt, worker=worker, result=RenderResult(
        job_id=job.job_id, attempt=job.attempt, ok=False, worker=worker, seconds=0.1, error=f"boom ({kind})",
        error_kind=kind))


def started(database_url: str, bucket: Bucket):
    """A one-job batch whose job worker w1 has taken and started: (sessions, its render message)."""
    sessions = setup(database_url, "id,prompt\na,x\n")
    broker = Broker()
    feed(sessions, bucket, broker)
    task = broker.take()
    report(sessions, bucket, Report(kind="started", job_id=task.job.job_id, attempt=1, worker="w1"))
    return sessions, task


def job_row(sessions, job_id: str) -> Job:
    with sessions.begin() as s:
        return s.get(Job, job_id)


def test_queues_are_fed_up_to_the_backlog_by_fit(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt,model\n" + "".join(f"s{i},x,klein-4b\n" for i in range(3))
                     + "".join(f"b{i},y,klein-9b\n" for i in range(3)))
    broker = Broker()
    assert feed(sessions, bucket, broker) == 4
    assert broker.depth == {"kiln.render.klein-4b.vram8": 2, "kiln.render.klein-9b.vram16": 2}
    assert feed(sessions, bucket, broker) == 0  # the backlog is full
    task = broker.take()
    report(sessions, bucket, Report(kind="started", job_id=task.job.job_id, attempt=1, worker="w"))
    assert feed(sessions, bucket, broker) == 1


def test_a_queue_holds_a_backlog_for_each_live_worker_on_it(database_url: str, bucket: Bucket) -> None:
    # Fifty workers on one queue drain a fixed backlog faster than reports come to top it up: they would idle.
    sessions = setup(database_url, "id,prompt,model\n" + "".join(f"s{i},x,klein-4b\n" for i in range(10)))
    queue = "kiln.render.klein-4b.vram8"
    with sessions.begin() as s:
        for name, seen in (("w1", T0), ("w2", T0), ("w3", T0), ("gone", T0 - timedelta(minutes=5))):
            fleet.record_heartbeat(s, Heartbeat(worker=name, device="cuda", vram_gb=8, queues=[queue]), seen)
    broker = Broker()
    assert feed(sessions, bucket, broker) == 3 * POLICY.backlog  # the silent worker counts for nothing
    assert broker.depth == {queue: 6}


def test_a_worker_with_a_lora_applied_is_fed_that_loras_jobs_first(database_url: str, bucket: Bucket,
                                                                     tmp_path: Path) -> None:
    # A matrix of products x house styles interleaves the styles row by row; each switch is an unload and a load.
    from schemas.params import RenderParams
    from tests.test_lora import make_lora

    oak, marble = make_lora(tmp_path / "oak"), make_lora(tmp_path / "marble", seed=1)
    sessions = setup(database_url, "id,prompt,model,lora\n" + "".join(
        f"p{i}{style},x,tiny,{path}\n" for i in range(4) for style, path in (("o", oak), ("m", marble))))
    with sessions.begin() as s:
        jobs = s.scalars(select(Job)).all()
        queue = jobs[0].queue
        marble_shape = next(j.shape for j in jobs if Path(RenderParams.of_row(j).loras[0].path) == marble)
    broker = Broker()
    assert feed(sessions, bucket, broker) == POLICY.backlog  # no worker yet: manifest order, both styles
    first = [Path(broker.take().job.params.loras[0].path) for _ in range(POLICY.backlog)]
    assert first[:2] == [oak, marble]
    with sessions.begin() as s:
        fleet.record_heartbeat(s, Heartbeat(worker="w1", device="cuda", vram_gb=8, queues=[queue],
                                            warm_shape=marble_shape), T0)
        s.execute(update(Job).values(published_at=None))  # as if those messages had expired
    broker = Broker()
    assert feed(sessions, bucket, broker) == POLICY.backlog
    assert all(Path(broker.take().job.params.loras[0].path) == marble for _ in range(POLICY.backlog))


def test_a_job_succeeds_once_with_its_verified_object_and_late_reports_change_nothing(
        database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\n")
    broker = Broker()
    feed(sessions, bucket, broker)
    task = broker.take()
    assert task.upload.uri == bucket.uri("b1/a.png") and task.job.attempt == 1
    assert report(sessions, bucket, render(task, "w1")) == "succeeded"  # no started report: it may be lost
    assert "already recorded" in report(sessions, bucket, render(task, "w1", b"other bytes"))  # delivered twice
    assert "stale" in report(sessions, bucket, Report(kind="started", job_id=task.job.job_id, attempt=1, worker="w2"))
    with sessions.begin() as s:
        [output] = s.scalars(select(Output)).all()
        assert (output.md5, output.worker) == (hashlib.md5(b"\x89PNG fake").hexdigest(), "w1")
    assert bucket.stat("b1/a.png").md5 == output.md5  # type: ignore[union-attr]  # the late upload got 412


def test_an_attempt_starts_when_the_worker_started_it_not_when_its_held_report_came(
        database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\n")
    broker = Broker()
    feed(sessions, bucket, broker)
    task = broker.take()
    held = Report(kind="started", job_id=task.job.job_id, attempt=1, worker="w1", held=0.8)  # in the outbox
    assert report(sessions, bucket, held, T0 + timedelta(seconds=5)) == "started"
    with sessions.begin() as s:
        assert s.scalar(select(Attempt.started_at)) == T0 + timedelta(seconds=4.2)


def each(record: Any) -> Any:
    """A group recorder's function that records its items one by one with `record(session, item)`."""
    return lambda session, items: [record(session, item) for item in items]


def test_reports_waiting_together_are_recorded_in_one_transaction_and_one_failure_costs_no_other(
        database_url: str, bucket: Bucket) -> None:
    """Group commit (dispatcher.recorder): while the recorder is busy, reports queue up and are then recorded in
    one transaction; a report that fails there fails alone, and its group's others are each recorded once."""
    sessions = setup(database_url, "id,prompt\n" + "".join(f"r{i},x\n" for i in range(8)))
    with sessions.begin() as s:
        job_ids = list(s.scalars(select(Job.id).order_by(Job.id)))
    entered, busy, bad = threading.Event(), threading.Event(), job_ids[-1]

    def record(session: Any, item: tuple[Report, Any]) -> str:
        if item[0].job_id == job_ids[0]:
            entered.set()
            busy.wait(timeout=30)  # the others arrive meanwhile
        if item[0].job_id == bad:
            raise ValueError("a report this dispatcher cannot record")
        return fleet.record_report(session, item[0], T0, POLICY, bucket, item[1])

    recorder = GroupRecorder[tuple[Report, Any]](sessions, each(record)).start()

    def receive(job_id: str) -> str:  # what a consumer thread of the dispatcher does with one report
        return fleet.receive_reports(sessions, [Report(kind="started", job_id=job_id, attempt=1, worker="w1")],
                                     lambda: T0, POLICY, bucket, lambda r, stored: recorder.submit((r, stored)))[0] \
            .result()

    with ThreadPoolExecutor(len(job_ids)) as pool:
        first = pool.submit(receive, job_ids[0])
        assert entered.wait(timeout=30)  # the first report is in the recorder's hands
        rest = [pool.submit(receive, job_id) for job_id in job_ids[1:]]
        while recorder.waiting.qsize() < len(rest):
            time.sleep(0.01)
        busy.set()
        assert first.result() == "started"
        assert [f.result() for f in rest[:-1]] == ["started"] * (len(job_ids) - 2)
        with pytest.raises(ValueError, match="cannot record"):
            rest[-1].result()
    # one transaction for the first, one for the six that went through with the failing one (after it failed,
    # one each): the six are recorded once each, the failing one not at all
    assert recorder.groups == 1 + (len(job_ids) - 2) and recorder.recorded == len(job_ids) - 1
    with sessions.begin() as s:
        assert dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all()) == {
            JobStatus.RUNNING: len(job_ids) - 1, JobStatus.QUEUED: 1}
        assert s.scalar(select(func.count()).select_from(Attempt)) == len(job_ids) - 1
    # and without the failing one, a queue of reports is one transaction, recorded in the order asked for (the
    # dispatcher's: by job id, so that two transactions never lock the same rows in opposite orders)
    seen: list[str] = []

    def noting(session: Any, item: tuple[Report, Any]) -> str:
        seen.append(item[0].job_id)
        return record(session, item)

    recorder = GroupRecorder[tuple[Report, Any]](sessions, each(noting), order=lambda item: item[0].job_id).start()
    entered.clear()
    busy.clear()
    with ThreadPoolExecutor(4) as pool:
        block = pool.submit(recorder, (Report(kind="started", job_id=job_ids[0], attempt=2, worker="w1"), None))
        assert entered.wait(timeout=30)
        stale = []
        for job_id in reversed(job_ids[1:4]):
            stale.append(pool.submit(recorder, (Report(kind="started", job_id=job_id, attempt=1, worker="w2"), None)))
            while recorder.waiting.qsize() < len(stale):  # queued in this order
                time.sleep(0.01)
        busy.set()
        assert "stale start" in block.result() and all("stale start" in f.result() for f in stale)
    assert (recorder.groups, recorder.recorded) == (2, 4)
    assert seen == job_ids[:4]


def test_transient_failures_back_off_then_die_after_attempts_on_two_workers(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\n")
    broker = Broker()
    now = T0
    for attempt, worker in enumerate(["w1", "w2", "w1"], start=1):
        assert feed(sessions, bucket, broker, now) == 1
        task = broker.take()
        assert task.job.attempt == attempt
        outcome = report(sessions, bucket, failed(task, worker, "error"), now)
        if attempt < 3:
            assert outcome == f"failed, retry in {10 * 2 ** (attempt - 1)} s"
            assert feed(sessions, bucket, broker, now) == 0  # backing off
            now += timedelta(seconds=10 * 2 ** (attempt - 1))
    assert outcome == "dead after 3 attempts on 2 workers"
    job = job_row(sessions, task.job.job_id)
    assert (job.status, job.error) == (JobStatus.DEAD, "boom (error)")


def test_a_resubmitted_dead_job_gets_a_fresh_attempt_budget(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\n")
    broker = Broker()
    now = T0
    outcomes = []
    for round_ in range(2):
        for worker in ["w1", "w2", "w1"]:
            feed(sessions, bucket, broker, now)
            outcomes.append(report(sessions, bucket, failed(broker.take(), worker, "error"), now))
            now += timedelta(minutes=5)
        if round_ == 0:  # the manifest submitted again
            with sessions.begin() as s:
                expansion = expand(parse_manifest(b"id,prompt\na,x\n", "m.csv"),
                                   Options(batch="b1", base_dir=Path.cwd()))
                store.record_batch(s, Batch(id="b2", name="b1", manifest="m.csv", manifest_sha256="0",
                                            created_at=now), expansion, now)
    assert [o.split(",")[0] for o in outcomes] == ["failed", "failed", "dead after 3 attempts on 2 workers"] * 2
    with sessions.begin() as s:
        assert s.scalar(select(func.count()).select_from(Attempt)) == 6  # the history is kept


def test_bad_input_is_not_retried(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\n")
    broker = Broker()
    feed(sessions, bucket, broker)
    assert report(sessions, bucket, failed(broker.take(), "w1", "bad_input")) == "failed: bad input, not retried"
    assert feed(sessions, bucket, broker) == 0


def test_out_of_memory_moves_the_job_to_a_bigger_card(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\n")
    with sessions.begin() as s:
        fleet.record_heartbeat(s, Heartbeat(worker="w8", device="cuda:RTX 3070", vram_gb=8,
                                            queues=["kiln.render.klein-4b.vram8"]), T0)
    broker = Broker()
    feed(sessions, bucket, broker)
    assert report(sessions, bucket, failed(broker.take(), "w8", "oom")) == \
        "out of memory on w8: moved to kiln.render.klein-4b.vram12"
    feed(sessions, bucket, broker)
    assert broker.sent[0][0] == "kiln.render.klein-4b.vram12"
    # The move is not charged: the job still gets its full attempts on the bigger cards, with the first backoff.
    now = T0
    for attempt, worker in enumerate(["w12", "w16", "w12"], start=2):
        task = broker.take()
        assert task.job.attempt == attempt
        outcome = report(sessions, bucket, failed(task, worker, "error"), now)
        now += timedelta(seconds=10 * 2 ** (attempt - 2))
        feed(sessions, bucket, broker, now)
        if attempt < 4:
            assert outcome == f"failed, retry in {10 * 2 ** (attempt - 2)} s"
    assert outcome == "dead after 3 attempts on 2 workers"
    with sessions.begin() as s:
        assert [a.status for a in s.scalars(select(Attempt).order_by(Attempt.number))] == [
            "oom", "failed", "failed", "failed"]


def test_a_worker_of_another_kiln_version_is_named_with_what_to_do(database_url: str) -> None:
    sessions = store.open_database(database_url)
    older = {"worker": "w-old", "device": "cuda", "vram_gb": 8, "queues": []}  # no protocol: before numbers
    with sessions.begin() as s:
        fleet.record_heartbeat(s, Heartbeat.model_validate({**older, "protocol": on_the_wire(older)}), T0)
        fleet.record_heartbeat(s, Heartbeat(worker="w-new", device="cuda", vram_gb=8, queues=[]), T0)
    with sessions.begin() as s:
        problems = {w.name: w.problem for w in s.scalars(select(Worker))}
    assert problems == {"w-new": None, "w-old": "this worker speaks Kiln message protocol 1 and this process "
                                                f"protocol {PROTOCOL}: install the same Kiln version on the "
                                                "dispatcher and every worker"}


def test_jobs_of_silent_workers_go_back_to_the_queue(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\n")
    broker = Broker()
    feed(sessions, bucket, broker)
    task = broker.take()
    with sessions.begin() as s:
        fleet.record_heartbeat(s, Heartbeat(worker="w1", device="cpu", vram_gb=8, queues=[]), T0)
    report(sessions, bucket, Report(kind="started", job_id=task.job.job_id, attempt=1, worker="w1"))
    with sessions.begin() as s:
        assert fleet.reap(s, T0 + timedelta(seconds=30), POLICY) == 0
        assert fleet.reap(s, T0 + timedelta(seconds=61), POLICY) == 1
    later = T0 + timedelta(seconds=62)
    feed(sessions, bucket, broker, later)
    retry = broker.take()
    assert retry.job.attempt == 2
    assert "stale" in report(sessions, bucket, render(task, "w1"), later)  # the silent worker woke up
    assert report(sessions, bucket, render(retry, "w2"), later).startswith("succeeded")
    with sessions.begin() as s:
        statuses = [a.status for a in s.scalars(select(Attempt).order_by(Attempt.number))]
    assert statuses == ["lost", "succeeded"]


def feeder(sessions, bucket: Bucket, broker: Broker) -> Callable[..., int]:
    """fed(later, queues=None): feed at T0 + later as the dispatcher's loop does, remembering across feeds which
    queues it saw empty."""
    empty_since: dict[str, datetime] = {}

    def fed(later: timedelta, queues: list[str] | None = None) -> int:
        with sessions.begin() as s:
            return fleet.feed(s, T0 + later, POLICY, bucket, broker.publish, lambda q: broker.depth.get(q, 0),
                              fleet.look(s, T0 + later, POLICY, queues), empty_since)

    return fed


def test_a_lost_or_expired_message_is_published_again(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\n")
    broker = Broker()
    fed = feeder(sessions, bucket, broker)
    assert fed(timedelta(0)) == 1
    broker.depth.clear()  # a worker took it (its started report not in yet), or Redis restarted without persistence
    assert fed(timedelta(seconds=30)) == 0  # empty for the first time: maybe a started report on its way
    assert fed(timedelta(seconds=33)) == 0
    assert fed(timedelta(seconds=36)) == 1  # still empty 6 s on, the job still published: lost
    broker.depth["kiln.render.klein-4b.vram8"] = 5  # the queue is not empty: only the TTL republishes
    assert fed(timedelta(minutes=10)) == 0
    assert fed(timedelta(minutes=16)) == 1


def test_a_queue_emptied_by_a_worker_whose_started_report_comes_late_is_not_published_again(
        database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\n")
    broker = Broker()
    fed = feeder(sessions, bucket, broker)
    assert fed(timedelta(0)) == 1
    task = broker.take()  # taken a minute later, as busy workers do
    assert fed(timedelta(seconds=60)) == 0
    # A feed that does not look at the queue (its tick found no queued jobs there) forgets what was seen of it:
    # seen empty again, it waits its 5 s afresh
    assert fed(timedelta(seconds=61), queues=[]) == 0
    assert fed(timedelta(seconds=70)) == 0
    report(sessions, bucket, Report(kind="started", job_id=task.job.job_id, attempt=1, worker="w1"))
    assert fed(timedelta(seconds=76)) == 0 and broker.sent == []


def batched(sessions, bucket: Bucket, broker: Broker, jobs: int, now: datetime = T0) -> list[list[str]]:
    """Feed with KILN_BATCH_SIZE=`jobs`: the row ids of each message published."""
    with sessions.begin() as s:
        fleet.feed(s, now, replace(POLICY, message_jobs=jobs), bucket, broker.publish, lambda q: broker.depth.get(q, 0))
    return [[t.job.row_id for t in RenderMessage.model_validate(p).tasks] for _, p in broker.sent]


def test_jobs_of_one_shape_go_out_together_and_a_message_never_mixes_shapes(database_url: str,
                                                                             bucket: Bucket) -> None:
    rows = "id,prompt,width,height,seed\n" + "".join(f"s{i},p{i},512,512,{i}\n" for i in range(7)) + \
        "big,q,1024,1024,9\nbig2,q,1024,1024,10\n"
    sessions = setup(database_url, rows)
    broker = Broker()
    # one consumer (none has beaten yet): messages of up to 4 jobs, a backlog of 2 messages per queue
    assert batched(sessions, bucket, broker, 4) == [["s0", "s1", "s2", "s3"], ["s4", "s5", "s6"], ["big"]]
    first = RenderMessage.model_validate(broker.sent[0][1])
    assert [t.job.params.seed for t in first.tasks] == [0, 1, 2, 3]  # each job its own seed, upload and token
    assert len({t.upload.url for t in first.tasks}) == 4 and len({t.token for t in first.tasks}) == 1
    assert first.protocol == PROTOCOL
    mixed = {**broker.sent[0][1], "tasks": broker.sent[0][1]["tasks"] + broker.sent[2][1]["tasks"]}
    with pytest.raises(ValidationError, match="mixes 2 shapes"):  # what a worker refuses, never renders
        RenderMessage.model_validate(mixed)


def test_messages_shrink_so_that_every_worker_on_a_queue_gets_work(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\n" + "".join(f"j{i},p{i}\n" for i in range(7)))
    with sessions.begin() as s:
        queue = s.scalar(select(Job.queue))
        for name in ("w1", "w2", "w3"):
            fleet.record_heartbeat(s, Heartbeat(worker=name, device="cuda", vram_gb=24, queues=[queue]), T0)
    # 7 jobs over 3 workers: messages of 3, not one of 7 and two workers idle
    assert batched(sessions, bucket, Broker(), 8) == [["j0", "j1", "j2"], ["j3", "j4", "j5"], ["j6"]]


def test_a_worker_holding_several_jobs_keeps_each_one_its_heartbeats_name(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\nb,y\n")
    broker = Broker()
    batched(sessions, bucket, broker, 2)
    tasks = broker.take_message().tasks
    for task in tasks:
        report(sessions, bucket, Report(kind="started", job_id=task.job.job_id, attempt=1, worker="w1"))
    a, b = (task.job.job_id for task in tasks)
    later = T0 + timedelta(seconds=61)
    with sessions.begin() as s:
        fleet.record_heartbeat(s, Heartbeat(worker="w1", device="cpu", vram_gb=8, queues=[], rendering=[b],
                                            storing=[a]), later)
        assert fleet.reap(s, later, POLICY) == 0
        fleet.record_heartbeat(s, Heartbeat(worker="w1", device="cpu", vram_gb=8, queues=[], rendering=[b]), later)
        assert fleet.reap(s, later, POLICY) == 1  # a is neither rendering nor storing, and unreported: given back
    assert job_row(sessions, a).status is JobStatus.QUEUED and job_row(sessions, b).status is JobStatus.RUNNING


@contextmanager
def statements_of(sessions) -> Iterator[list[str]]:
    """The first word of each statement the database is sent meanwhile."""
    statements: list[str] = []
    engine = sessions.kw["bind"]
    listen = lambda conn, cursor, statement, *rest: statements.append(statement.split()[0])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listen)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", listen)


def test_a_group_of_reports_is_recorded_in_a_few_statements_for_all(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\n" + "".join(f"j{i},p{i}\n" for i in range(8)))
    broker = Broker()
    batched(sessions, bucket, broker, 8)
    tasks = broker.take_message().tasks
    with statements_of(sessions) as statements:
        with sessions.begin() as s:
            started: list[tuple[Report, StoredObject | None]] = [
                (Report(kind="started", job_id=t.job.job_id, attempt=1, worker="w1"), None) for t in tasks]
            assert fleet.record_reports(s, started, T0, POLICY, bucket) == ["started"] * 8
        assert statements[-3:] == ["SELECT", "UPDATE", "INSERT"]  # locked, moved, attempts begun: for all eight
        statements.clear()
        finished = [render(t, "w1", f"png {t.job.row_id}".encode()) for t in tasks]
        with sessions.begin() as s:
            items = [(r, bucket.stat(t.job.output_key)) for r, t in zip(finished, tasks, strict=True)]
            assert fleet.record_reports(s, items, T0, POLICY, bucket) == ["succeeded"] * 8
        assert [w for w in statements if w != "BEGIN"] == ["SELECT", "UPDATE", "UPDATE", "SELECT", "INSERT"]
    with sessions.begin() as s:
        rows = s.execute(select(Output.job_id, Output.batch_id, Output.manifest_row, Output.md5)).all()
        attempts = s.execute(select(Attempt.status, func.count()).group_by(Attempt.status)).all()
    assert sorted((batch, row) for _, batch, row, _ in rows) == [("b1", i + 1) for i in range(8)]
    assert {md5 for *_, md5 in rows} == {hashlib.md5(f"png j{i}".encode()).hexdigest() for i in range(8)}
    assert attempts == [("succeeded", 8)]


def test_a_group_mixing_reports_on_one_job_records_each_as_it_would_alone(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\nb,y\nc,z\nd,w\n")
    broker = Broker()
    batched(sessions, bucket, broker, 4)
    a, b, c, d = broker.take_message().tasks
    done_a, done_b = render(a, "w1"), render(b, "w1", b"\x89PNG b")
    items = [(Report(kind="started", job_id=a.job.job_id, attempt=1, worker="w1"), None),
             (done_a, bucket.stat(a.job.output_key)),  # the same job again, in the same group
             (done_b, bucket.stat(b.job.output_key)),  # its started report never came: started and finished at once
             (Report(kind="started", job_id=c.job.job_id, attempt=1, worker="w1"), None),
             (Report(kind="started", job_id=c.job.job_id, attempt=1, worker="w2"), None),  # a stale duplicate
             (failed(d, "w1", "error"), None),  # failed before its start was recorded
             (Report(kind="started", job_id="nope", attempt=1, worker="w1"), None)]
    with sessions.begin() as s:
        outcomes = fleet.record_reports(s, items, T0, POLICY, bucket)
    assert outcomes == ["started", "succeeded", "succeeded", "started", "stale start (job is running, attempt 1)",
                        "failed, retry in 10 s", "unknown job"]
    assert [job_row(sessions, t.job.job_id).status for t in (a, b, c, d)] == [
        JobStatus.SUCCEEDED, JobStatus.SUCCEEDED, JobStatus.RUNNING, JobStatus.QUEUED]
    with sessions.begin() as s:  # the job moved on before its result came: nothing is written for it
        s.execute(update(Job).where(Job.id == c.job.job_id).values(attempts=2))
    with sessions.begin() as s:
        assert fleet.record_reports(s, [(render(c, "w1"), bucket.stat(c.job.output_key)),
                                        (Report(kind="started", job_id=c.job.job_id, attempt=3, worker="w2"), None)],
                                    T0, POLICY, bucket) == [
            "stale result (job is running, attempt 2, worker w1)", "stale start (job is running, attempt 2)"]


def test_jobs_tried_before_go_out_alone_so_a_job_that_kills_its_worker_costs_its_mates_once(
        database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\nb,y\nc,z\n")
    broker = Broker()
    assert batched(sessions, bucket, broker, 3) == [["a", "b", "c"]]
    for task in broker.take_message().tasks:
        report(sessions, bucket, Report(kind="started", job_id=task.job.job_id, attempt=1, worker="w1"))
    later = T0 + timedelta(seconds=61)  # w1 never beat again: one of them killed it, all three are lost
    with sessions.begin() as s:
        assert fleet.reap(s, later, POLICY) == 3
    assert batched(sessions, bucket, broker, 3, later) == [["a"], ["b"], ["c"]]


def test_a_message_of_reports_records_each_and_a_single_report_of_an_older_worker_still_counts(
        database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\nb,y\nc,z\n")
    broker = Broker()
    batched(sessions, bucket, broker, 3)
    tasks = broker.take_message().tasks
    started = Reports(reports=[Report(kind="started", job_id=t.job.job_id, attempt=1, worker="w1") for t in tasks])
    finished = Reports(reports=[render(t, "w1", f"png {t.job.row_id}".encode()) for t in tasks[:2]])
    for payload in (started.model_dump(mode="json"), finished.model_dump(mode="json")):
        answers = fleet.receive_reports(sessions, reports_in(payload), lambda: T0, POLICY, bucket)
        assert all(a.result() in ("started", "succeeded") for a in answers)
    last = render(tasks[2], "w1")
    assert reports_in(last.model_dump(mode="json")) == [last]  # a report alone, as workers before protocol 3 sent
    assert report(sessions, bucket, last) == "succeeded"
    assert all(job_row(sessions, t.job.job_id).status is JobStatus.SUCCEEDED for t in tasks)
    with pytest.raises(ValidationError):
        reports_in({"reports": []})


def test_paused_batches_wait_and_priorities_go_first(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\nlow,x\n", "low")
    expansion = expand(parse_manifest(b"id,prompt\nhigh,y\n", "m.csv"), Options(batch="high", base_dir=Path.cwd()))
    paused = expand(parse_manifest(b"id,prompt\nheld,z\n", "m.csv"), Options(batch="held", base_dir=Path.cwd()))
    with sessions.begin() as s:
        store.record_batch(s, Batch(id="high", name="h", manifest="m", manifest_sha256="0", created_at=T0,
                                    priority=5, paused=False), expansion, T0)
        store.record_batch(s, Batch(id="held", name="p", manifest="m", manifest_sha256="0", created_at=T0,
                                    priority=9, paused=True), paused, T0)
    broker = Broker()
    feed(sessions, bucket, broker)
    assert [t.job.row_id for _, p in broker.sent for t in RenderMessage.model_validate(p).tasks] == ["high", "low"]


def test_a_job_two_batches_ask_for_goes_out_at_the_higher_priority_of_those_not_paused(database_url: str) -> None:
    sessions = setup(database_url, "id,prompt\na,x\nb,y\nc,z\n", "old")
    later = expand(parse_manifest(b"id,prompt\nd,w\nb,y\n", "m.csv"), Options(batch="old", base_dir=Path.cwd(),
                                                                               non_commercial=True))
    with sessions.begin() as s:
        store.record_batch(s, Batch(id="new", name="new", manifest="m.csv", manifest_sha256="0",
                                    created_at=T0 + timedelta(minutes=1)), later, T0)

    def order() -> list[str]:
        with sessions.begin() as s:
            queue = s.scalar(select(Job.queue).limit(1))
            assert queue is not None
            return [s.get_one(BatchJob, (batch, job.id)).row_id for job in fleet._next_jobs(s, queue, T0, 10)
                    for batch in [store.batch_rows(s, [job.id])[job.id][1].id]]

    assert order() == ["a", "b", "c", "d"]  # oldest batch first, in manifest order; b keeps its first place
    with sessions.begin() as s:
        usecases.set_priority(s, "new", 5)
    assert order() == ["b", "d", "a", "c"]
    with sessions.begin() as s:
        usecases.pause(s, "new", True)  # b is still asked for by the old batch, at its priority
    assert order() == ["a", "b", "c"]
    with sessions.begin() as s:
        usecases.pause(s, "old", True)
    assert order() == []
    with sessions.begin() as s:
        usecases.pause(s, "new", False)
    assert order() == ["b", "d"]


def test_a_key_holding_another_jobs_image_is_not_overwritten(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,first prompt\n")
    broker = Broker()
    feed(sessions, bucket, broker)
    report(sessions, bucket, render(broker.take(), "w1", b"first"))
    edited = expand(parse_manifest(b"id,prompt\na,edited prompt\n", "m.csv"), Options(batch="b1", base_dir=Path.cwd()))
    with sessions.begin() as s:
        store.record_batch(s, Batch(id="b2", name="b1", manifest="m", manifest_sha256="0", created_at=T0), edited, T0)
    feed(sessions, bucket, broker)
    outcome = report(sessions, bucket, render(broker.take(), "w1", b"second"))
    assert outcome == "failed: bad input, not retried"
    assert bucket.stat("b1/a.png").md5 == hashlib.md5(b"first").hexdigest()  # type: ignore[union-attr]
    with sessions.begin() as s:
        error = s.scalar(select(Job.error).where(Job.prompt == "edited prompt"))
    assert "already holds the image of job" in (error or "")


def test_status_names_jobs_that_no_registered_worker_fits_grouped_by_why(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt,model,width,height\nwide,w,klein-9b,1024,1072\n"
                                   "small,y,klein-4b,1024,1024\nbig,x,klein-9b,1024,1024\nbig2,z,klein-9b,1024,1024\n")
    with sessions.begin() as s:
        fleet.record_heartbeat(s, Heartbeat(worker="w8", device="cuda", vram_gb=8,
                                            queues=["kiln.render.klein-4b.vram8"]), T0)
        assert fleet.unfit_jobs(s, "b1") == [  # the largest group first, each with its first row
            ("needs a 16 GB card for klein-9b at 1.05 MP; the largest worker takes 8 GB work", 2, "big"),
            ("needs a 16 GB card for klein-9b at 1.10 MP; the largest worker takes 8 GB work", 1, "wide")]


def test_the_tick_finds_the_queues_with_queued_jobs_and_counts_waiting_work_up_to_a_cap(
        database_url: str, bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = "id,prompt,model\nbig,x,klein-9b\n" + "".join(f"s{i},y,klein-4b\n" for i in range(3))
    sessions = setup(database_url, rows)
    monkeypatch.setattr(fleet, "WAITING_COUNTED", 2)
    small, big = "kiln.render.klein-4b.vram8", "kiln.render.klein-9b.vram16"
    with sessions.begin() as s:
        fleet.record_heartbeat(s, Heartbeat(worker="w24", device="cuda", vram_gb=24, queues=[small, big, "k.x"]), T0)
        assert fleet.queued_queues(s) == [small, big]
        assert fleet.waiting(s, T0) == {small: 2, big: 1, "k.x": 0}  # 3 small jobs wait: "at least 2" is enough
        s.execute(update(Job).where(Job.model == "klein-9b").values(status=JobStatus.SUCCEEDED))
        assert fleet.queued_queues(s) == [small]
        assert fleet.waiting(s, T0) == {small: 2, big: 0, "k.x": 0}


def test_a_workers_fault_sends_the_job_to_another_worker_uncharged_and_status_says_who_has_the_model(
        database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt,model\na,x,klein-4b\nb,y,klein-9b\n")
    broker = Broker()
    feed(sessions, bucket, broker)
    with sessions.begin() as s:
        assert fleet.waiting(s, T0) == {"kiln.render.klein-4b.vram8": 1, "kiln.render.klein-9b.vram16": 1}
    task = next(t for t in (broker.take(), broker.take()) if t.job.params.model == "klein-4b")
    assert report(sessions, bucket, failed(task, "w1", "worker")) == \
        "the worker's fault: queued again for another worker, nothing charged"
    with sessions.begin() as s:  # w1 has no klein-4b now; w2 has only klein-9b
        fleet.record_heartbeat(s, Heartbeat(worker="w1", device="cuda", vram_gb=16, queues=[], models=[],
                                            unserved={"klein-4b": "its weights are corrupt"}), T0)
        fleet.record_heartbeat(s, Heartbeat(worker="w2", device="cuda", vram_gb=16, models=["klein-9b"],
                                            queues=["kiln.render.klein-9b.vram16"]), T0)
        assert fleet.unfit_jobs(s, "b1") == [("no worker has klein-4b: start one with `kiln worker --models "
                                              "klein-4b` (w1: its weights are corrupt)", 1, "a")]
        assert fleet.waiting(s, T0)["kiln.render.klein-4b.vram8"] == 1  # at once, no backoff
    feed(sessions, bucket, broker)
    again = broker.take()
    assert (again.job.job_id, again.job.attempt) == (task.job.job_id, 2)
    assert report(sessions, bucket, render(again, "w3")).startswith("succeeded")
    with sessions.begin() as s:
        assert [a.status for a in s.scalars(select(Attempt).where(Attempt.job_id == task.job.job_id)
                                            .order_by(Attempt.number))] == ["worker", "succeeded"]


def test_a_job_whose_gpu_process_died_goes_back_though_its_worker_still_beats(database_url: str,
                                                                                bucket: Bucket) -> None:
    sessions, task = started(database_url, bucket)
    later = T0 + timedelta(seconds=61)
    with sessions.begin() as s:  # a fresh GPU child beats, busy with nothing
        fleet.record_heartbeat(s, Heartbeat(worker="w1", device="cpu", vram_gb=8, queues=[]), later)
        assert fleet.reap(s, later, POLICY) == 1
        error = s.scalar(select(Attempt.error).where(Attempt.job_id == task.job.job_id))
    assert error == "worker w1 stopped working on it (its process died)"
    assert job_row(sessions, task.job.job_id).status is JobStatus.QUEUED


def test_nobody_is_judged_by_heartbeats_until_they_were_heard_for_a_worker_timeout(database_url: str,
                                                                                   bucket: Bucket) -> None:
    sessions, task = started(database_url, bucket)
    later = T0 + timedelta(seconds=61)  # the worker's last heartbeat is from before the broker went away
    reaped = []
    for heard_since in (later - timedelta(seconds=1), later - POLICY.worker_timeout):
        with sessions.begin() as s:
            reaped.append(fleet.reap(s, later, POLICY, heard_since))
    assert reaped == [0, 1]  # just back: it may have beaten all along; heard for a timeout since: silent
    with sessions.begin() as s:
        assert s.scalar(select(Attempt.error)) == "worker w1 went silent"


def test_the_time_limit_holds_while_heartbeats_cannot_be_heard(database_url: str, bucket: Bucket) -> None:
    sessions, task = started(database_url, bucket)
    now = T0 + POLICY.time_limit + POLICY.worker_timeout + timedelta(seconds=1)
    with sessions.begin() as s:
        assert fleet.reap(s, now, POLICY, heard_since=now) == 1
        assert s.scalar(select(Attempt.error)) == "worker w1 ran past the 1800 s time limit"


def test_a_job_whose_image_is_still_uploading_while_its_worker_renders_the_next_is_not_taken_back(
        database_url: str, bucket: Bucket) -> None:
    sessions, task = started(database_url, bucket)
    later = T0 + timedelta(seconds=61)  # a slow upload: the job's last word is a minute old
    with sessions.begin() as s:
        fleet.record_heartbeat(s, Heartbeat(worker="w1", device="cpu", vram_gb=8, queues=[], rendering=["next"],
                                            storing=[task.job.job_id]), later)
        assert fleet.reap(s, later, POLICY) == 0
        fleet.record_heartbeat(s, Heartbeat(worker="w1", device="cpu", vram_gb=8, queues=[], rendering=["next"]),
                               later)  # no longer storing it, and no report came: its process died meanwhile
        assert fleet.reap(s, later, POLICY) == 1
    assert job_row(sessions, task.job.job_id).status is JobStatus.QUEUED


def test_no_job_stays_running_past_its_time_limit_whatever_the_heartbeats_say(database_url: str,
                                                                              bucket: Bucket) -> None:
    sessions, task = started(database_url, bucket)
    limit = POLICY.time_limit + POLICY.worker_timeout
    reaped = []
    for now in (T0 + limit - timedelta(seconds=1), T0 + limit + timedelta(seconds=1)):
        with sessions.begin() as s:  # a live worker, beating, that still says it is on the job: a hung render
            fleet.record_heartbeat(s, Heartbeat(worker="w1", device="cpu", vram_gb=8, queues=[],
                                                rendering=[task.job.job_id]), now)
            reaped.append(fleet.reap(s, now, POLICY))
    assert reaped == [0, 1] and job_row(sessions, task.job.job_id).status is JobStatus.QUEUED
    with sessions.begin() as s:
        assert s.scalar(select(Attempt.error)) == "worker w1 ran past the 1800 s time limit"


def test_a_job_whose_report_is_in_hand_is_not_reaped_while_the_report_waits(database_url: str,
                                                                            bucket: Bucket) -> None:
    sessions, task = started(database_url, bucket)
    finished = render(task, "w1")
    reaped = []
    with sessions.begin() as s:
        # the report arrived (with one on a job this database does not know); storage has not confirmed the upload
        stray = Report(kind="finished", job_id="0" * 32, attempt=1, worker="w1")
        assert fleet.touch(s, [finished, stray], T0) == {(task.job.job_id, 1): task.job.output_key, ("0" * 32, 1): None}
    for now in (T0 + timedelta(minutes=5), T0 + POLICY.report_hold + timedelta(seconds=61)):
        with sessions.begin() as s:  # the worker lives and is done with the job
            fleet.record_heartbeat(s, Heartbeat(worker="w1", device="cpu", vram_gb=8, queues=[]), now)
            reaped.append(fleet.reap(s, now, POLICY))
    assert reaped == [0, 1]  # held while the report is retried; given back once it would have been dropped


def test_a_job_that_keeps_killing_its_workers_goes_dead(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\n")
    broker = Broker()
    now = T0
    for worker in ["w1", "w2", "w1"]:
        feed(sessions, bucket, broker, now)
        task = broker.take()
        report(sessions, bucket, Report(kind="started", job_id=task.job.job_id, attempt=task.job.attempt,
                                        worker=worker), now)
        now += timedelta(seconds=61)
        with sessions.begin() as s:
            assert fleet.reap(s, now, POLICY) == 1
    job = job_row(sessions, task.job.job_id)
    assert (job.status, job.attempts) == (JobStatus.DEAD, 3)
    assert job.error == "lost 3 times: worker w1 went silent"


def test_publishing_stops_after_three_failed_storage_probes_and_resumes_on_one_success() -> None:
    class FlakyBucket:
        def __init__(self, answers: list[str | None]) -> None:
            self.answers, self.probes = answers, 0

        def reachable(self) -> str | None:
            self.probes += 1
            return self.answers.pop(0)

    now = [100.0]
    bucket = FlakyBucket([None, "503", "503", "503", "503", None, None])
    gate = StorageGate(bucket, lambda: now[0])  # type: ignore[arg-type]
    assert gate.open() and bucket.probes == 1
    assert gate.open() and bucket.probes == 1  # healthy: looked at again only after PROBE_SECONDS
    now[0] += 5
    assert [gate.open() for _ in range(4)] == [True, True, False, False]  # a hiccup is not an outage
    assert gate.open() and bucket.probes == 6  # one success ends it
    now[0] += 5
    assert gate.open() and bucket.probes == 7


def test_cancel_and_pause_reach_messages_already_published(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\nb,y\n")
    broker = Broker()
    marked: list[str] = []
    feed(sessions, bucket, broker)
    first, second = broker.take(), broker.take()
    assert first.token == T0.isoformat()
    with sessions.begin() as s:
        usecases.pause(s, "b1", True)  # `kiln batch pause`
        assert fleet.withdraw(s, marked.append) == 2
        assert fleet.withdraw(s, marked.append) == 0  # told once
    assert sorted(marked) == sorted(unwanted_key(t.job.job_id, t.token) for t in (first, second))  # any order
    later = T0 + timedelta(seconds=5)
    assert feed(sessions, bucket, broker, later) == 0  # paused: nothing goes out
    with sessions.begin() as s:
        usecases.pause(s, "b1", False)  # `kiln batch resume`
    assert feed(sessions, bucket, broker, later) == 2
    again = broker.take()
    assert again.job.job_id == first.job.job_id and again.token == later.isoformat()  # a new publication
    with sessions.begin() as s:
        assert store.cancel_queued(s, "b1", later) == 2  # `kiln batch cancel`
        assert fleet.withdraw(s, marked.append) == 2
    assert sorted(marked[-2:]) == sorted(unwanted_key(t.job.job_id, later.isoformat()) for t in (first, second))


def test_a_job_withdrawn_while_it_rendered_goes_back_uncharged(database_url: str, bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\n")
    broker = Broker()
    feed(sessions, bucket, broker)
    task = broker.take()
    outcome = report(sessions, bucket, failed(task, "w1", "withdrawn"))
    assert outcome.startswith("withdrawn while it rendered: queued again")
    with sessions.begin() as s:
        assert s.scalar(select(Attempt.status)) == "withdrawn"
    feed(sessions, bucket, broker)
    assert broker.take().job.attempt == 2


def test_an_image_that_landed_after_its_job_was_cancelled_is_recorded_not_orphaned(database_url: str,
                                                                                   bucket: Bucket) -> None:
    sessions = setup(database_url, "id,prompt\na,x\nb,y\n")
    broker = Broker()
    feed(sessions, bucket, broker)
    landed, nothing = broker.take(), broker.take()
    with sessions.begin() as s:
        assert store.cancel_queued(s, "b1", T0) == 2  # before either worker's started report was recorded
    assert report(sessions, bucket, render(landed, "w1")).startswith("succeeded")  # its upload beat the cancel
    assert "stale" in report(sessions, bucket, failed(nothing, "w2", "withdrawn"))
    with sessions.begin() as s:
        assert s.scalar(select(Job.status).where(Job.id == landed.job.job_id)) is JobStatus.SUCCEEDED
        assert s.scalar(select(Job.status).where(Job.id == nothing.job.job_id)) is JobStatus.CANCELLED
        assert s.scalar(select(func.count()).select_from(Output)) == 1


def test_the_reports_benchmark_records_each_job_started_and_succeeded(database_url: str) -> None:
    from benchmarks.reports import measure

    cpu_ms, wall_ms = measure(database_url, jobs=10, group=4)
    assert cpu_ms > 0 and wall_ms > 0
    with store.open_database(database_url).begin() as s:
        assert dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all()) == {
            JobStatus.SUCCEEDED: 10}
        assert s.scalar(select(func.count()).select_from(Output)) == 10


@pytest.mark.parametrize("connections", [4, 24])
def test_the_dispatchers_storage_checks_side_by_side_each_keep_their_connection(
        bucket: Bucket, connections: int, caplog: pytest.LogCaptureFixture) -> None:
    # The dispatcher's report consumers check uploads at once; a pool smaller than they are opens a connection
    # for each call past it and throws it away (urllib3 says so), which costs CPU and a handshake on every check.
    sized = Bucket(f"s3://{bucket.name}/out", str(bucket.client.meta.endpoint_url), connections=connections)
    start = threading.Barrier(16)

    def check(_: int) -> None:
        start.wait()
        for _ in range(5):
            assert sized.stat("nothing-here.png") is None

    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"), ThreadPoolExecutor(16) as threads:
        list(threads.map(check, range(16)))
    full = [r for r in caplog.records if "Connection pool is full" in r.getMessage()]
    assert bool(full) == (connections < 16), [r.getMessage() for r in full][:3]


def test_a_ticks_heartbeats_are_recorded_in_one_update_for_all(database_url: str) -> None:
    sessions = setup(database_url, "id,prompt\na,x\n")
    beats = [(Heartbeat(worker=f"w{i}", device="cuda", vram_gb=8, queues=["q"], rendering=[f"j{i}"], step=i, steps=4),
              T0 + timedelta(seconds=i)) for i in range(6)]
    with sessions.begin() as s:
        fleet.record_heartbeats(s, beats[:2])  # two known workers, four new
    with statements_of(sessions) as statements, sessions.begin() as s:
        fleet.record_heartbeats(s, beats)
    assert [w for w in statements if w != "BEGIN"] == ["SELECT", "INSERT", "UPDATE"]  # the new inserted in one
    with sessions.begin() as s:
        seen = {w.name: (w.last_seen, w.rendering, w.step) for w in s.scalars(select(Worker))}
    assert seen == {f"w{i}": (T0 + timedelta(seconds=i), [f"j{i}"], f"{i}/4") for i in range(6)}


def test_the_dispatchers_bookkeeping_publishes_tells_waiting_counts_and_tops_up_on_reports(
        database_url: str, bucket: Bucket, tmp_path: Path) -> None:
    """dispatcher.service.Bookkeeping, in process, on a real Redis and Celery: one tick publishes a backlog to the
    render queue and the waiting count beside it; a worker taking a message (a report read) tops the queue up."""
    sessions = setup(database_url, "id,prompt\n" + "".join(f"{i},x\n" for i in range(6)))
    with redis_server(tmp_path) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        broker = redis.Redis.from_url(url)
        books = Bookkeeping(KilnSettings(broker_url=url), sessions, lambda: T0, POLICY, bucket, broker,
                            make_app(url))
        books.tick()
        [queue] = books.outlook.queues
        assert broker.llen(queue) == POLICY.backlog  # one backlog: no worker consumes the queue yet
        assert int(broker.get(waiting_key(queue)) or -1) == 6  # published or not, all six wait for a worker
        broker.rpop(queue)  # a worker takes a message...
        with sessions.begin() as s:
            [taken] = s.scalars(select(Job).where(Job.published_at.is_not(None)).limit(1))
            fleet.record_reports(s, [(Report(kind="started", job_id=taken.id, attempt=1, worker="w1"), None)],
                                 T0, POLICY, bucket)
        books.top_up()  # ...and its report, read, tops the queue up before the next tick
        assert broker.llen(queue) == POLICY.backlog
        with sessions.begin() as s:
            assert s.scalar(select(func.count()).where(Job.published_at.is_not(None))) == POLICY.backlog + 1


def test_a_tick_with_the_database_away_says_so_and_the_next_one_goes_on(
        bucket: Bucket, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sessions = setup(f"sqlite:///{tmp_path / 'kiln.db'}", "id,prompt\na,x\n")
    with redis_server(tmp_path) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        books = Bookkeeping(KilnSettings(broker_url=url), sessions, lambda: T0, POLICY, bucket,
                            redis.Redis.from_url(url), make_app(url))
        books.sessions = sessionmaker(create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"))
        with caplog.at_level(logging.WARNING, "kiln.dispatcher"):
            books.tick()  # nothing listens there: said, not raised
        assert "bookkeeping: the database is away (OperationalError: " in caplog.text and not books.outlook.queues
        books.sessions = sessions  # back
        books.tick()
        assert books.outlook.queues and redis.Redis.from_url(url).llen(books.outlook.queues[0]) == 1
