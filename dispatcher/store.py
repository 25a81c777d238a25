"""The database adapter: the only module that talks SQL. Sessions are passed in; callers own transactions.

Every status change is a compare-and-set on (id, status, attempts), so a late or duplicate writer changes
nothing and gets StaleStateError instead.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, Table, bindparam, create_engine, event, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import lifecycle
from dispatcher.expand import Expansion
from dispatcher.lifecycle import Fault, RetryPolicy
from schemas.capacity import job_queue, queue_tier
from schemas.errors import ConfigError, KilnError, StaleStateError
from schemas.job import ACTIVE, REQUEUEABLE, JobSpec, JobStatus, RenderResult, check_transition
from schemas.params import RenderParams
from schemas.tables import Attempt, Batch, BatchJob, Event, Job, Output, Worker

MIGRATIONS = Path(__file__).resolve().parent.parent / "schemas" / "migrations"
MIGRATION_LOCK = 0x4B494C4E  # "KILN": the advisory lock that serializes migrations on PostgreSQL
CHUNK = 500  # ids per IN (...) query, well under every database's parameter limit
BULK = 5000  # rows handed to one bulk insert (SQLAlchemy pages them under each database's parameter limit)
BUSY_SECONDS = 10  # how long SQLite waits for another process's write lock before giving up
# The tables themselves, for Core statements on hot paths (a report, a claim): the ORM's unit of work and
# bulk-update machinery cost more than the statements
JOBS, ATTEMPTS, OUTPUTS = (cast(Table, t.__table__) for t in (Job, Attempt, Output))
RECORD_TRIES = 3  # a submit racing others for the same new jobs records again after the first one commits


def open_database(url: str, connections: int = 5) -> sessionmaker[Session]:
    """Connect, bring the schema up to date with Alembic, and return a session factory whose pool keeps up to
    `connections` connections open (and opens up to ten more when busy)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")  # the driver Kiln installs
    engine = create_engine(url, pool_pre_ping=True, pool_size=connections)
    if engine.dialect.name == "sqlite":
        _sqlite_pragmas(engine)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # Processes that start together (a dispatcher and a submit) must not both create the tables.
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except OperationalError as exc:
        where = engine.url.render_as_string(hide_password=True)
        if _locked(exc):
            raise KilnError(f"cannot open {where}: {explain(exc)}") from None
        raise ConfigError(f"KILN_DATABASE_URL: cannot open {where}: {first_line(exc)}") from None
    return sessionmaker(engine, expire_on_commit=False)


def explain(exc: DBAPIError) -> str:
    """What a database failure means for the user and what to do; never the SQL or its parameters."""
    if _locked(exc):
        return (f"the SQLite file is locked by another process (another `kiln render`, or a tool holding a write "
                f"transaction) and stayed locked for {BUSY_SECONDS} s: let it finish, or use another file with "
                "--database-url")
    return (f"lost the database connection ({first_line(exc)}); what this command was saving may or may not have "
            "been saved. Run it again: that is safe, jobs are recorded once, by content")


