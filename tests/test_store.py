"""The database adapter on SQLite and PostgreSQL: recording, claiming, compare-and-set, migrations."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, select, text

from dispatcher import store
from dispatcher.expand import Options, expand
from dispatcher.lifecycle import RetryPolicy
from dispatcher.reader import parse_manifest
from schemas.errors import StaleStateError
from schemas.job import JobStatus, RenderResult
from schemas.params import RenderParams
from schemas.tables import Attempt, Base, Batch, Job, Output

T0 = datetime(2026, 1, 1, 12, 0, 0)
LEASE = timedelta(minutes=10)
POLICY = RetryPolicy(max_attempts=3, retry_base=timedelta(seconds=10), spread=1)


def expansion(rows: str = "id,prompt\na,x\nb,y\nc,z\n"):
    return expand(parse_manifest(rows.encode(), "m.csv"), Options(batch="b", base_dir=Path.cwd(), model="tiny"))


def record(sessions, batch_id: str = "b1", rows: str = "id,prompt\na,x\nb,y\nc,z\n"):
    with sessions.begin() as s:
        return store.record_batch(s, Batch(id=batch_id, name="b", manifest="m.csv", manifest_sha256="0" * 64,
                                           created_at=T0), expansion(rows), T0)


def ok(spec, worker: str = "w1") -> RenderResult:
    return RenderResult(job_id=spec.job_id, attempt=spec.attempt, ok=True, worker=worker, seconds=0.5,
                        uri=f"file:///out/{spec.output_key}", sha256="a" * 64, bytes=10)


def test_migrations_create_exactly_the_models_tables(database_url: str) -> None:
    sessions = store.open_database(database_url)
    with sessions.begin() as s:
        diff = compare_metadata(MigrationContext.configure(s.connection()), Base.metadata)
    assert diff == []


def test_recording_is_idempotent_and_resubmission_only_queues_what_is_missing(database_url: str) -> None:
    sessions = store.open_database(database_url)
    first = record(sessions)
    assert (first.jobs, first.new, first.already_done) == (3, 3, 0)
    with sessions.begin() as s:
        [spec] = store.claim(s, "w1", T0, LEASE, batch_id="b1")
        store.record_result(s, spec, ok(spec), T0, POLICY)
        [spec2] = store.claim(s, "w1", T0, LEASE, batch_id="b1")
        store.record_result(s, spec2, RenderResult(job_id=spec2.job_id, attempt=1, ok=False, worker="w1",
                                                   seconds=1, error="boom", error_kind="bad_input"), T0, POLICY)
    again = record(sessions, "b2")
    assert (again.new, again.requeued, again.already_done, again.in_progress) == (0, 1, 1, 1)
    with sessions.begin() as s:
        assert store.batch_counts(s, "b2") == {"queued": 2, "running": 0, "succeeded": 1, "failed": 0, "dead": 0,
                                               "cancelled": 0}
        assert s.scalar(select(Job.error).where(Job.id == spec2.job_id)) is None


def failed(spec, kind: str, worker: str = "w1") -> RenderResult:
    return RenderResult(job_id=spec.job_id, attempt=spec.attempt, ok=False, worker=worker, seconds=1,
                        error=f"{kind} trouble", error_kind=kind)


def test_one_lifecycle_charges_each_failure_to_whoever_caused_it(database_url: str) -> None:
    """The embedded run's side of dispatcher.lifecycle (the fleet's is in test_dispatch): a transient failure
    waits out its backoff and is charged, a worker's fault goes back at once uncharged, bad input fails, and a
    job whose budget is spent is dead with its reason."""
    sessions = store.open_database(database_url)
    record(sessions, rows="id,prompt\na,x\n")
    now = T0
    with sessions.begin() as s:
        [spec] = store.claim(s, "w1", now, LEASE)
        assert store.record_result(s, spec, failed(spec, "worker"), now, POLICY) == (
            JobStatus.QUEUED, "the worker's fault: queued again for another worker, nothing charged")
        assert store.claim(s, "w1", now, LEASE, skip_models=["tiny"]) == []  # the model this worker cannot load
        for charged in (1, 2):
            [spec] = store.claim(s, "w1", now, LEASE)
            status, note = store.record_result(s, spec, failed(spec, "error"), now, POLICY)
            assert (status, note) == (JobStatus.QUEUED, f"failed, retry in {10 * 2 ** (charged - 1)} s")
            assert store.claim(s, "w1", now, LEASE) == []  # backing off
            retry_at = store.next_retry(s, "b1")
            assert retry_at == now + timedelta(seconds=10 * 2 ** (charged - 1))
            now = retry_at
        [spec] = store.claim(s, "w1", now, LEASE)
        assert store.record_result(s, spec, failed(spec, "nan"), now, POLICY) == (
            JobStatus.DEAD, "dead after 3 attempts on 1 workers")
        attempts = [a.status for a in s.scalars(select(Attempt).order_by(Attempt.number))]
        job = s.scalars(select(Job)).one()
    assert attempts == ["worker", "failed", "failed", "failed"]
    assert (job.status, job.error, job.attempts) == (JobStatus.DEAD, "nan trouble", 4)

    record(sessions, "b2", rows="id,prompt\na,x\n")  # submitted again: a fresh budget
    with sessions.begin() as s:
        [spec] = store.claim(s, "w1", now, LEASE)
        assert store.record_result(s, spec, failed(spec, "bad_input"), now, POLICY) == (
            JobStatus.FAILED, "failed: bad input, not retried")
    record(sessions, "b3", rows="id,prompt\na,x\n")
    with sessions.begin() as s:
        [spec] = store.claim(s, "w1", now, LEASE)
        assert store.record_result(s, spec, failed(spec, "oom"), now, POLICY)[0] is JobStatus.FAILED  # one card


def test_a_late_or_duplicate_result_is_rejected_and_changes_nothing(database_url: str) -> None:
    sessions = store.open_database(database_url)
    record(sessions)
    with sessions.begin() as s:
        [spec] = store.claim(s, "w1", T0, LEASE)
        store.release(s, spec.job_id, spec.attempt, T0, "lease expired")
        [again] = store.claim(s, "w2", T0, LEASE)
    assert (again.job_id, again.attempt) == (spec.job_id, 2)
    with pytest.raises(StaleStateError), sessions.begin() as s:
        store.record_result(s, spec, ok(spec, "w1"), T0, POLICY)  # attempt 1 came back late
    with sessions.begin() as s:
        store.record_result(s, again, ok(again, "w2"), T0, POLICY)
    with pytest.raises(StaleStateError), sessions.begin() as s:
        store.record_result(s, again, ok(again, "w2"), T0, POLICY)  # the same report twice
    with sessions.begin() as s:
        outputs = list(s.scalars(select(Output).where(Output.job_id == spec.job_id)))
        attempts = {a.number: a.status for a in s.scalars(select(Attempt).where(Attempt.job_id == spec.job_id))}
    assert [o.worker for o in outputs] == ["w2"]
    assert attempts == {1: "lost", 2: "succeeded"}


def test_claim_batches_jobs_of_one_shape_in_manifest_order(database_url: str) -> None:
    sessions = store.open_database(database_url)
    record(sessions, rows="id,prompt,width\na,x,512\nb,y,768\nc,z,512\nd,w,512\n")
    with sessions.begin() as s:
        first = store.claim(s, "w1", T0, LEASE, limit=3)
        second = store.claim(s, "w1", T0, LEASE, limit=3)
    assert [j.row_id for j in first] == ["a", "c", "d"]
    assert [j.row_id for j in second] == ["b"]


def test_claim_takes_the_warm_shape_first_then_the_order_and_nothing_of_a_paused_batch(database_url: str) -> None:
    sessions = store.open_database(database_url)
    record(sessions, rows="id,prompt,width\na,x,512\nb,y,768\nc,z,512\nd,w,768\n")
    record(sessions, "b2", rows="id,prompt\ne,v\n")
    with sessions.begin() as s:
        [a] = store.claim(s, "w1", T0, LEASE, batch_id="b1")
        assert a.row_id == "a"  # nothing warm yet: the first in the manifest
        taken = []
        for _ in range(3):  # the warm shape while it lasts, then the next in the manifest, which becomes warm
            [spec] = store.claim(s, "w1", T0, LEASE, batch_id="b1", prefer_model="tiny", prefer_shape=a.params.shape)
            taken.append(spec.row_id)
            a = spec
        assert taken == ["c", "b", "d"]
        s.get_one(Batch, "b1").paused = True
        store.reprioritize_batch(s, "b1")
        assert store.claim(s, "w1", T0, LEASE, batch_id="b1") == []
        [e] = store.claim(s, "w1", T0, LEASE)  # of all batches: only b2's job is not paused
        assert (e.row_id, e.batch_id) == ("e", "b2")


def test_a_claim_of_the_warm_shape_reads_its_order_from_an_index(database_url: str) -> None:
    """What keeps `kiln render` of 100,000 jobs claiming in milliseconds (benchmarks/scale.py prints it): the
    warm shape's next jobs come from ix_jobs_claim in order, with no sort of the queued jobs. Sorting is made
    as costly as the database allows, so a plan that needs one shows it even on a small table."""
    sessions = store.open_database(database_url)
    record(sessions, rows="id,prompt\na,x\nb,y\nc,z\n")
    statements: list[tuple[str, Any]] = []
    with sessions.begin() as s:
        [first] = store.claim(s, "w1", T0, LEASE, batch_id="b1")
        engine = s.get_bind()
        listen = lambda conn, cursor, sql, params, context, many: statements.append((sql, params))  # noqa: E731
        event.listen(engine, "before_cursor_execute", listen)
        try:
            store.claim(s, "w1", T0, LEASE, batch_id="b1", prefer_model="tiny", prefer_shape=first.params.shape)
        finally:
            event.remove(engine, "before_cursor_execute", listen)
        sql, params = next((sql, params) for sql, params in statements if "ORDER BY" in sql)
        if engine.dialect.name == "postgresql":
            s.execute(text("SET LOCAL enable_sort = off"))
            s.execute(text("SET LOCAL enable_seqscan = off"))
            plan = "\n".join(row[0] for row in s.connection().exec_driver_sql(f"EXPLAIN {sql}", params))
            assert "ix_jobs_claim" in plan and "Sort" not in plan, plan
        else:
            plan = "\n".join(row[-1] for row in s.connection().exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
            assert "ix_jobs_claim" in plan and "TEMP B-TREE" not in plan, plan


def test_concurrent_claimers_never_get_the_same_job(database_url: str) -> None:
    sessions = store.open_database(database_url)
    rows = "id,prompt\n" + "".join(f"r{i},p{i}\n" for i in range(40))
    record(sessions, rows=rows)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            with sessions.begin() as s:
                jobs = store.claim(s, name, T0, LEASE)
            if not jobs:
                return
            with lock:
                claimed.extend(j.job_id for j in jobs)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(claimed) == 40 == len(set(claimed))


def test_export_rows_mirror_the_manifest_row_and_say_how_each_image_was_made(database_url: str) -> None:
    sessions = store.open_database(database_url)
    record(sessions, rows="id,prompt,Vendor\na,x,North\n")
    with sessions.begin() as s:
        [spec] = store.claim(s, "w1", T0, LEASE)
        store.record_result(s, spec, ok(spec), T0, POLICY)
        [row] = list(store.export_rows(s, "b1"))
    assert row["id"] == "a" and row["Vendor"] == "North"
    assert (row["kiln_status"], row["kiln_output_uri"], row["kiln_worker"], row["kiln_attempts"]) == (
        "succeeded", "file:///out/b/a.png", "w1", 1)
    assert row["kiln_seed"] == spec.params.seed and row["kiln_model"] == "tiny"


def test_find_batch_by_prefix_and_newest(database_url: str) -> None:
    sessions = store.open_database(database_url)
    record(sessions, "abc111")
    with sessions.begin() as s:
        s.add(Batch(id="abd222", name="n", manifest="m", manifest_sha256="0", created_at=T0 + LEASE))
    with sessions.begin() as s:
        assert store.find_batch(s, "abc").id == "abc111"  # type: ignore[union-attr]
        assert store.find_batch(s, "ab") is None  # ambiguous
        assert store.find_batch(s, None).id == "abd222"  # type: ignore[union-attr]


def test_unreachable_database_is_a_config_error_naming_the_variable() -> None:
    from schemas.errors import ConfigError

    with pytest.raises(ConfigError, match="KILN_DATABASE_URL: cannot open"):
        store.open_database("postgresql+psycopg://nobody@127.0.0.1:1/none")


def test_processes_starting_together_migrate_the_database_once(database_url: str) -> None:
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            store.open_database(database_url)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []


def test_a_submit_racing_another_for_the_same_new_jobs_links_them_instead_of_failing(postgres_url: str) -> None:
    sessions = store.open_database(postgres_url)
    jobs = expansion()

    def batch(batch_id: str) -> Batch:
        return Batch(id=batch_id, name="b", manifest="m.csv", manifest_sha256="0" * 64, created_at=T0)

    first = sessions()
    first.begin()
    store.record_batch(first, batch("b1"), jobs, T0)  # inserted, not committed: the race's winner, mid-way
    second: list[store.Recorded] = []
    racer = threading.Thread(target=lambda: second.append(store.record_new_batch(sessions, lambda: batch("b2"),
                                                                                  jobs, lambda: T0)))
    racer.start()
    racer.join(1.0)
    assert racer.is_alive()  # waiting on the winner's uncommitted job rows
    first.commit()
    first.close()
    racer.join(30)
    assert not racer.is_alive() and (second[0].new, second[0].jobs) == (0, 3)  # not inserted twice
    assert second[0].batch_id == "b1"  # the same manifest again, with nothing new to render: the same batch
    with sessions.begin() as s:
        assert len(s.scalars(select(Job)).all()) == 3 and len(s.scalars(select(Batch)).all()) == 1
        assert store.batch_counts(s, "b1")["queued"] == 3


def migrator(engine: Engine) -> Callable[[Callable[[Config, str], None], str], None]:
    """migrate(command.upgrade or command.downgrade, revision) on `engine`'s database."""
    def migrate(step: Callable[[Config, str], None], revision: str) -> None:
        with engine.begin() as conn:
            config = Config()
            config.set_main_option("script_location", str(store.MIGRATIONS))
            config.attributes["connection"] = conn
            step(config, revision)

    return migrate


