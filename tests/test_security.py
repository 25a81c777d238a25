"""The fleet over TLS with least-privilege accounts: Redis over TLS only, with a worker account limited to what
a worker needs, PostgreSQL over TLS only (verify-full). What the README tells users to set up, run for real."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from sqlalchemy import text

from schemas.broker import WORKER_ACL
from tests.fleet_harness import Fleet, running_fleet
from tests.services import make_certificates, postgres_tls_server

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
                    ("GET", "anything-else")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.execute_command(*command)
    with pytest.raises(redis.exceptions.ConnectionError):  # no plain-text connections at all
        redis.Redis(port=fleet.redis.port, socket_timeout=2).ping()


def test_the_readme_and_compose_yaml_give_workers_exactly_the_tested_rules() -> None:
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    assert f"user kiln-worker on >WORKER_PASSWORD {WORKER_ACL}" in readme
    command = yaml.safe_load((root / "compose.yaml").read_text())["services"]["redis"]["command"]
    rules = command.split("--user kiln-worker on >${KILN_WORKER_PASSWORD:-change-me-worker} ")[1].split(" --")[0]
    assert rules == WORKER_ACL
    policy = json.loads((root / "deploy" / "storage-policy.json").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::renders/catalog/*", "arn:aws:s3:::renders"}