def first_line(exc: Exception) -> str:
    """The first line of an error (of the driver's own, for a database error): never the SQL or parameters."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def _locked(exc: DBAPIError) -> bool:
    return isinstance(exc.orig, sqlite3.OperationalError) and "locked" in str(exc.orig)


def _sqlite_pragmas(engine: Engine) -> None:
    # WAL lets readers run beside the writer; BEGIN IMMEDIATE takes the write lock up front, which avoids
    # the "database is locked" errors that read-then-write transactions hit under contention.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_SECONDS * 1000}")
        # Switching a new file to WAL answers "locked" at once, without the busy timeout, while another process
        # is doing the same: retry briefly. Once the file is in WAL mode this is a no-op.
        for attempt in range(100):
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if attempt == 99:
                    raise
                time.sleep(0.02)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


@dataclass(frozen=True)
class Recorded:
    """What recording a batch did with each of its jobs."""

    batch_id: str
    jobs: int
    new: int
    requeued: int
    already_done: int
    in_progress: int


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), CHUNK):
        yield items[i:i + CHUNK]


def record_batch(session: Session, batch: Batch, expansion: Expansion, now: datetime) -> Recorded:
    """Record a batch and its jobs. Jobs that already exist are linked, not copied: succeeded ones are not
    rendered again, failed, dead and cancelled ones go back to the queue, and active ones stay as they are."""
    ids = [j.job_id for j in expansion.jobs]
    existing: dict[str, Job] = {}
    for chunk in _chunks(ids):
        existing.update({j.id: j for j in session.scalars(select(Job).where(Job.id.in_(chunk)))})
    if ids and len(existing) == len(set(ids)) and not any(j.status in REQUEUEABLE for j in existing.values()):
        # Nothing to render: the batch that asked for these jobs before stands for this run too.
        same = session.scalars(select(Batch).join(BatchJob, BatchJob.batch_id == Batch.id).where(
            BatchJob.job_id == ids[0], Batch.name == batch.name, Batch.manifest_sha256 == batch.manifest_sha256)
            .order_by(Batch.created_at.desc()).limit(1)).first()
        if same is not None and _links(session, same.id) == len(set(ids)):
            done = sum(j.status is JobStatus.SUCCEEDED for j in existing.values())
            return Recorded(same.id, len(ids), 0, 0, done, len(existing) - done)
    session.add(batch)
    queues: dict[tuple[str, int, int, int], str | None] = {}  # by shape: a catalog has a handful
    new = requeued = done = active = 0
    jobs, links = [], []
    for position, planned in enumerate(expansion.jobs):
        job = existing.get(planned.job_id)
        if job is None:
            params = planned.params
            shape = (params.model, params.width, params.height, params.references)
            if shape not in queues:
                queues[shape] = job_queue(params.model, expansion.models[params.model].profile, params.width,
                                          params.height, references=params.references)
            jobs.append(dict(id=planned.job_id, queue=queues[shape], min_vram_gb=0, budget_from=0,
                             output_key=planned.output_key, status=JobStatus.QUEUED, attempts=0, created_at=now,
                             updated_at=now, priority=None if batch.paused else batch.priority or 0,
                             ordinal=ordinal(batch.created_at or now, position), **params.columns()))
            new += 1
        elif job.status in REQUEUEABLE:
            requeue(session, job, now)
            requeued += 1
        elif job.status is JobStatus.SUCCEEDED:
            done += 1
        else:
            active += 1
        links.append(dict(batch_id=batch.id, job_id=planned.job_id, position=position,
                          manifest_row=planned.manifest_row, manifest_line=planned.manifest_line,
                          row_id=planned.row_id, variant=planned.variant, row_data=planned.row_data))
    session.flush()  # the batch, and requeued jobs
    # Bulk inserts (many rows per statement), not one ORM object per job.
    for table, rows in ((Job, jobs), (BatchJob, links)):  # jobs before the links that point at them
        for i in range(0, len(rows), BULK):
            session.execute(insert(table), rows[i:i + BULK])
    for chunk in _chunks(list(existing)):  # asked for again, maybe at a higher priority, maybe paused elsewhere
        reprioritize(session, chunk)
    return Recorded(batch.id, len(ids), new, requeued, done, active)


def _links(session: Session, batch_id: str) -> int:
    return session.scalar(select(func.count()).select_from(BatchJob).where(BatchJob.batch_id == batch_id)) or 0


def requeue(session: Session, job: Job, now: datetime) -> None:
    """A failed, dead or cancelled job asked for again: queued with a fresh attempt budget, its history kept."""
    move(session, job.id, job.status, JobStatus.QUEUED, job.attempts, now, error=None, published_at=None,
         not_before=None, budget_from=job.attempts)


def record_new_batch(sessions: sessionmaker[Session], make_batch: Callable[[], Batch], expansion: Expansion,
                     clock: Callable[[], datetime]) -> Recorded:
    """Record a batch in a transaction of its own. When a concurrent submit of the same jobs commits first (their
    ids clash), record it again: the jobs exist by then, and are linked instead of inserted."""
    for attempt in range(RECORD_TRIES):
        try:
            with sessions.begin() as session:
                return record_batch(session, make_batch(), expansion, clock())
        except IntegrityError:
            if attempt == RECORD_TRIES - 1:
                raise
    raise AssertionError("unreachable")


def move(session: Session, job_id: str, current: JobStatus, target: JobStatus, attempt: int, now: datetime,
          **values: Any) -> None:
    """Compare-and-set one job's status; raise StaleStateError when someone else moved it first."""
    check_transition(current, target)
    move_all(session, [{"_id": job_id, "_status": current, "_attempts": attempt, "status": target, "updated_at": now,
                        **values}])