def test_migration_0004_moves_an_older_databases_jobs_to_their_models_queue(database_url: str) -> None:
    engine = create_engine(database_url)
    migrate = migrator(engine)
    migrate(command.upgrade, "0003")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO jobs (id, queue, min_vram_gb, model, prompt, width, height, steps, guidance, "
                          "seed, output_key, status, attempts, created_at, updated_at, budget_from) VALUES ('j1', "
                          "'kiln.render.vram16', 0, 'tiny:klein-9b', 'p', 512, 512, 4, 1.0, 1, 'k', 'queued', 0, "
                          ":t, :t, 0)"), {"t": T0})
    migrate(command.upgrade, "head")
    with engine.begin() as conn:
        assert conn.scalar(text("SELECT queue FROM jobs")) == "kiln.render.tiny-klein-9b.vram16"
        # 0008: the job's shape, as RenderParams derives it, so it batches with jobs recorded since
        assert conn.scalar(text("SELECT shape FROM jobs")) == RenderParams(
            model="tiny:klein-9b", prompt="p", width=512, height=512, steps=4, guidance=1.0, seed=1).shape
    migrate(command.downgrade, "0003")
    with engine.begin() as conn:
        assert conn.scalar(text("SELECT queue FROM jobs")) == "kiln.render.vram16"
    engine.dispose()


