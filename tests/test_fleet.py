"""The fleet on real services: a dispatcher and workers of 8, 16 and 24 GB render a mixed 4B/9B manifest
through Celery on a private Redis, into a real S3 HTTP endpoint, recorded in PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis
import sqlalchemy
from sqlalchemy import select

from schemas.capacity import TIERS, queue_name
from schemas.tables import Attempt, Job, Output
from tests.services import redis_server, s3_server

KILN = str(Path(sys.executable).with_name("kiln"))
BUCKET = "kiln-test"
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
WORKERS = {"w8": 8, "w16": 16, "w24": 24}


@pytest.fixture
def fleet(tmp_path: Path, postgres_url: str, cache_dir: Path) -> Iterator[dict[str, object]]:
    """Redis, S3 and a dispatcher running; workers are started by the test."""
    with redis_server(tmp_path) as broker_url, s3_server(tmp_path) as endpoint:
        boto3.client("s3", endpoint_url=endpoint, **_aws()).create_bucket(Bucket=BUCKET)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "AWS_"))}
        dispatcher_env = {**base, **AWS, "KILN_DATABASE_URL": postgres_url, "KILN_BROKER_URL": broker_url,
                          "KILN_STORAGE_URL": f"s3://{BUCKET}/renders", "KILN_S3_ENDPOINT_URL": endpoint}
        # least privilege: a worker gets the broker and nothing that opens the database or the bucket
        worker_env = {**base, "KILN_BROKER_URL": broker_url, "KILN_CACHE_DIR": str(cache_dir), "KILN_DEVICE": "cpu",
                      "HF_HUB_OFFLINE": "1", "KILN_HEARTBEAT_SECONDS": "1"}
        procs: list[subprocess.Popen[bytes]] = []

        def start(args: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
            with open(tmp_path / log, "wb") as out:  # the child keeps its own copy of the handle
                proc = subprocess.Popen([KILN, *args], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
            procs.append(proc)
            return proc

        start(["dispatcher"], dispatcher_env, "dispatcher.log")
        try:
            yield {"env": dispatcher_env, "worker_env": worker_env, "start": start, "broker": broker_url,
                   "endpoint": endpoint, "db": postgres_url, "tmp": tmp_path}
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _aws() -> dict[str, str]:
    return {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


def wait_until(condition, seconds: float, what: str, logs: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log")))
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def test_mixed_manifest_is_rendered_by_workers_that_fit_into_the_bucket(fleet: dict[str, object]) -> None:
    tmp: Path = fleet["tmp"]  # type: ignore[assignment]
    env: dict[str, str] = fleet["env"]  # type: ignore[assignment]
    rows = "".join(f"s{i},small thing {i},tiny:klein-4b\n" for i in range(8))
    rows += "".join(f"b{i},big thing {i},tiny:klein-9b\n" for i in range(8))
    (tmp / "mixed.csv").write_text("id,prompt,model,width,height\n".replace(",width,height", "") + rows)
    submitted = subprocess.run([KILN, "submit", "mixed.csv", "--non-commercial", "--json"], env=env, cwd=tmp,
                               capture_output=True, text=True, check=True)
    assert '"queued": 16' in submitted.stdout

    for name, vram in WORKERS.items():
        fleet["start"](["worker", "--name", name, "--vram", str(vram)], fleet["worker_env"], f"{name}.log")  # type: ignore[operator]

    engine = sqlalchemy.create_engine(str(fleet["db"]))

    def all_done() -> bool:
        with engine.connect() as conn:
            return conn.scalar(select(sqlalchemy.func.count()).select_from(Job)
                               .where(Job.status == "succeeded")) == 16
    wait_until(all_done, 240, "16 succeeded jobs", tmp)

    with engine.connect() as conn:
        jobs = {j.id: j for j in conn.execute(select(Job))}
        attempts = list(conn.execute(select(Attempt).where(Attempt.status == "succeeded")))
        outputs = list(conn.execute(select(Output)))
    ran_on = {a.job_id: a.worker for a in attempts}
    assert len(ran_on) == 16 and len(outputs) == 16
    big = {jid for jid, j in jobs.items() if j.model == "tiny:klein-9b"}
    assert all(ran_on[jid] in ("w16", "w24") for jid in big), "a 9B job ran on a card too small for it"
    assert {ran_on[jid] for jid in jobs if jid not in big} <= set(WORKERS)
    assert any(ran_on[jid] == "w8" for jid in jobs if jid not in big), "the 8 GB card took no 4B work"
    assert {j.status for j in jobs.values()} == {"succeeded"}

    s3 = boto3.client("s3", endpoint_url=str(fleet["endpoint"]), **_aws())
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert len(keys) == 16
    for output in outputs:
        key = output.uri.removeprefix(f"s3://{BUCKET}/")
        head = s3.head_object(Bucket=BUCKET, Key=key)
        assert head["ETag"].strip('"') == output.md5 and head["ContentLength"] == output.bytes
        assert head["Metadata"]["kiln-job"] == output.job_id and output.sha256

    broker = redis.Redis.from_url(str(fleet["broker"]))
    assert all(broker.llen(queue_name(t)) == 0 for t in TIERS)

    def heard() -> dict[str, dict[str, object]]:
        listed = subprocess.run([KILN, "workers", "--json"], env=env, cwd=tmp, capture_output=True, text=True)
        return {w["name"]: w for w in json.loads(listed.stdout)}
    wait_until(lambda: {n: w["loaded_model"] for n, w in heard().items()} ==
               {"w8": "tiny:klein-4b", "w16": "tiny:klein-9b", "w24": "tiny:klein-9b"} or
               all(w["loaded_model"] for w in heard().values()), 30, "heartbeats naming the loaded models", tmp)
    workers = heard()
    assert {n: (w["vram_gb"], w["queues"][0]) for n, w in workers.items()} == {
        "w8": (8.0, "kiln.render.vram8"), "w16": (16.0, "kiln.render.vram16"), "w24": (24.0, "kiln.render.vram24")}
    assert all(w["seconds_per_image"] for w in workers.values())
    batch_id = json.loads(submitted.stdout)["batch_id"]
    status = json.loads(subprocess.run([KILN, "status", batch_id, "--json"], env=env, cwd=tmp, capture_output=True,
                                       text=True, check=True).stdout)
    assert status["counts"]["succeeded"] == 16 and status["unfit"] == [] and status["failures"] == []

    inspect = subprocess.run([sys.executable, "-m", "celery", "-A", "schemas.broker", "inspect", "active_queues",
                              "--timeout", "5"], env=env, cwd=tmp, capture_output=True, text=True, timeout=60)
    assert "w24@" in inspect.stdout and "kiln.render.vram24" in inspect.stdout, inspect.stdout + inspect.stderr
    w8_section = inspect.stdout.split("w8@", 1)[1].split("->", 1)[0]
    assert "kiln.render.vram8" in w8_section and "vram16" not in w8_section

    exported = subprocess.run([KILN, "export", batch_id, "--presign", "600", "-o", "out.jsonl"], env=env, cwd=tmp,
                              capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    first = json.loads((tmp / "out.jsonl").read_text().splitlines()[0])
    with urllib.request.urlopen(first["kiln_download_url"]) as response:
        assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_embedded_render_writes_to_s3_with_verified_objects(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    with s3_server(tmp_path) as endpoint:
        boto3.client("s3", endpoint_url=endpoint, **_aws()).create_bucket(Bucket=BUCKET)
        env = {**kiln_env, **AWS, "KILN_STORAGE_URL": f"s3://{BUCKET}/shop", "KILN_S3_ENDPOINT_URL": endpoint}
        (tmp_path / "m.csv").write_text("id,prompt,width,height\na,x,256,256\nb,y,256,256\n")
        done = subprocess.run([KILN, "render", "m.csv", "--model", "tiny", "--json"], env=env, cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert '"storage": "s3://kiln-test/shop"' in done.stdout
        s3 = boto3.client("s3", endpoint_url=endpoint, **_aws())
        assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]) == ["shop/m/a.png",
                                                                                            "shop/m/b.png"]
        missing = subprocess.run([KILN, "render", "m.csv", "--model", "tiny"], capture_output=True, text=True,
                                 env={**env, "KILN_STORAGE_URL": "s3://no-such-bucket/x"}, cwd=tmp_path)
        assert missing.returncode == 2 and "cannot reach bucket 'no-such-bucket'" in missing.stderr