def move_all(session: Session, rows: list[dict[str, Any]]) -> None:
    """Compare-and-set jobs in one statement (executemany): each row names its job (`_id`), the status and
    attempt it was read at (`_status`, `_attempts`) and its new values, under the same names in every row. Raise
    StaleStateError when any of them was moved by someone else first. Transitions are checked by the caller."""
    jobs = JOBS.c
    names = [name for name in rows[0] if not name.startswith("_")]
    done = session.execute(update(JOBS).where(
        jobs.id == bindparam("_id"), jobs.status == bindparam("_status"), jobs.attempts == bindparam("_attempts"))
        .values({name: bindparam(name) for name in names}), rows)
    moved: int = done.rowcount  # type: ignore[attr-defined]
    if moved != len(rows):
        if len(rows) == 1:
            row = rows[0]
            raise StaleStateError(f"job {row['_id']} is no longer {row['_status']} at attempt {row['_attempts']}")
        raise StaleStateError(f"{len(rows) - moved} of jobs {', '.join(r['_id'] for r in rows)} moved meanwhile")


def due(now: datetime) -> Any:
    """Jobs whose retry backoff is over (or that have none)."""
    return or_(Job.not_before.is_(None), Job.not_before <= now)


def ordinal(batch_created_at: datetime, position: int) -> int:
    """A new job's place in the order work was asked for (Job.ordinal): its batch's submission second, then its
    position in the batch's manifest. A job asked for again keeps the place its first batch gave it."""
    return int(batch_created_at.replace(tzinfo=UTC).timestamp()) << 32 | position


def reprioritize(session: Session, job_ids: Iterable[str] | Any) -> None:
    """Set the publishing priority of jobs (ids, or a select of them) from their batches: the highest priority of
    those not paused, NULL when every one is paused (Job.priority). Called whenever a batch's priority or pause
    changes, or a batch asks for jobs that exist already."""
    asked = (select(func.max(Batch.priority)).join(BatchJob, BatchJob.batch_id == Batch.id)
             .where(BatchJob.job_id == Job.id, Batch.paused.is_(False)).scalar_subquery())
    session.execute(update(Job).where(Job.id.in_(job_ids)).values(priority=asked)
                    .execution_options(synchronize_session=False))


def reprioritize_batch(session: Session, batch_id: str) -> None:
    """`reprioritize` every job a batch asks for, after a change to the batch (its pause, its priority, its jobs)
    pending in the session."""
    session.flush()
    reprioritize(session, select(BatchJob.job_id).where(BatchJob.batch_id == batch_id))