def test_migration_0011_gives_older_jobs_the_publishing_order_new_ones_get(database_url: str) -> None:
    sessions = store.open_database(database_url)
    with sessions.begin() as s:  # b2 asks for b and c again, later, at a higher priority; b3 is paused
        for batch_id, created, priority, paused, rows in (
                ("b1", T0, 2, False, "id,prompt\na,x\nb,y\nc,z\n"),
                ("b2", T0 + timedelta(minutes=5, microseconds=700_000), 5, False, "id,prompt\nb,y\nc,z\nd,w\n"),
                ("b3", T0 + timedelta(hours=1), 9, True, "id,prompt\nd,w\ne,v\n")):
            store.record_batch(s, Batch(id=batch_id, name="b", manifest="m.csv", manifest_sha256="0" * 64,
                                        created_at=created, priority=priority, paused=paused), expansion(rows), T0)
    with sessions.begin() as s:
        recorded = {row.id: (row.priority, row.ordinal) for row in s.execute(select(Job.id, Job.priority, Job.ordinal))}
    with sessions() as s:
        prompts = {j.id: j.prompt for j in s.scalars(select(Job))}
    assert {prompts[j]: p for j, (p, _) in recorded.items()} == {"x": 2, "y": 5, "z": 5, "w": 5, "v": None}
    assert sorted(recorded, key=lambda j: recorded[j][1]) == sorted(prompts, key=lambda j: "xyzwv".index(prompts[j]))
    engine = create_engine(database_url)
    migrate = migrator(engine)
    migrate(command.downgrade, "0010")
    migrate(command.upgrade, "head")
    with engine.begin() as conn:
        assert {row[0]: (row[1], row[2]) for row in conn.execute(text("SELECT id, priority, ordinal FROM jobs"))} \
            == recorded
    engine.dispose()
