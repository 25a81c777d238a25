"""Soak: thousands of tiny jobs over several workers while workers, Redis, the dispatcher and the storage proxy
are killed, frozen, restarted or made to fail at random. Then the same checks as the fault tests, and the
figures. Not a test: run it by hand.

    .venv/bin/python -m benchmarks.soak --jobs 2000 --workers 3 --minutes 8

Needs PostgreSQL (KILN_TEST_POSTGRES_URL, as the tests) and redis-server; starts moto's S3 server itself.
"""

from __future__ import annotations

import argparse
import random
import signal
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import sqlalchemy
from sqlalchemy import func, select

from schemas.job import JobStatus
from schemas.tables import Job, Output
from tests.conftest import POSTGRES_URL
from tests.fleet_harness import BUCKET, Fleet, running_fleet
from worker.tiny import ensure_tiny


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, from /proc."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
            stat = (proc / "stat").read_text().split()
        except OSError:
            continue
        if int(proc.name) == pid or int(stat[3]) == pid:  # itself, or a child (its GPU process)
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return total / 1024


def inject(fleet: Fleet, workers: list[str], rng: random.Random) -> str:
    """One random fault; returns its name."""
    kind = rng.choice(["kill-worker", "freeze-worker", "restart-redis", "kill-dispatcher", "storage-errors",
                       "storage-stalls", "storage-outage"])
    if kind == "kill-worker":
        name = rng.choice(workers)
        fleet.signal(name, signal.SIGKILL)
        fleet.procs[name].wait()
        fleet.worker(name, 16)
    elif kind == "freeze-worker":
        name = rng.choice(workers)
        fleet.signal(name, signal.SIGSTOP)
        time.sleep(rng.uniform(2, 15))  # sometimes past the worker timeout, sometimes not
        fleet.signal(name, signal.SIGCONT)
    elif kind == "restart-redis":
        fleet.redis.restart(persistent=False)
    elif kind == "storage-errors":  # a burst of 500/503 answers to uploads and checks
        fleet.storage.fail(rng.randint(1, 6), rng.choice([500, 503]))
    elif kind == "storage-stalls":  # answers held past the 3 s read timeout, after the write landed
        fleet.storage.stall(rng.randint(1, 4), rng.uniform(3.5, 8))
    elif kind == "storage-outage":  # the storage proxy killed, then restarted: sometimes past the upload budget
        fleet.storage.stop()
        time.sleep(rng.uniform(3, 25))
        fleet.storage.start()
    else:
        fleet.signal("dispatcher", signal.SIGKILL)
        fleet.procs["dispatcher"].wait()
        fleet.dispatcher()
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=8.0, help="how long faults are injected")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    schema = f"kiln_soak_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache"
            ensure_tiny(cache)
            with running_fleet(Path(tmp), f"{POSTGRES_URL}?options=-csearch_path%3D{schema}", cache) as fleet:
                run(fleet, args, rng)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


def run(fleet: Fleet, args: argparse.Namespace, rng: random.Random) -> None:
    fleet.env["KILN_BACKLOG"] = "8"
    fleet.dispatcher()
    names = [f"w{i}" for i in range(args.workers)]
    for name in names:
        fleet.worker(name, 16)
    time.sleep(10)
    memory_start = {n: rss_mb(fleet.procs[n].pid) for n in names}
    rows = "id,prompt,width,height\n" + "".join(f"p{i},product {i},256,256\n" for i in range(args.jobs))
    fleet.submit(rows, "--model", "tiny")
    started = time.monotonic()
    faults: Counter[str] = Counter()
    while time.monotonic() - started < args.minutes * 60:
        time.sleep(rng.uniform(5, 20))
        faults[inject(fleet, names, rng)] += 1
    fleet.wait_until(lambda: fleet.count(Job.status.in_(["succeeded", "dead"])) == args.jobs, 1800,
                     "the batch to finish after the faults")
    elapsed = time.monotonic() - started
    memory_end = {n: rss_mb(fleet.procs[n].pid) for n in names}
    with fleet.engine.connect() as conn:
        statuses = dict(conn.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        outputs = conn.scalar(select(func.count()).select_from(Output)) or 0
        extra_rows = conn.scalar(select(func.count()).select_from(
            select(Output.job_id).group_by(Output.job_id).having(func.count() > 1).subquery())) or 0
    keys = sum(len(page.get("Contents", [])) for page in
               fleet.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET))
    problems = "none"
    try:
        fleet.check()
    except AssertionError as exc:
        problems = str(exc).splitlines()[0]
    print(f"jobs {args.jobs}, workers {args.workers}, faults for {args.minutes:g} min, finished in {elapsed:.0f} s")
    succeeded, dead = statuses.get(JobStatus.SUCCEEDED, 0), statuses.get(JobStatus.DEAD, 0)
    print(f"succeeded {succeeded}, dead {dead}, lost {args.jobs - succeeded - dead}, "
          f"duplicated {extra_rows + max(0, keys - outputs)} (objects {keys}, output rows {outputs})")
    print(f"faults injected {sum(faults.values())}: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())))
    print("requests the storage proxy broke: " + ", ".join(f"{k} {v}" for k, v in
                                                           sorted(fleet.storage.injected.items())))
    print("worker memory MB at start -> end: " + ", ".join(
        f"{n} {memory_start[n]:.0f} -> {memory_end[n]:.0f}" for n in names))
    print(f"checks: {problems}")


if __name__ == "__main__":
    main()
