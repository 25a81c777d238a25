"""Benchmark: what recording one report costs the dispatcher's database code, alone on the machine. For a batch of
N jobs, records a started and a finished report of each (the bucket's answer for each upload given, as the
dispatcher's consumer threads pass it on) with `dispatcher.fleet.record_reports`, in transactions of G reports
(G = 1: one transaction each, as before group commit; the dispatcher's recorder takes every report waiting, up to
64), and prints the CPU time and wall time per report.

    .venv/bin/python -m benchmarks.reports --jobs 2000 --groups 1,16,64

Needs PostgreSQL (KILN_TEST_POSTGRES_URL, as the tests); --database sqlite:///PATH measures SQLite instead.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from benchmarks.scale import postgres_schema
from dispatcher import fleet, store
from dispatcher.bucket import Bucket, StoredObject
from dispatcher.expand import Options, expand
from dispatcher.reader import parse_manifest
from schemas.job import RenderResult
from schemas.messages import Report
from schemas.tables import Batch, Job

T0 = datetime(2026, 1, 1)
POLICY = fleet.Policy(backlog=2, message_ttl=timedelta(minutes=15), worker_timeout=timedelta(seconds=60),
                      max_attempts=3, retry_base=timedelta(seconds=10))


def measure(url: str, jobs: int, group: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per report, recording `jobs` jobs' started and finished reports `group` to a transaction."""
    sessions = store.open_database(url)
    batch = f"g{group}"
    manifest = ("id,prompt\n" + "".join(f"r{i},product {i} of {batch}\n" for i in range(jobs))).encode()
    with sessions.begin() as s:
        store.record_batch(s, Batch(id=batch, name=batch, manifest="m.csv", manifest_sha256="0", created_at=T0),
                           expand(parse_manifest(manifest, "m.csv"), Options(batch=batch, base_dir=Path.cwd())), T0)
        ids = list(s.scalars(select(Job.id).where(Job.output_key.like(f"{batch}/%"))))
    bucket = Bucket("s3://bench/out", None)  # only names objects here: no request is made
    reports: list[tuple[Report, StoredObject | None]] = [
        (Report(kind="started", job_id=job_id, attempt=1, worker="w1"), None) for job_id in ids]
    for job_id in ids:
        result = RenderResult(job_id=job_id, attempt=1, ok=True, worker="w1", seconds=0.1, uri="s3://bench/out/x",
                              sha256="0" * 64, md5="0" * 32, bytes=10)
        reports.append((Report(kind="finished", job_id=job_id, attempt=1, worker="w1", result=result),
                        StoredObject(md5="0" * 32, size=10, job_id=job_id)))
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, len(reports), group):
        with sessions.begin() as session:
            outcomes = fleet.record_reports(session, reports[start:start + group], T0, POLICY, bucket)
            assert all(o in ("started", "succeeded") for o in outcomes), outcomes
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    sessions.kw["bind"].dispose()
    return 1000 * cpu / len(reports), 1000 * wall / len(reports)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--groups", default="1,16,64", help="reports per transaction, comma-separated")
    parser.add_argument("--database", help="a database URL (default: a fresh schema on the test PostgreSQL)")
    args = parser.parse_args()
    url = args.database or postgres_schema()
    print(f"{args.jobs:,} jobs, a started and a finished report each, on {url.split(':')[0]}:")
    for group in [int(g) for g in args.groups.split(",")]:
        cpu, wall = measure(url, args.jobs, group)
        print(f"  {group:>3} to a transaction: {cpu:.2f} ms CPU, {wall:.2f} ms wall per report "
              f"({1000 / wall:.0f} reports/s on one thread)", flush=True)


if __name__ == "__main__":
    main()
