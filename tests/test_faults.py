"""Breaking the fleet on purpose: PCs switched off or frozen mid-render, Redis restarted mid-batch. After each,
once quiet, the same checks hold (Fleet.check): every job once, no stray object, nothing left in flight."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from schemas.tables import Attempt, Job
from tests.fleet_harness import Fleet, running_fleet

# 1024x1024 tiny renders take about a second on these CPUs: long enough to be caught in the middle.
ROWS = "id,prompt\n" + "".join(f"p{i},product {i}\n" for i in range(10))


@pytest.fixture
def fleet(tmp_path: Path, postgres_url: str, cache_dir: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path, postgres_url, cache_dir) as running:
        running.dispatcher()
        yield running


def running_on(fleet: Fleet, worker: str) -> str | None:
    with fleet.engine.connect() as conn:
        return conn.scalar(select(Job.id).where(Job.status == "running", Job.worker == worker).limit(1))


def test_a_worker_switched_off_mid_render_loses_nothing(fleet: Fleet) -> None:
    fleet.submit(ROWS, "--model", "tiny")
    fleet.worker("victim", 16)
    fleet.worker("survivor", 16)
    fleet.wait_until(lambda: running_on(fleet, "victim") is not None, 120, "a job running on the victim")
    job = running_on(fleet, "victim")
    fleet.signal("victim", signal.SIGKILL)  # the worker and its GPU child, at once
    fleet.wait_quiet(10)
    summary = fleet.check()
    assert summary["succeeded"] == 10
    with fleet.engine.connect() as conn:
        attempts = {(a.worker, a.status) for a in conn.execute(select(Attempt).where(Attempt.job_id == job))}
    assert ("victim", "lost") in attempts and ("survivor", "succeeded") in attempts


def test_a_frozen_worker_that_wakes_late_overwrites_and_duplicates_nothing(fleet: Fleet) -> None:
    fleet.submit(ROWS, "--model", "tiny")
    fleet.worker("sleeper", 16)
    fleet.worker("awake", 16)
    fleet.wait_until(lambda: running_on(fleet, "sleeper") is not None, 120, "a job running on the sleeper")
    job = running_on(fleet, "sleeper")
    fleet.signal("sleeper", signal.SIGSTOP)  # past its timeout (8 s): its job goes to the other worker
    fleet.wait_until(lambda: fleet.count(Job.id == job, Job.status == "succeeded") == 1, 120,
                     "the frozen worker's job to succeed elsewhere")
    fleet.signal("sleeper", signal.SIGCONT)  # it finishes, uploads (412) and reports late
    fleet.wait_quiet(10)
    time.sleep(5)  # let the late report arrive
    assert fleet.check()["succeeded"] == 10
    with fleet.engine.connect() as conn:
        winner = conn.scalar(select(Job.worker).where(Job.id == job))
    assert winner == "awake"


@pytest.mark.parametrize("persistent", [False, True], ids=["no-persistence", "aof"])
def test_redis_restarted_mid_batch_loses_no_job(fleet: Fleet, persistent: bool) -> None:
    if persistent:  # start over with AOF on, as compose.yaml runs it
        fleet.redis.restart(persistent=True)
    fleet.submit(ROWS, "--model", "tiny")
    fleet.worker("w1", 16)
    fleet.wait_until(lambda: fleet.count(Job.status == "succeeded") >= 2, 120, "two jobs done")
    fleet.redis.restart(persistent=persistent)  # without AOF every queued message is gone
    fleet.wait_quiet(10, 240)
    assert fleet.check()["succeeded"] == 10
