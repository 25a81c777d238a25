"""The fleet over TLS with least-privilege accounts: Redis over TLS only, with a worker account limited to what
a worker needs, PostgreSQL over TLS only (verify-full). What the README tells users to set up, run for real."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.exceptions
import pytest
import redis
import yaml
from sqlalchemy import text

from dispatcher.bucket import Bucket
from schemas.broker import WORKER_ACL
from schemas.errors import StorageError
from schemas.messages import HEARTBEATS_STREAM, REPORTS_STREAM
from tests.fleet_harness import Fleet, running_fleet
from tests.services import make_certificates, postgres_tls_server, s3_server

ROOT = Path(__file__).resolve().parent.parent
WORKER_PASSWORD = "worker-pw-5e0c77"
ROWS = "id,prompt,width,height\n" + "".join(f"p{i},product {i},256,256\n" for i in range(4))


@pytest.fixture
def secure_fleet(tmp_path: Path, cache_dir: Path) -> Iterator[Fleet]:
    tls = make_certificates(tmp_path / "tls")
    with postgres_tls_server(tls) as db_url, running_fleet(tmp_path, db_url, cache_dir, tls=tls,
                                                           worker_password=WORKER_PASSWORD) as fleet:
        fleet.dispatcher()
        yield fleet


def test_a_batch_runs_over_tls_with_a_least_privilege_worker_account(secure_fleet: Fleet) -> None:
    fleet = secure_fleet
    assert fleet.worker_env["KILN_BROKER_URL"].startswith("rediss://kiln-worker:")
    assert "sslmode=verify-full" in fleet.env["KILN_DATABASE_URL"]
    fleet.submit(ROWS, "--model", "tiny")
    fleet.worker("w1", 16)
    fleet.wait_quiet(4, 180)
    assert fleet.check()["succeeded"] == 4
    with fleet.engine.connect() as conn:
        assert conn.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).scalar() is True
    denied = [entry for entry in fleet.broker.acl_log() if entry.get("username") == "kiln-worker"]
    assert denied == [], denied  # the worker never needed more than its rules give
    worker = redis.Redis.from_url(fleet.worker_env["KILN_BROKER_URL"])
    for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("ACL", "LIST"), ("SCRIPT", "FLUSH"),
                    ("GET", "anything-else"),
                    # the streams take a worker's XADD, and nothing else: no reading, trimming or deleting others'
                    ("DEL", REPORTS_STREAM), ("XTRIM", REPORTS_STREAM, "MAXLEN", "0"),
                    ("XRANGE", HEARTBEATS_STREAM, "-", "+"), ("XADD", "kiln.render.x", "*", "a", "1")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.execute_command(*command)
    with pytest.raises(redis.exceptions.ConnectionError):  # no plain-text connections at all
        redis.Redis(port=fleet.redis.port, socket_timeout=2).ping()


def test_the_readme_and_compose_yaml_give_workers_exactly_the_tested_rules() -> None:
    root = ROOT
    readme = (root / "README.md").read_text()
    assert f"user kiln-worker on >WORKER_PASSWORD {WORKER_ACL}" in readme
    command = yaml.safe_load((root / "compose.yaml").read_text())["services"]["redis"]["command"]
    rules = command.split("--user kiln-worker on >${KILN_WORKER_PASSWORD:-change-me-worker} ")[1].split(" --")[0]
    assert rules == WORKER_ACL
    policy = json.loads((root / "deploy" / "storage-policy.json").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::renders/catalog/*", "arn:aws:s3:::renders"}


def test_the_dispatchers_storage_calls_need_nothing_beyond_the_prefix_policy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # moto enforcing IAM after the four set-up calls: the key below has only deploy/storage-policy.json.
    # (moto checks actions and resources, not ListBucket's s3:prefix condition, and cannot take presigned PUTs
    # under enforcement: those two parts are AWS's and MinIO's to enforce, as documented.)
    with s3_server(tmp_path, enforce_iam_after=4) as endpoint:
        admin = {"endpoint_url": endpoint, "aws_access_key_id": "admin", "aws_secret_access_key": "admin",
                 "region_name": "us-east-1"}
        boto3.client("s3", **admin).create_bucket(Bucket="renders")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="kiln-dispatcher")
        iam.put_user_policy(UserName="kiln-dispatcher", PolicyName="kiln-catalog",
                            PolicyDocument=(ROOT / "deploy" / "storage-policy.json").read_text())
        key = iam.create_access_key(UserName="kiln-dispatcher")["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        bucket = Bucket("s3://renders/catalog", endpoint)
        bucket.check()
        assert bucket.reachable() is None
        assert bucket.put("a.png", b"png bytes", "j1") == "s3://renders/catalog/a.png"
        stored = bucket.stat("a.png")
        assert stored is not None and stored.size == 9
        assert bucket.stat("missing.png") is None
        with pytest.raises(StorageError, match="AccessDenied"):
            Bucket("s3://renders/elsewhere", endpoint).put("a.png", b"x", "j1")
        with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
            bucket.client.delete_object(Bucket="renders", Key="catalog/a.png")
