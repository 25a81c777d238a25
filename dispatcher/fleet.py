"""The fleet's bookkeeping in SQL: feeding render queues, recording reports and heartbeats, reaping silent
workers, retrying with backoff, withdrawing messages nobody wants any more. No I/O but through what is passed
in: sessions, the bucket, and callables that publish or mark."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import store
from dispatcher.bucket import Bucket, StoredObject
from schemas.capacity import TIERS, job_queue, queue_name, queue_tier, why_unfit
from schemas.errors import KilnError, StaleStateError
from schemas.job import JobSpec, JobStatus, RenderResult
from schemas.messages import Heartbeat, RenderTask, Report, unwanted_key
from schemas.models import resolve_model
from schemas.plan import PROFILES, Shape
from schemas.settings import KilnSettings
from schemas.storage import KeyTakenError
from schemas.tables import Attempt, Batch, BatchJob, Job, Output, Worker

Publish = Callable[[str, dict[str, Any]], None]  # (queue, RenderTask payload)
QUEUES = [queue_name(t) for t in TIERS]
LOST_QUEUE_GRACE = timedelta(seconds=20)
REPORT_RETRY_SECONDS = 3.0  # a report that cannot be recorded yet is tried again this much later...
REPORT_RETRIES = 1200  # ...for an hour; then it is dropped and the reaper gives the job back


@dataclass(frozen=True)
class Policy:
    """The numbers that govern retries and silence, from the settings."""

    backlog: int
    message_ttl: timedelta
    worker_timeout: timedelta
    max_attempts: int
    retry_base: timedelta
    time_limit: timedelta = timedelta(minutes=30)  # a worker kills a render running longer
    report_hold: timedelta = timedelta(seconds=REPORT_RETRY_SECONDS * REPORT_RETRIES)  # a report in hand keeps
    # its job from the reaper while it is being retried

    @classmethod
    def from_settings(cls, s: KilnSettings) -> Policy:
        """Build from KilnSettings."""
        return cls(s.backlog, timedelta(seconds=s.message_ttl_seconds), timedelta(seconds=s.worker_timeout_seconds),
                   s.max_attempts, timedelta(seconds=s.retry_base_seconds),
                   timedelta(seconds=s.job_time_limit_seconds))


def withdraw(session: Session, mark: Callable[[str], None]) -> int:
    """Tell workers which published render messages are no longer wanted: those of cancelled jobs, and of queued
    jobs whose every batch is paused (published again on resume). A worker checks before rendering and before
    uploading (schemas.messages.unwanted_key)."""
    wanted = (select(BatchJob.job_id).join(Batch, Batch.id == BatchJob.batch_id)
              .where(BatchJob.job_id == Job.id, Batch.paused.is_(False)).exists())
    jobs = session.scalars(select(Job).where(Job.published_at.is_not(None), or_(
        Job.status == JobStatus.CANCELLED, and_(Job.status == JobStatus.QUEUED, ~wanted)))).all()
    for job in jobs:
        assert job.published_at is not None
        mark(unwanted_key(job.id, token(job.published_at)))
        job.published_at = None
    return len(jobs)


def token(published_at: datetime) -> str:
    """Which publication of a job a render message is."""
    return published_at.isoformat()


def feed(session: Session, now: datetime, policy: Policy, bucket: Bucket, publish: Publish,
         queue_depth: Callable[[str], int]) -> int:
    """Top every render queue up to the backlog from the database; republish what the broker lost."""
    published = 0
    for queue in QUEUES:
        waiting = _waiting(session, queue)
        stale = now - policy.message_ttl
        lost = queue_depth(queue) == 0 and waiting > 0
        # A message not taken within its TTL has expired on the broker; an empty queue that should hold
        # messages means the broker lost them (a Redis restart without AOF). Either way: publish again.
        session.execute(update(Job).where(
            Job.status == JobStatus.QUEUED, Job.queue == queue, Job.published_at.is_not(None),
            Job.published_at < (now - LOST_QUEUE_GRACE if lost else stale)).values(published_at=None))
        free = policy.backlog - _waiting(session, queue)
        for job, batch_id in _next_jobs(session, queue, now, free) if free > 0 else []:
            spec = _spec(session, job, batch_id)
            publish(queue, RenderTask(job=spec, upload=bucket.upload_for(job.id, job.output_key),
                                      reference_url=bucket.reference_url(spec), token=token(now))
                    .model_dump(mode="json"))
            job.published_at = now
            published += 1
    return published


def _waiting(session: Session, queue: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.status == JobStatus.QUEUED, Job.queue == queue, Job.published_at.is_not(None))) or 0


def _next_jobs(session: Session, queue: str, now: datetime, limit: int) -> list[tuple[Job, str]]:
    """The next publishable jobs of a queue: highest batch priority, then oldest batch, then manifest order."""
    query = (select(Job, func.min(BatchJob.batch_id)).join(BatchJob, BatchJob.job_id == Job.id)
             .join(Batch, Batch.id == BatchJob.batch_id)
             .where(Job.status == JobStatus.QUEUED, Job.queue == queue, Job.published_at.is_(None),
                    or_(Job.not_before.is_(None), Job.not_before <= now), Batch.paused.is_(False))
             .group_by(Job.id)
             .order_by(func.max(Batch.priority).desc(), func.min(Batch.created_at), func.min(BatchJob.position))
             .limit(limit))
    return [(job, batch_id) for job, batch_id in session.execute(query)]


def _spec(session: Session, job: Job, batch_id: str) -> JobSpec:
    link, batch = session.execute(select(BatchJob, Batch).join(Batch, Batch.id == BatchJob.batch_id)
                                  .where(BatchJob.job_id == job.id, BatchJob.batch_id == batch_id)).one()
    return JobSpec(job_id=job.id, attempt=job.attempts + 1, batch_id=batch.id, manifest=batch.manifest,
                   manifest_row=link.manifest_row, row_id=link.row_id, model=job.model, prompt=job.prompt,
                   width=job.width, height=job.height, steps=job.steps, guidance=job.guidance, seed=job.seed,
                   output_key=job.output_key, reference=job.reference, reference_sha256=job.reference_sha256)


def receive_report(sessions: sessionmaker[Session], report: Report, clock: Callable[[], datetime], policy: Policy,
                   bucket: Bucket) -> str:
    """Record a report in full: a finished job is touched first and its upload checked outside any transaction,
    so a slow storage answer holds no row lock and the reaper leaves the job be meanwhile; then recorded."""
    stored = None
    if report.kind == "finished" and report.result and report.result.ok:
        with sessions.begin() as session:
            key = touch(session, report, clock())
        stored = bucket.stat(key) if key else None
    with sessions.begin() as session:
        return record_report(session, report, clock(), policy, bucket, stored)


def record_report(session: Session, report: Report, now: datetime, policy: Policy, bucket: Bucket,
                  stored: StoredObject | None = None) -> str:
    """Record a worker's report; returns what happened, for the log. Late and duplicate reports change nothing.
    `stored` is what the bucket holds at the job's output key, looked up before this transaction
    (`receive_report`)."""
    job = session.get(Job, report.job_id, with_for_update=True)
    if job is None:
        return "unknown job"
    if job.status is JobStatus.QUEUED and job.attempts == report.attempt - 1:
        _start(session, job, report, now)  # a started report may arrive late, or not at all
    elif (job.status is JobStatus.CANCELLED and job.attempts == report.attempt - 1 and report.result is not None
          and report.result.ok and stored is not None and stored.job_id == job.id):
        # Cancelled while its message was in flight, and its image landed before the worker could hear: the image
        # is kept and recorded, so that no stored image is without its row.
        _start(session, job, report, now, JobStatus.CANCELLED)
    elif report.kind == "started":
        return f"stale start (job is {job.status.value}, attempt {job.attempts})"
    if report.kind == "started":
        return "started"
    if job.attempts == report.attempt and job.worker == report.worker and job.status is not JobStatus.RUNNING:
        return f"already recorded (job is {job.status.value})"  # delivered again after a commit we never heard of
    if job.status is not JobStatus.RUNNING or job.attempts != report.attempt or job.worker != report.worker:
        return f"stale result (job is {job.status.value}, attempt {job.attempts}, worker {job.worker})"
    assert report.result is not None, "a finished report carries its result"
    if report.result.ok:
        return _succeed(session, job, report.result, now, policy, bucket, stored)
    return _fail(session, job, report.result, now, policy)


def touch(session: Session, report: Report, now: datetime) -> str | None:
    """Note that a running job's report is in hand but not yet recorded, so the reaper leaves the job be while
    its upload is checked; returns the job's output key (None for a job this database does not know)."""
    session.execute(update(Job).where(Job.id == report.job_id, Job.status == JobStatus.RUNNING,
                                      Job.attempts == report.attempt).values(updated_at=now, reported_at=now))
    return session.scalar(select(Job.output_key).where(Job.id == report.job_id))


