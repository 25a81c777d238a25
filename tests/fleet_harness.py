"""A whole fleet for tests: a private Redis, moto's S3 server, PostgreSQL, `kiln dispatcher` and `kiln worker`
processes, plus the checks that must hold once it is quiet, whatever was broken on the way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
import sqlalchemy
from redis import Redis
from sqlalchemy import func, select

from schemas.broker import WORKER_ACL
from schemas.capacity import QUEUE_PREFIX
from schemas.keys import REFERENCES
from schemas.messages import REPORTS_STREAM
from schemas.tables import Attempt, Job, Output
from tests.faultproxy import S3FaultProxy
from tests.services import PrivateRedis, free_port, redis_server, s3_server

KILN = str(Path(sys.executable).with_name("kiln"))
BUCKET = "kiln-test"
# Distinctive secrets, so a test can search every output of a run for them.
REDIS_PASSWORD = "redis-pw-7f3c9e"
DB_PASSWORD = "db-pw-91ac5d"  # the test server trusts loopback, so any password connects
AWS_SECRET = "aws-secret-2b8d41"
TINY_MODELS = "tiny,tiny:klein-4b,tiny:klein-9b"  # what test workers serve unless told otherwise
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


class Fleet:
    """Handles on a running fleet, and the invariants it must keep."""

    def __init__(self, tmp: Path, db_url: str, redis: PrivateRedis, storage: S3FaultProxy, direct: str,
                 cache_dir: Path, worker_login: str | None = None) -> None:
        """Kiln's processes reach S3 through `storage`, a proxy that breaks when told; the checks go `direct`.
        Workers log in to Redis as `worker_login` (user:password) when given."""
        broker_url, endpoint = redis.url, storage.url
        self.redis, self.storage = redis, storage
        db_url = db_url.replace("postgres@", f"postgres:{DB_PASSWORD}@", 1)
        self.tmp, self.db_url, self.broker_url, self.endpoint = tmp, db_url, broker_url, endpoint
        base = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "AWS_"))}
        self.env = {**base, **AWS, "KILN_DATABASE_URL": db_url, "KILN_BROKER_URL": broker_url,
                    "KILN_STORAGE_URL": f"s3://{BUCKET}/renders", "KILN_S3_ENDPOINT_URL": endpoint,
                    "KILN_WORKER_TIMEOUT_SECONDS": "8", "KILN_STORAGE_TIMEOUT_SECONDS": "3",
                    "KILN_RETRY_BASE_SECONDS": "1"}
        # least privilege: a worker gets the broker and nothing that opens the database or the bucket
        worker_broker = redis.url_for(worker_login) if worker_login else broker_url
        self.worker_env = {**base, "KILN_BROKER_URL": worker_broker, "KILN_CACHE_DIR": str(cache_dir),
                           "KILN_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "KILN_HEARTBEAT_SECONDS": "1",
                           "KILN_STORAGE_TIMEOUT_SECONDS": "3", "KILN_UPLOAD_RETRY_SECONDS": "12"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.metrics_port = free_port()
        self.outputs: list[str] = []
        self.engine = sqlalchemy.create_engine(db_url)
        self.s3 = boto3.client("s3", endpoint_url=direct, aws_access_key_id="test",
                               aws_secret_access_key=AWS_SECRET, region_name="us-east-1")
        self.broker = Redis.from_url(broker_url)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start a kiln process in its own process group (so a kill takes its GPU child too)."""
        with open(self.tmp / f"{name}.log", "ab") as out:
            proc = subprocess.Popen([KILN, *args], env=env, cwd=self.tmp, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def dispatcher(self, **env: str) -> subprocess.Popen[bytes]:
        """`kiln dispatcher`, serving Prometheus metrics at self.metrics_url."""
        return self.start("dispatcher", ["dispatcher"], {**self.env, "KILN_METRICS_PORT": str(self.metrics_port),
                                                         **env})

    @property
    def metrics_url(self) -> str:
        """The dispatcher's /metrics."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def worker(self, name: str, vram: float, dispatchers_env: bool = False, models: str = TINY_MODELS,
               **env: str) -> subprocess.Popen[bytes]:
        """A worker with only what it needs, or (dispatchers_env) started from the dispatcher's own shell: the
        database, S3 storage and credentials it does not use set too, as on one machine or a shared env file."""
        base = {**self.env, **self.worker_env} if dispatchers_env else self.worker_env
        return self.start(name, ["worker", "--name", name, "--vram", str(vram), "--models", models], {**base, **env})

    def workers(self) -> dict[str, dict[str, Any]]:
        """What `kiln workers --json` says of each worker."""
        return {w["name"]: w for w in json.loads(self.kiln("workers", "--json"))}

    def signal(self, name: str, signum: int) -> None:
        """Signal a process and its children, as switching a PC off or freezing it would."""
        os.killpg(self.procs[name].pid, signum)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def kiln(self, *args: str) -> str:
        done = subprocess.run([KILN, *args], env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=120)
        self.outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def everything_printed(self) -> str:
        """Every log, command output and file Kiln wrote in this run (not the test servers' own logs)."""
        files = [p.read_text(errors="replace") for p in self.tmp.rglob("*") if p.is_file()
                 and p.suffix in (".log", ".csv", ".jsonl", ".json") and p.name not in ("moto.log", "redis.log")]
        return "\n".join([*self.outputs, *files])

    def submit(self, rows: str, *options: str) -> str:
        (self.tmp / "m.csv").write_text(rows, encoding="utf-8")
        return str(json.loads(self.kiln("submit", "m.csv", "--json", *options))["batch_id"])

    def render_queues(self) -> list[str]:
        """Every render queue the broker holds."""
        return [key.decode() for key in self.broker.scan_iter(f"{QUEUE_PREFIX}.*", _type="list")]

    def count(self, *where: Any) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(Job).where(*where)) or 0)

    def wait_until(self, condition: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.25)
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                         for p in sorted(self.tmp.glob("*.log")))
        pytest.fail(f"timed out waiting for {what}\n{logs}")

    def wait_quiet(self, jobs: int, seconds: float = 180) -> None:
        """Until every job is finished (succeeded or dead)."""
        self.wait_until(lambda: self.count(Job.status.in_(["succeeded", "dead"])) == jobs, seconds,
                        f"all {jobs} jobs to finish")

    def check(self, max_attempts: int = 3, cancelled: bool = False) -> dict[str, int]:
        """What must hold once the fleet is quiet: every job succeeded exactly once (one object with the recorded
        checksum, one output row) or dead with its reason (or, when a batch was cancelled, cancelled with no
        object); no object without a row; nothing queued or running; attempts within their limit; queues empty."""
        with self.engine.connect() as conn:
            jobs = list(conn.execute(select(Job)))
            outputs = list(conn.execute(select(Output)))
            lost_or_failed = conn.scalar(select(func.count()).select_from(Attempt)
                                         .where(Attempt.status.in_(["lost", "failed"])))
        by_job: dict[str, list[Any]] = {}
        for output in outputs:
            by_job.setdefault(output.job_id, []).append(output)
        keys = {o["Key"] for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                for o in page.get("Contents", [])  # a page holds at most 1,000 keys
                if f"/{REFERENCES}/" not in o["Key"]}  # reference images travel there, not outputs
        for job in jobs:
            assert job.status in ("succeeded", "dead", *(["cancelled"] if cancelled else [])), \
                f"job {job.id} left {job.status}"
            if job.status in ("dead", "cancelled"):
                assert job.id not in by_job and (job.error or job.status == "cancelled")
                continue
            [output] = by_job[job.id]
            key = output.uri.removeprefix(f"s3://{BUCKET}/")
            head = self.s3.head_object(Bucket=BUCKET, Key=key)
            assert head["ETag"].strip('"') == output.md5 and head["Metadata"]["kiln-job"] == job.id
            assert job.attempts <= 2 * max_attempts, f"job {job.id} took {job.attempts} attempts"
        assert keys == {o.uri.removeprefix(f"s3://{BUCKET}/") for o in outputs}, "an object without a row"
        self.wait_until(lambda: all(self.broker.llen(q) == 0 for q in self.render_queues()), 30, "empty render queues")
        self.wait_until(lambda: self.broker.xlen(REPORTS_STREAM) == 0, 30, "an empty reports stream")
        return {"succeeded": sum(j.status == "succeeded" for j in jobs), "dead": sum(j.status == "dead" for j in jobs),
                **({"cancelled": sum(j.status == "cancelled" for j in jobs)} if cancelled else {}),
                "lost_or_failed_attempts": int(lost_or_failed or 0)}