def claim(session: Session, worker: str, now: datetime, lease: timedelta, *, batch_id: str | None = None,
          limit: int = 1, prefer_model: str | None = None, prefer_shape: str | None = None,
          skip_models: Iterable[str] = ()) -> list[JobSpec]:
    """Take up to `limit` queued jobs of one shape (RenderParams.shape: all but prompt and seed alike) for
    `worker`, marking them running with a lease: jobs of batches not paused whose retry backoff is over, of
    models not in `skip_models`, in the order work was asked for (Job.ordinal), the warm shape's first and then
    the loaded model's. Concurrent claimers skip each other's rows.

    A claim of the warm shape walks ix_jobs_claim (status, model, shape, ordinal) from its first entry, so it
    costs the same however many jobs are queued; only a change of shape or model sorts the queued jobs."""
    if batch_id is not None and session.scalar(select(Batch.paused).where(Batch.id == batch_id)):
        return []
    # priority is NULL exactly when every batch of the job is paused (store.reprioritize)
    query = select(Job).where(Job.status == JobStatus.QUEUED, due(now), Job.priority.is_not(None))
    if skip_models:
        query = query.where(Job.model.not_in(list(skip_models)))
    if batch_id is not None:
        query = query.where(select(BatchJob.job_id).where(
            BatchJob.batch_id == batch_id, BatchJob.job_id == Job.id).exists())

    def take(where: Any, n: int) -> list[Job]:
        return list(session.scalars(query.where(*where).order_by(Job.ordinal).limit(n)
                                    .with_for_update(skip_locked=True)))

    warm = [Job.model == prefer_model] if prefer_model else []
    jobs = take([*warm, Job.shape == prefer_shape], limit) if prefer_shape else []
    if not jobs:  # the warm shape is done: the loaded model's next job leads, or else the next job of all
        jobs = (take(warm, 1) if warm else []) or take([], 1)
        if jobs and limit > 1:
            lead = jobs[0]
            jobs += take([Job.model == lead.model, Job.shape == lead.shape, Job.id != lead.id], limit - 1)
    if not jobs:
        return []
    rows = batch_rows(session, [job.id for job in jobs], batch_id)
    specs = []
    for job in jobs:
        if job.id not in rows:  # its batches were paused since the jobs were read: it stays queued
            continue
        link, batch = rows[job.id]
        attempt = job.attempts + 1
        move(session, job.id, JobStatus.QUEUED, JobStatus.RUNNING, job.attempts, now, attempts=attempt,
             worker=worker, lease_until=now + lease)
        start_attempt(session, job.id, attempt, worker, now)
        specs.append(job_spec(job, link, batch, attempt))
    return specs


def batch_rows(session: Session, job_ids: list[str], batch_id: str | None = None
               ) -> dict[str, tuple[BatchJob, Batch]]:
    """Per job, the manifest row and batch a worker is handed it as: of the batches not paused that ask for it
    (only `batch_id`, when given), the one with the smallest id, in one query for all of them. A job whose every
    such batch is paused is left out."""
    query = (select(BatchJob, Batch).join(Batch, Batch.id == BatchJob.batch_id)
             .where(BatchJob.job_id.in_(job_ids), Batch.paused.is_(False)).order_by(Batch.id.desc()))
    if batch_id is not None:
        query = query.where(BatchJob.batch_id == batch_id)
    return {link.job_id: (link, batch) for link, batch in session.execute(query).tuples()}  # the smallest id stays


def job_spec(job: Job, link: BatchJob, batch: Batch, attempt: int) -> JobSpec:
    """What a worker is handed for one attempt at `job`, as a row of `batch` (`link`)."""
    return JobSpec(job_id=job.id, attempt=attempt, batch_id=batch.id, manifest=batch.manifest,
                   manifest_row=link.manifest_row, row_id=link.row_id, output_key=job.output_key,
                   params=RenderParams.of_row(job))


def start_attempt(session: Session, job_id: str, number: int, worker: str, now: datetime) -> None:
    """The attempt row of a job that just went running."""
    session.execute(insert(ATTEMPTS).values(job_id=job_id, number=number, worker=worker, status="running",
                                            started_at=now))


def add_output(session: Session, job_id: str, result: RenderResult, now: datetime, *, uri: str, key: str,
               md5: str | None, size: int | None, sha256: str | None) -> None:
    """The one output row of a succeeded job, under the first batch that asked for it."""
    session.execute(insert(OUTPUTS).values(
        job_id=job_id, **first_batches(session, [job_id])[job_id], key=key, uri=uri, sha256=sha256, md5=md5,
        bytes=size, worker=result.worker, seconds=result.seconds, plan=result.plan, created_at=now))