def _start(session: Session, job: Job, report: Report, now: datetime, was: JobStatus = JobStatus.QUEUED) -> None:
    store.move(session, job.id, was, JobStatus.RUNNING, job.attempts, now, attempts=report.attempt,
               worker=report.worker, reported_at=None)
    session.add(Attempt(job_id=job.id, number=report.attempt, worker=report.worker, status="running", started_at=now))
    session.refresh(job)


def _succeed(session: Session, job: Job, result: RenderResult, now: datetime, policy: Policy, bucket: Bucket,
             stored: StoredObject | None) -> str:
    if stored is None:
        return _fail(session, job, result.model_copy(update={
            "ok": False, "error": "the worker reported an upload that is not in the bucket", "error_kind": "error"}),
            now, policy)
    if stored.job_id != job.id:
        return _fail(session, job, result.model_copy(update={
            "ok": False, "error_kind": "bad_input",
            "error": str(KeyTakenError(bucket.uri(job.output_key), stored.job_id))}), now, policy)
    own = result.md5 == stored.md5  # False: an earlier attempt's upload of this same job stood
    store.move(session, job.id, JobStatus.RUNNING, JobStatus.SUCCEEDED, job.attempts, now, error=None)
    store.finish_attempt(session, job.id, job.attempts, "succeeded", now, seconds=result.seconds, plan=result.plan)
    link = session.execute(select(BatchJob, Batch).join(Batch, Batch.id == BatchJob.batch_id)
                           .where(BatchJob.job_id == job.id).order_by(Batch.created_at)).first()
    assert link is not None
    session.add(Output(job_id=job.id, batch_id=link[0].batch_id, manifest=link[1].manifest,
                       manifest_row=link[0].manifest_row, key=job.output_key, uri=bucket.uri(job.output_key),
                       sha256=result.sha256 if own else None, md5=stored.md5, bytes=stored.size,
                       worker=result.worker, seconds=result.seconds, plan=result.plan, created_at=now))
    return "succeeded" if own else "succeeded (an earlier attempt's upload stood)"


