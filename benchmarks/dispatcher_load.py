"""Benchmark: the dispatcher under a big fleet's load. A simulation of the workers, named as one: N simulated
workers (threads of this process) take real render messages from the real Redis queue, upload a small PNG
through each job's signed URL to the S3 test server, and send the real started/finished reports and heartbeats a
`kiln worker` sends (through the worker's own outbox, so a started report rides with a finished one as it does
on a worker); what is measured is real: `kiln dispatcher` (its own process) recording them in PostgreSQL,
checking each upload in the bucket, and feeding the queue, with a 100,000-job batch recorded.

With --batch-size N, the dispatcher puts N jobs in a render message and a simulated worker sends their started
and finished reports in one message, as a `kiln worker` does. Prints, over the measured window: reports recorded
per second (two per job: started, finished), report messages the dispatcher consumed, Redis memory (the peak of
used_memory), and how stale the workers' last_seen got (heartbeats every --heartbeat seconds: a
staleness well past that means heartbeats waited behind reports).

    .venv/bin/python -m benchmarks.dispatcher_load --workers 50 --jobs 100000 --seconds 60
    .venv/bin/python -m benchmarks.dispatcher_load --workers 50 --jobs 100000 --seconds 60 --batch-size 4
    # goals: 200 reports/s on PostgreSQL, Redis under 50 MB, heartbeats never delayed by report work

Needs PostgreSQL (KILN_TEST_POSTGRES_URL, as the tests) and redis-server; starts moto's S3 server itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import threading
import time
from base64 import b64decode
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from redis import Redis
from sqlalchemy import func, select

from benchmarks.cpu import cpu_by_process
from benchmarks.scale import postgres_schema
from schemas.job import JobStatus, RenderResult
from schemas.messages import REPORTS_STREAM, Heartbeat, RenderMessage, RenderTask, Report
from schemas.tables import Job, Worker
from tests.fleet_harness import running_fleet
from worker.outbox import LINGER_SECONDS, Outbox, send_heartbeat, send_reports
from worker.upload import SignedUpload

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


class SimulatedWorker(threading.Thread):
    """One simulated worker: pops a render message, reports it started, 'renders' for `render_seconds` a job while
    the last message's jobs upload a PNG each through their signed URLs and are reported finished (a worker's
    writer thread); a heartbeat every `heartbeat` seconds."""

    def __init__(self, name: str, queue: str, broker_url: str, render_seconds: float, heartbeat: float,
                 stop: threading.Event, linger: float = LINGER_SECONDS) -> None:
        super().__init__(name=name, daemon=True)
        self.queue, self.stop = queue, stop
        self.render_seconds, self.heartbeat = render_seconds, heartbeat
        self.redis = Redis.from_url(broker_url)
        self.done = 0
        self.current: list[str] = []
        self.storing: list[str] = []
        self.beat_at = 0.0
        self.messages = 0  # report messages sent
        self.outbox = Outbox(self.report, linger)

    def report(self, reports: list[Report]) -> None:
        send_reports(self.redis, reports)
        self.messages += 1

    def beat(self) -> None:
        beat = Heartbeat(worker=self.name, device="simulated", vram_gb=24.0, queues=[self.queue], models=["tiny"],
                         rendering=self.current, storing=self.storing)
        send_heartbeat(self.redis, beat)
        self.beat_at = time.monotonic()

    def run(self) -> None:
        self.beat()
        rendered: list[RenderTask] = []  # the last message's jobs: they upload while the next message renders
        while not self.stop.is_set():
            if time.monotonic() - self.beat_at >= self.heartbeat:
                self.beat()
            popped = self.redis.brpop([self.queue], timeout=1)
            if popped is None:
                rendered = self.store(rendered)  # nothing to render: the writer finishes the last message
                continue
            envelope = json.loads(popped[1])
            args, _, _ = json.loads(b64decode(envelope["body"]))  # Celery's message protocol 2: (args, kwargs, embed)
            tasks = RenderMessage.model_validate(args[0]).tasks
            self.current = [t.job.job_id for t in tasks]
            self.outbox.started([Report(kind="started", job_id=t.job.job_id, attempt=t.job.attempt, worker=self.name)
                                 for t in tasks])
            began = time.monotonic()
            rendered = self.store(rendered)  # as a worker's writer thread does, during this message's render
            time.sleep(max(0.0, self.render_seconds * len(tasks) - (time.monotonic() - began)))
            self.current, self.storing, rendered = [], self.current, tasks
        self.store(rendered)

    def store(self, tasks: list[RenderTask]) -> list[RenderTask]:
        """Upload the jobs' images and report them finished; returns what is left to store (nothing)."""
        finished = []
        for t in tasks:
            job = t.job
            uri = SignedUpload(t.upload, 10, 30).put(job.output_key, PNG, job.job_id)
            result = RenderResult(job_id=job.job_id, attempt=job.attempt, ok=True, worker=self.name,
                                  seconds=self.render_seconds, uri=uri, sha256=hashlib.sha256(PNG).hexdigest(),
                                  md5=hashlib.md5(PNG).hexdigest(), bytes=len(PNG), plan="simulated")
            finished.append(Report(kind="finished", job_id=job.job_id, attempt=job.attempt, worker=self.name,
                                   result=result))
        if finished:
            self.outbox.finished(finished)
        self.storing = []
        self.done += len(tasks)
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=100_000, help="the batch recorded before the workers start")
    parser.add_argument("--seconds", type=float, default=60, help="the measured window")
    parser.add_argument("--render-seconds", type=float, default=0.2, help="each simulated render")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="seconds between a worker's heartbeats")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="the dispatcher's KILN_BATCH_SIZE: jobs per render message, and per report message")
    parser.add_argument("--linger", type=float, default=LINGER_SECONDS,
                        help="how long a started report waits for company (the worker's outbox); 0: alone, to compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with running_fleet(tmp, postgres_schema(), tmp / "cache") as fleet:
            measure(fleet, tmp, args)


def measure(fleet: Any, tmp: Path, args: argparse.Namespace) -> None:
    manifest = tmp / "load.csv"
    manifest.write_text("id,prompt\n" + "".join(f"p{i},product {i}\n" for i in range(args.jobs)), encoding="utf-8")
    started = time.perf_counter()
    fleet.kiln("submit", str(manifest), "--model", "tiny", "--max-rows", str(args.jobs), "--max-jobs",
               str(args.jobs), "--max-bytes", str(64 * args.jobs + 2**20))
    print(f"recorded {args.jobs:,} jobs in {time.perf_counter() - started:.1f} s", flush=True)
    with fleet.engine.connect() as conn:
        queues = conn.scalars(select(Job.queue).distinct()).all()
    assert len(queues) == 1 and queues[0], queues
    fleet.dispatcher(KILN_WORKER_TIMEOUT_SECONDS=str(max(8.0, 4 * args.heartbeat)),
                     KILN_BATCH_SIZE=str(args.batch_size))
    stop = threading.Event()
    workers = [SimulatedWorker(f"sim-{i:02d}", queues[0], fleet.env["KILN_BROKER_URL"], args.render_seconds,
                               args.heartbeat, stop, args.linger) for i in range(args.workers)]
    for w in workers:
        w.start()
    redis = Redis.from_url(fleet.env["KILN_BROKER_URL"])

    def succeeded() -> int:
        with fleet.engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.SUCCEEDED)) or 0

    time.sleep(10)  # warm-up: workers registered, the queue fed
    ours = {os.getpid(): "simulated workers"}
    first, begin, machine = succeeded(), time.monotonic(), cpu_by_process(ours)
    messages = sum(w.messages for w in workers)
    memory, stale, backlog = [], [], []
    while time.monotonic() - begin < args.seconds:
        time.sleep(0.5)
        memory.append(int(redis.info("memory")["used_memory"]))
        backlog.append(int(redis.xlen(REPORTS_STREAM)))
        now = datetime.now(UTC).replace(tzinfo=None)
        with fleet.engine.connect() as conn:
            seen = conn.execute(select(Worker.name, Worker.last_seen).where(Worker.name.like("sim-%"))).all()
        stale += [(now - last).total_seconds() for _, last in seen if last is not None]
    recorded = succeeded() - first
    window = time.monotonic() - begin
    machine = {kind: seconds - machine.get(kind, 0.0) for kind, seconds in cpu_by_process(ours).items()}
    cpu = machine.get("dispatcher", 0.0)
    messages = sum(w.messages for w in workers) - messages
    stop.set()
    for w in workers:
        w.join(timeout=5)
    sent = sum(w.done for w in workers)
    stale.sort()
    print(f"{args.workers} simulated workers, {args.render_seconds} s per simulated render, "
          f"{args.batch_size} job{'s' * (args.batch_size > 1)} per message, heartbeats every "
          f"{args.heartbeat} s, {window:.0f} s measured, PostgreSQL, Redis and moto on loopback:")
    print(f"  reports recorded: {2 * recorded / window:.0f} per second ({recorded / window:.0f} jobs/s; the workers "
          f"finished {sent} jobs in all) (goal: 200)")
    print(f"  report messages sent: {messages / window:.0f} per second, {2 * recorded / max(messages, 1):.1f} reports "
          "each")
    print(f"  the dispatcher's own CPU: {1000 * cpu / max(2 * recorded, 1):.1f} ms per report, "
          f"{cpu / window:.2f} cores (one core would record {2 * recorded / max(cpu, 1e-9):.0f} reports per second)")
    jobs = max(recorded, 1)
    cores = psutil.cpu_count() or 1
    print(f"  the machine's CPU ({cores} cores): " + ", ".join(
        f"{kind} {seconds / window:.2f} cores ({1000 * seconds / jobs:.1f} ms a job)"
        for kind, seconds in sorted(machine.items(), key=lambda x: -x[1]) if seconds > 0.05))
    harness = machine.get("moto", 0.0) + machine.get("simulated workers", 0.0)
    budget = 1000 * cores / 100 - 1000 * harness / jobs
    print(f"  200 reports/s is 100 jobs/s: {1000 * cores / 100:.0f} ms of this machine's CPU a job, of "
          f"which the harness (moto, the simulated workers) takes {1000 * harness / jobs:.1f} ms: {budget:.1f} ms "
          f"a job would be left to the dispatcher, PostgreSQL and Redis, which take "
          f"{1000 * (sum(machine.values()) - harness) / jobs:.1f} ms now")
    print(f"  report messages waiting in Redis (not yet recorded): median {sorted(backlog)[len(backlog) // 2]}, "
          f"max {max(backlog)}")
    print(f"  Redis used_memory: peak {max(memory) / 2**20:.1f} MB (goal: under 50 MB)")
    print(f"  worker last_seen staleness: median {stale[len(stale) // 2]:.1f} s, "
          f"p99 {stale[int(len(stale) * 0.99)]:.1f} s, max {stale[-1]:.1f} s (heartbeats every {args.heartbeat} s)")


if __name__ == "__main__":
    main()