def first_batches(session: Session, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """For each job, the batch that asked for it first, as its output row names it: batch_id, manifest and
    manifest_row (one query for all of them)."""
    found: dict[str, dict[str, Any]] = {}
    for job_id, batch_id, row, manifest in session.execute(
            select(BatchJob.job_id, BatchJob.batch_id, BatchJob.manifest_row, Batch.manifest)
            .join(Batch, Batch.id == BatchJob.batch_id).where(BatchJob.job_id.in_(job_ids))
            .order_by(Batch.created_at)):
        found.setdefault(job_id, {"batch_id": batch_id, "manifest": manifest, "manifest_row": row})
    missing = set(job_ids) - set(found)
    assert not missing, f"jobs {sorted(missing)} belong to no batch"
    return found


def record_result(session: Session, spec: JobSpec, result: RenderResult, now: datetime,
                  policy: RetryPolicy) -> tuple[JobStatus, str]:
    """Record this process's own render of one attempt (the embedded run): the job succeeds with its one output
    row, or fails as the lifecycle says (`record_failure`). Returns the job's new status and what happened."""
    if not result.ok:
        return record_failure(session, spec.job_id, spec.attempt, result, now, policy)
    assert result.uri and result.sha256 and result.bytes is not None, "a good result names its object"
    move(session, spec.job_id, JobStatus.RUNNING, JobStatus.SUCCEEDED, spec.attempt, now, lease_until=None,
          error=None)
    finish_attempt(session, spec.job_id, spec.attempt, "succeeded", now, seconds=result.seconds, plan=result.plan)
    add_output(session, spec.job_id, result, now, uri=result.uri, key=spec.output_key, md5=result.md5,
               size=result.bytes, sha256=result.sha256)
    return JobStatus.SUCCEEDED, "succeeded"


def record_failure(session: Session, job_id: str, attempt: int, result: RenderResult, now: datetime,
                   policy: RetryPolicy, bigger_card: Callable[[], str | None] | None = None) -> tuple[JobStatus, str]:
    """Record a failed attempt of a running job and take the lifecycle's next step (dispatcher.lifecycle): failed,
    queued again (after a backoff, or on a bigger card's queue from `bigger_card`), or dead. Without
    `bigger_card` (one machine) a job that ran out of memory stays failed."""
    fault = lifecycle.fault_of(result.error_kind)
    move(session, job_id, JobStatus.RUNNING, JobStatus.FAILED, attempt, now, lease_until=None, error=result.error)
    finish_attempt(session, job_id, attempt, lifecycle.ATTEMPT_STATUS[fault], now, error=result.error,
                   error_kind=result.error_kind, seconds=result.seconds, plan=result.plan)
    charged, workers = charged_attempts(session, job_id)
    step = lifecycle.after_failure(fault, charged, workers, policy)
    if step.status is JobStatus.FAILED:
        return JobStatus.FAILED, step.note
    if step.status is JobStatus.DEAD:
        move(session, job_id, JobStatus.FAILED, JobStatus.DEAD, attempt, now)
        job_dead(session, job_id, now)
        return JobStatus.DEAD, step.note
    values: dict[str, Any] = {"published_at": None, "not_before": now + step.delay if step.delay else None}
    if fault is Fault.NOBODY:
        values["error"] = None
    note = step.note
    if step.bigger_card:
        queue = bigger_card() if bigger_card else None
        if queue is None and bigger_card is None:
            return JobStatus.FAILED, f"out of memory on {result.worker}"
        if queue is None:
            move(session, job_id, JobStatus.FAILED, JobStatus.DEAD, attempt, now,
                 error=f"{result.error}; no bigger card can take it")
            job_dead(session, job_id, now)
            return JobStatus.DEAD, "dead: out of memory everywhere"
        values.update(queue=queue, min_vram_gb=queue_tier(queue))
        note = f"out of memory on {result.worker}: moved to {queue}"
    move(session, job_id, JobStatus.FAILED, JobStatus.QUEUED, attempt, now, **values)
    return JobStatus.QUEUED, note


def add_event(session: Session, kind: str, payload: dict[str, Any], now: datetime) -> None:
    """An event for the webhook, in the transaction that made it happen (dispatcher.webhooks delivers it)."""
    session.add(Event(kind=kind, payload=payload, created_at=now, next_at=now))


def job_dead(session: Session, job_id: str, now: datetime) -> None:
    """The job.dead event of a job that just went dead."""
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    links = session.execute(select(BatchJob.batch_id, BatchJob.row_id).where(BatchJob.job_id == job_id)).all()
    add_event(session, "job.dead", {"job_id": job.id, "batches": [b for b, _ in links], "rows": [r for _, r in links],
                                    "model": job.model,
                                    "output_key": job.output_key, "attempts": job.attempts, "error": job.error},
              now)


def finish_batches(session: Session, now: datetime) -> list[str]:
    """Mark the batches with nothing left queued or running as finished, each with its batch.finished event.
    Each unfinished batch is looked at on its own, its rows walked until one has an active job, so a batch in
    full swing costs a lookup or two (one query for all of them hashed every active job: 39 ms at 100,000
    queued on PostgreSQL, once a tick)."""
    done = []
    for batch in session.scalars(select(Batch).where(Batch.finished_at.is_(None))):
        rows = select(BatchJob.job_id).where(BatchJob.batch_id == batch.id)
        active = rows.join(Job, Job.id == BatchJob.job_id).where(Job.status.in_(list(ACTIVE)))
        if session.scalar(active.limit(1)) is None and session.scalar(rows.limit(1)) is not None:
            done.append(batch)
    for batch in done:
        batch.finished_at = now
        add_event(session, "batch.finished", {"batch_id": batch.id, "name": batch.name, "manifest": batch.manifest,
                                              "counts": batch_counts(session, batch.id)}, now)
    return [b.id for b in done]


def charged_attempts(session: Session, job_id: str) -> tuple[int, int]:
    """(attempts charged to a job since it was last submitted, workers they were on): the ones that failed or
    were lost (dispatcher.lifecycle.CHARGED)."""
    since = select(Job.budget_from).where(Job.id == job_id).scalar_subquery()
    charged, workers = session.execute(select(func.count(), func.count(func.distinct(Attempt.worker))).where(
        Attempt.job_id == job_id, Attempt.number > since, Attempt.status.in_(lifecycle.CHARGED))).one()
    return charged, workers


def release(session: Session, job_id: str, attempt: int, now: datetime, reason: str) -> None:
    """Put a running job back in the queue (its worker stopped or vanished); the attempt is marked lost."""
    move(session, job_id, JobStatus.RUNNING, JobStatus.QUEUED, attempt, now, lease_until=None, worker=None)
    finish_attempt(session, job_id, attempt, "lost", now, error=reason)


def finish_attempt(session: Session, job_id: str, number: int, status: str, now: datetime, **values: Any) -> None:
    finish_attempts(session, [{"_id": job_id, "_number": number, "status": status, "finished_at": now, **values}])


def finish_attempts(session: Session, rows: list[dict[str, Any]]) -> None:
    """End running attempts in one statement (executemany): each row names its job (`_id`) and attempt
    (`_number`) and the values the attempt gets, under the same names in every row."""
    attempts = ATTEMPTS.c
    names = [name for name in rows[0] if not name.startswith("_")]
    session.execute(update(ATTEMPTS).where(
        attempts.job_id == bindparam("_id"), attempts.number == bindparam("_number"), attempts.status == "running")
        .values({name: bindparam(name) for name in names}), rows)


def running_jobs(session: Session) -> list[tuple[str, int, str | None, datetime | None]]:
    """(id, attempt, worker, lease_until) of every running job, for finding orphans."""
    rows = session.execute(select(Job.id, Job.attempts, Job.worker, Job.lease_until)
                           .where(Job.status == JobStatus.RUNNING))
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def see_worker(session: Session, name: str, device: str, vram_mb: int | None, now: datetime) -> None:
    """Register a worker or refresh its last-seen time."""
    worker = session.get(Worker, name)
    if worker is None:
        session.add(Worker(name=name, device=device, vram_mb=vram_mb, first_seen=now, last_seen=now))
    else:
        worker.device, worker.vram_mb, worker.last_seen = device, vram_mb, now


def batch_counts(session: Session, batch_id: str | None) -> dict[str, int]:
    """How many of a batch's jobs (None: of all jobs) are in each status (every status listed, zeros included)."""
    query = select(Job.status, func.count()).group_by(Job.status)
    if batch_id is not None:
        query = query.join(BatchJob, BatchJob.job_id == Job.id).where(BatchJob.batch_id == batch_id)
    rows = session.execute(query)
    counts = {s.value: 0 for s in JobStatus}
    counts.update({status.value: n for status, n in rows})
    return counts


def find_batch(session: Session, batch_id: str | None) -> Batch | None:
    """A batch by id or unique id prefix; the newest batch when `batch_id` is None."""
    if batch_id is None:
        return session.scalars(select(Batch).order_by(Batch.created_at.desc(), Batch.id.desc()).limit(1)).first()
    found = list(session.scalars(select(Batch).where(Batch.id.startswith(batch_id, autoescape=True)).limit(2)))
    return found[0] if len(found) == 1 else None


def recent_batches(session: Session, limit: int = 20) -> list[Batch]:
    """The newest batches first."""
    return list(session.scalars(select(Batch).order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)))