def _fail(session: Session, job: Job, result: RenderResult, now: datetime, policy: Policy) -> str:
    oom = result.error_kind == "oom"
    store.move(session, job.id, JobStatus.RUNNING, JobStatus.FAILED, job.attempts, now, error=result.error)
    # An attempt that ran out of memory is the card's fault, not the job's, and one withdrawn (its batch paused
    # while it rendered) nobody's: neither is charged (see _charged).
    attempt_status = result.error_kind if result.error_kind in ("oom", "withdrawn") else "failed"
    store.finish_attempt(session, job.id, job.attempts, attempt_status, now, error=result.error,
                         error_kind=result.error_kind, seconds=result.seconds, plan=result.plan)
    if result.error_kind == "bad_input":
        return "failed: bad input, not retried"
    if result.error_kind == "withdrawn":
        store.move(session, job.id, JobStatus.FAILED, JobStatus.QUEUED, job.attempts, now, error=None,
                   published_at=None, not_before=None)
        return "withdrawn while it rendered: queued again, published once its batch is wanted"
    if oom:
        # Never the same shape on the same class of card again: the job now needs a bigger class than the
        # biggest this worker serves.
        served = session.scalar(select(Worker.queues).where(Worker.name == result.worker)) or []
        above = max((queue_tier(q) for q in served), default=queue_tier(job.queue) if job.queue else 0)
        queue = job_queue(resolve_model(job.model).profile, job.width, job.height,
                          references=1 if job.reference else 0, above=above)
        if queue is None:
            _dead(session, job, now, f"{result.error}; no bigger card can take it")
            return "dead: out of memory everywhere"
        store.move(session, job.id, JobStatus.FAILED, JobStatus.QUEUED, job.attempts, now, queue=queue,
                   min_vram_gb=queue_tier(queue), published_at=None, not_before=None)
        return f"out of memory on {result.worker}: moved to {queue}"
    charged, workers = _charged(session, job.id)
    if _exhausted(charged, workers, policy):
        _dead(session, job, now, result.error or "failed")
        return f"dead after {charged} attempts on {workers} workers"
    delay = policy.retry_base * 2 ** (charged - 1)
    store.move(session, job.id, JobStatus.FAILED, JobStatus.QUEUED, job.attempts, now, published_at=None,
               not_before=now + delay)
    return f"failed, retry in {delay.total_seconds():.0f} s"


