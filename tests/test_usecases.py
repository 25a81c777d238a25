"""The use-case layer under the CLI, on SQLite and PostgreSQL: workers online and offline, and a batch's status
counting only the workers that are there."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from dispatcher import fleet, store, usecases
from dispatcher.expand import Options, expand
from dispatcher.reader import parse_manifest
from schemas.errors import ConfigError, KilnError
from schemas.job import JobStatus
from schemas.messages import Heartbeat
from schemas.tables import Attempt, Batch, BatchJob, Job

T0 = datetime(2026, 1, 1, 20, 0, 0)
TIMEOUT = timedelta(seconds=60)


def record(sessions, rows: str, batch_id: str = "b1", **batch: object) -> list[str]:
    """Record a one-batch manifest (batch b1); its job ids."""
    expansion = expand(parse_manifest(rows.encode(), "m.csv"), Options(batch="b", base_dir=Path.cwd(),
                                                                       non_commercial=True))
    with sessions.begin() as s:
        store.record_batch(s, Batch(id=batch_id, name="b", manifest="m.csv", manifest_sha256="0", created_at=T0,
                                    **batch), expansion, T0)
    return [j.job_id for j in expansion.jobs]


def test_workers_go_offline_after_the_timeout_and_are_forgotten_after_a_day(database_url: str) -> None:
    sessions = store.open_database(database_url)
    jobs = record(sessions, "id,prompt\na,x\nb,y\nc,z\n")
    with sessions.begin() as s:
        for name, seen in (("w-old", T0 - timedelta(days=2)), ("w-gone", T0 - timedelta(minutes=5)), ("w-here", T0)):
            fleet.record_heartbeat(s, Heartbeat(worker=name, device="cuda:RTX 4070", vram_gb=12, models=["klein-4b"],
                                                queues=["kiln.render.klein-4b.vram12"]), seen)
        s.add_all([Attempt(job_id=job, number=1, worker="w-here", status=status, started_at=T0)
                   for job, status in zip(jobs, ["succeeded", "oom", "running"], strict=True)])
    with sessions.begin() as s:
        found = usecases.workers(s, T0 + timedelta(seconds=30), TIMEOUT)
    assert [(w.name, w.online, w.done, w.failed) for w in found] == [("w-here", True, 1, 1),
                                                                      ("w-gone", False, 0, 0)]
    assert found[0].as_json()["last_seen"] == "2026-01-01T20:00:00Z"


def test_status_counts_only_online_workers_as_able_to_take_work(database_url: str) -> None:
    sessions = store.open_database(database_url)
    record(sessions, "id,prompt,model\nbig,x,klein-9b\n", paused=True, priority=3)
    with sessions.begin() as s:
        fleet.record_heartbeat(s, Heartbeat(worker="w24", device="cuda", vram_gb=24, models=["klein-9b"],
                                            queues=["kiln.render.klein-9b.vram24", "kiln.render.klein-9b.vram16"]), T0)
    with sessions.begin() as s:
        assert usecases.batch_status(s, "b1", T0 + timedelta(seconds=30), TIMEOUT).unfit == []
        later = usecases.batch_status(s, "b", T0 + timedelta(minutes=5), TIMEOUT)  # a unique prefix will do
        with pytest.raises(KilnError, match="no batch 'nope'"):
            usecases.batch_status(s, "nope", T0, TIMEOUT)
    assert later.unfit == [usecases.UnfitGroup("needs a 16 GB card for klein-9b at 1.05 MP; no worker is online", 1,
                                               "big")]
    assert (later.as_json()["paused"], later.as_json()["priority"], later.counts["queued"]) == (True, 3, 1)


def test_progress_measures_the_pace_of_recent_images_or_else_of_the_workers_that_can_take_them(
        database_url: str) -> None:
    sessions = store.open_database(database_url)
    jobs = record(sessions, "id,prompt\na,x\nb,y\nc,z\nd,w\n")
    now = T0 + timedelta(minutes=10)
    with sessions.begin() as s:
        fleet.record_heartbeat(s, Heartbeat(worker="w1", device="cuda", vram_gb=12, models=["klein-4b"],
                                            queues=["kiln.render.klein-4b.vram8"], seconds_per_image=30.0), now)
        fleet.record_heartbeat(s, Heartbeat(worker="w-9b", device="cuda", vram_gb=24, models=["klein-9b"],
                                            queues=["kiln.render.klein-9b.vram16"], seconds_per_image=5.0), now)
        status = usecases.batch_status(s, "b1", now, TIMEOUT)
        before = usecases.batch_progress(s, status, now, TIMEOUT)  # nothing finished: w1's speed (w-9b cannot help)
    assert (before.finished, before.active, before.images_per_hour, before.eta) == (0, 4, 120.0, timedelta(minutes=2))
    with sessions.begin() as s:
        for job, minutes in zip(jobs[:2], (6, 8), strict=True):
            s.execute(update(Job).where(Job.id == job).values(status=JobStatus.SUCCEEDED,
                                                              updated_at=T0 + timedelta(minutes=minutes)))
        progress = usecases.batch_progress(s, usecases.batch_status(s, "b1", now, TIMEOUT), now, TIMEOUT)
    assert (progress.finished, progress.active) == (2, 2)
    assert progress.images_per_hour == pytest.approx(12.0) and progress.eta == timedelta(minutes=10)
    assert progress.as_json() == {"total": 4, "finished": 2, "active": 2, "images_per_hour": 12.0,
                                  "eta_seconds": 600}


def test_retry_queues_failures_again_in_the_same_batch_or_as_new_jobs_that_name_the_old_ones(
        database_url: str) -> None:
    sessions = store.open_database(database_url)
    a, b, c = record(sessions, "id,prompt\na,x\nb,y\nc,z\n")
    with sessions.begin() as s:
        for job, status in ((a, JobStatus.FAILED), (b, JobStatus.DEAD), (c, JobStatus.SUCCEEDED)):
            s.execute(update(Job).where(Job.id == job).values(status=status, attempts=3, error="boom"))
    with sessions.begin() as s:
        assert usecases.retry(s, "b1", [JobStatus.DEAD], {}, T0) == usecases.Retried("b1", 1, 0)
        again = s.get(Job, b)
        assert again and (again.status, again.budget_from, again.error) == (JobStatus.QUEUED, 3, None)
        done = usecases.retry(s, "b1", [JobStatus.FAILED, JobStatus.DEAD], {"steps": "8", "guidance": "2.5"}, T0)
        assert done == usecases.Retried("b1", 0, 1)
        [new] = s.scalars(select(Job).where(Job.retry_of == a)).all()
        assert (new.steps, new.guidance, new.status, new.output_key) == (8, 2.5, JobStatus.QUEUED, "b/a.png")
        assert set(s.scalars(select(BatchJob.job_id).where(BatchJob.batch_id == "b1"))) == {new.id, b, c}
        old = s.get(Job, a)
        assert old and old.status is JobStatus.FAILED  # the old job and its history stay
        assert store.batch_counts(s, "b1")["queued"] == 2
        with pytest.raises(ConfigError, match="--set steps=0: must be a whole number from 1 to 100"):
            usecases.retry(s, "b1", [JobStatus.FAILED], {"steps": "0"}, T0)
        with pytest.raises(ConfigError, match="only steps, guidance, seed, width, height can be changed"):
            usecases.retry(s, "b1", [JobStatus.FAILED], {"prompt": "x"}, T0)


def test_a_rerun_that_renders_nothing_adds_no_batch(database_url: str) -> None:
    sessions = store.open_database(database_url)
    jobs = record(sessions, "id,prompt\na,x\n")
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == jobs[0]).values(status=JobStatus.SUCCEEDED))
    expansion = expand(parse_manifest(b"id,prompt\na,x\n", "m.csv"), Options(batch="b", base_dir=Path.cwd()))
    with sessions.begin() as s:
        again = store.record_batch(s, Batch(id="b2", name="b", manifest="m.csv", manifest_sha256="0",
                                            created_at=T0), expansion, T0)
        assert (again.batch_id, again.already_done) == ("b1", 1)
        assert s.scalar(select(func.count()).select_from(Batch)) == 1


def test_batch_control_pauses_resumes_reprioritizes_and_cancels(database_url: str) -> None:
    sessions = store.open_database(database_url)
    record(sessions, "id,prompt\na,x\nb,y\n")
    with sessions.begin() as s:
        assert usecases.pause(s, "b1", True).batch.paused
        assert usecases.set_priority(s, "b", 7).batch.priority == 7  # a unique prefix will do
        assert usecases.cancel(s, "b1", T0).cancelled == 2
        resumed = usecases.pause(s, "b1", False)
        assert (resumed.batch.paused, resumed.cancelled) == (False, 2)  # resuming does not bring them back
        batch, rows = usecases.export_rows(s, "b1")
        assert batch.id == "b1" and [r["kiln_status"] for r in rows] == ["cancelled", "cancelled"]
        with pytest.raises(KilnError, match="no batch 'zz'"):
            usecases.cancel(s, "zz", T0)


def test_failures_are_grouped_by_reason_with_a_count_and_the_first_row(database_url: str) -> None:
    sessions = store.open_database(database_url)
    jobs = record(sessions, "id,prompt\na,x\nb,y\nc,z\nd,w\n")
    with sessions.begin() as s:
        for job, status, error in zip(jobs, [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.DEAD, JobStatus.FAILED],
                                      ["", "bad reference", "upload failed", "bad reference"], strict=True):
            s.execute(update(Job).where(Job.id == job).values(status=status, error=error or None))
    with sessions.begin() as s:
        found = usecases.batch_status(s, "b1", T0, TIMEOUT).failures
    assert [(g.status, g.error, g.count, g.row_id) for g in found] == [("failed", "bad reference", 2, "b"),
                                                                       ("dead", "upload failed", 1, "c")]