@contextmanager
def running_fleet(tmp: Path, db_url: str, cache_dir: Path, tls: Path | None = None,
                  worker_password: str | None = None) -> Iterator[Fleet]:
    """A fleet's services, and handles on it. With `tls`, Redis speaks only TLS. With `worker_password`, Redis
    has no default user: the dispatcher logs in as kiln-dispatcher, workers as kiln-worker with WORKER_ACL."""
    with ExitStack() as stack:
        users = [] if worker_password is None else [
            "default off", f"kiln-dispatcher on >{REDIS_PASSWORD} ~* &* +@all",
            f"kiln-worker on >{worker_password} {WORKER_ACL}"]
        server = stack.enter_context(redis_server(tmp, password=None if users else REDIS_PASSWORD, tls=tls,
                                                  users=users))
        if users:
            server.url = server.url_for(f"kiln-dispatcher:{REDIS_PASSWORD}")
        direct = stack.enter_context(s3_server(tmp))
        storage = S3FaultProxy(direct, free_port())
        stack.callback(storage.stop)
        fleet = Fleet(tmp, db_url, server, storage, direct, cache_dir,
                      f"kiln-worker:{worker_password}" if users else None)
        fleet.s3.create_bucket(Bucket=BUCKET)
        try:
            yield fleet
        finally:
            fleet.stop_all()
            fleet.engine.dispose()