def batch_failures(session: Session, batch_id: str, limit: int = 10) -> list[tuple[str, str | None, int, str]]:
    """A batch's failed and dead jobs grouped by (status, error), the `limit` largest groups, then in manifest
    order: (status, error, how many, the first row id)."""
    first = func.min(BatchJob.position)
    rows = session.execute(
        select(Job.status, Job.error, func.count(), first).join(Job, BatchJob.job_id == Job.id)
        .where(BatchJob.batch_id == batch_id, Job.status.in_([JobStatus.FAILED, JobStatus.DEAD]))
        .group_by(Job.status, Job.error).order_by(func.count().desc(), first).limit(limit)).all()
    row_ids = {position: row_id for position, row_id in session.execute(select(BatchJob.position, BatchJob.row_id)
               .where(BatchJob.batch_id == batch_id, BatchJob.position.in_([r[3] for r in rows])))}
    return [(status.value, error, n, row_ids[position]) for status, error, n, position in rows]


def export_rows(session: Session, batch_id: str, statuses: Iterable[JobStatus] | None = None, offset: int = 0,
                limit: int | None = None) -> Iterable[dict[str, Any]]:
    """One dict per job of the batch (those in `statuses`, if given), in manifest order: the manifest row's values,
    then Kiln's columns."""
    query = (select(BatchJob, Job, Output).join(Job, BatchJob.job_id == Job.id)
             .outerjoin(Output, Output.job_id == Job.id)
             .where(BatchJob.batch_id == batch_id).order_by(BatchJob.position).offset(offset).limit(limit))
    if statuses is not None:
        query = query.where(Job.status.in_(list(statuses)))
    for link, job, output in session.execute(query).yield_per(1000):
        yield {**link.row_data, "kiln_job_id": job.id, "kiln_row": link.manifest_row, "kiln_variant": link.variant,
               "kiln_status": job.status.value, "kiln_output_uri": output.uri if output else None,
               "kiln_output_key": job.output_key, "kiln_sha256": output.sha256 if output else None,
               **{f"kiln_{name}": value for name, value in RenderParams.of_row(job).flat().items()},
               "kiln_worker": job.worker, "kiln_plan": output.plan if output else None,
               "kiln_seconds": round(output.seconds, 3) if output and output.seconds is not None else None,
               "kiln_attempts": job.attempts, "kiln_error": job.error}