def _charged(session: Session, job_id: str) -> tuple[int, int]:
    """(attempts charged to a job since it was last submitted, workers they were on): the ones that failed or
    were lost. Attempts that ran out of memory moved the job to a bigger card and are the card's, not the job's."""
    since = select(Job.budget_from).where(Job.id == job_id).scalar_subquery()
    charged, workers = session.execute(select(func.count(), func.count(func.distinct(Attempt.worker))).where(
        Attempt.job_id == job_id, Attempt.number > since, Attempt.status.in_(["failed", "lost"]))).one()
    return charged, workers


def _exhausted(charged: int, workers: int, policy: Policy) -> bool:
    """Whether to give up: max_attempts charged tries on at least two workers (one bad card does not kill a job),
    or twice that on one."""
    return charged >= policy.max_attempts and (workers >= 2 or charged >= 2 * policy.max_attempts)


def _dead(session: Session, job: Job, now: datetime, error: str) -> None:
    store.move(session, job.id, JobStatus.FAILED, JobStatus.DEAD, job.attempts, now, error=error)


def record_heartbeat(session: Session, beat: Heartbeat, now: datetime) -> None:
    """Register a worker or refresh what it is doing."""
    store.see_worker(session, beat.worker, beat.device, int(beat.vram_gb * 1024), now)
    session.execute(update(Worker).where(Worker.name == beat.worker).values(
        queues=beat.queues, loaded_model=beat.loaded_model, plan=beat.plan, current_job=beat.current_job,
        step=f"{beat.step}/{beat.steps}" if beat.step is not None else None,
        seconds_per_image=beat.seconds_per_image))


def reap(session: Session, now: datetime, policy: Policy) -> int:
    """Give back the running jobs of workers that went silent, or that live but say they are not on the job
    (its GPU process died and Celery gave up on the message), and every job running past its time limit plus the
    worker timeout, whatever its worker's heartbeats say (a render hung where the worker cannot kill it). A job
    whose workers keep vanishing goes dead."""
    cutoff = now - policy.worker_timeout
    silent = or_(Worker.last_seen.is_(None), Worker.last_seen < cutoff)
    elsewhere = or_(Worker.current_job.is_(None), Worker.current_job != Job.id)
    overdue = Job.updated_at < cutoff - policy.time_limit
    # A report in hand means the worker is done with the job; while it waits to be recorded (storage slow to
    # confirm the upload), giving the job back would only render it again.
    unreported = or_(Job.reported_at.is_(None), Job.reported_at < now - policy.report_hold)
    rows = session.execute(select(Job.id, Job.attempts, Job.worker, silent, overdue)
                           .outerjoin(Worker, Worker.name == Job.worker)
                           .where(Job.status == JobStatus.RUNNING, Job.updated_at < cutoff, unreported,
                                  or_(silent, elsewhere, overdue)))
    reaped = 0
    for job_id, attempt, worker, was_silent, was_overdue in rows.all():
        reason = f"worker {worker} " + (
            "went silent" if was_silent else
            f"ran past the {policy.time_limit.total_seconds():.0f} s time limit" if was_overdue else
            "stopped working on it (its process died)")
        try:
            with session.begin_nested():  # all of it, or none if the job moved meanwhile
                store.finish_attempt(session, job_id, attempt, "lost", now, error=reason)
                charged, workers = _charged(session, job_id)
                if _exhausted(charged, workers, policy):
                    store.move(session, job_id, JobStatus.RUNNING, JobStatus.DEAD, attempt, now, lease_until=None,
                               error=f"lost {charged} times: {reason}")
                else:
                    store.move(session, job_id, JobStatus.RUNNING, JobStatus.QUEUED, attempt, now,
                               lease_until=None, worker=None, published_at=None)
            reaped += 1
        except StaleStateError:
            pass
    return reaped


def unfit_jobs(session: Session, batch_id: str) -> list[tuple[str, str]]:
    """(row id, reason) for a batch's queued jobs that no registered worker can take."""
    served = [q for queues in session.scalars(select(Worker.queues)) for q in queues or []]
    largest = max((queue_tier(q) for q in served), default=None)
    rows = session.execute(select(BatchJob.row_id, Job).join(Job, BatchJob.job_id == Job.id).where(
        BatchJob.batch_id == batch_id, Job.status == JobStatus.QUEUED))
    out = []
    for row_id, job in rows:
        tier = queue_tier(job.queue) if job.queue else None
        if tier is None or largest is None or largest < tier:
            try:
                profile = resolve_model(job.model).profile
            except KilnError:
                profile = job.model
            shape = Shape.of(job.width, job.height, 1, 1 if job.reference else 0)
            out.append((row_id, why_unfit(profile, shape, largest) if profile in PROFILES
                        else f"{job.model} is not a model this dispatcher knows"))
    return out