def next_retry(session: Session, batch_id: str, skip_models: Iterable[str] = ()) -> datetime | None:
    """When the earliest of a batch's queued jobs waiting out a retry backoff may be taken (None: none waits)."""
    query = (select(func.min(Job.not_before)).join(BatchJob, BatchJob.job_id == Job.id)
             .where(BatchJob.batch_id == batch_id, Job.status == JobStatus.QUEUED, Job.not_before.is_not(None)))
    if skip_models:
        query = query.where(Job.model.not_in(list(skip_models)))
    return session.scalar(query)


def cancel_queued(session: Session, batch_id: str, now: datetime) -> int:
    """Cancel a batch's queued jobs; running ones are left to finish."""
    rows = session.execute(select(Job.id, Job.attempts).join(BatchJob, BatchJob.job_id == Job.id)
                           .where(BatchJob.batch_id == batch_id, Job.status == JobStatus.QUEUED)).all()
    cancelled = 0
    for job_id, attempts in rows:
        try:
            # published_at stays: the fleet's dispatcher tells workers its message is unwanted, then clears it
            move(session, job_id, JobStatus.QUEUED, JobStatus.CANCELLED, attempts, now)
            cancelled += 1
        except StaleStateError:
            pass  # a worker took it meanwhile
    return cancelled
