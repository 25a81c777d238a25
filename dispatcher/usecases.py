"""What a person asks of Kiln, as functions that return typed results: the CLI (and a dashboard) only present them.

Sessions come in; nothing here prints. So far: the fleet's workers, a batch's status and progress, batch control
(pause, resume, priority, cancel, retry) and a batch's export rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dispatcher import fleet, store
from dispatcher.expand import image_job_id
from schemas.capacity import job_queue, model_key, queue_model_key
from schemas.errors import ConfigError, KilnError
from schemas.job import REQUEUEABLE, JobStatus
from schemas.manifest import RowFields, describe
from schemas.models import resolve_model
from schemas.tables import Attempt, Batch, BatchJob, Job, Output, Worker

FORGET_AFTER = timedelta(days=1)  # a worker silent this long is no longer listed
RATE_WINDOW = timedelta(minutes=10)  # the recent past whose finished images measure a batch's throughput


@dataclass(frozen=True)
class WorkerView:
    """One worker as an operator sees it."""

    name: str
    device: str
    vram_gb: float
    online: bool  # heard from within the worker timeout; offline ones take no work and fit no job
    last_seen: datetime
    models: list[str] = field(default_factory=list)
    unserved: dict[str, str] = field(default_factory=dict)
    problem: str | None = None
    model_loads: dict[str, int] = field(default_factory=dict)
    queues: list[str] = field(default_factory=list)
    loaded_model: str | None = None
    plan: str | None = None
    current_job: str | None = None
    step: str | None = None
    seconds_per_image: float | None = None
    done: int = 0  # attempts it rendered
    failed: int = 0  # attempts that failed on it, whoever's fault

    def as_json(self) -> dict[str, Any]:
        """For --json: last_seen as ISO 8601 UTC."""
        return asdict(self) | {"last_seen": self.last_seen.isoformat() + "Z"}


def workers(session: Session, now: datetime, timeout: timedelta) -> list[WorkerView]:
    """Every worker heard from in the last day, online ones first; older ones are forgotten."""
    counts: dict[tuple[str, str], int] = {
        (worker, status): n for worker, status, n in session.execute(
            select(Attempt.worker, Attempt.status, func.count()).group_by(Attempt.worker, Attempt.status))}
    views = [WorkerView(
        name=w.name, device=w.device, vram_gb=round((w.vram_mb or 0) / 1024, 1),
        online=w.last_seen >= now - timeout, last_seen=w.last_seen, models=w.models or [],
        unserved=w.unserved or {}, problem=w.problem, model_loads=w.model_loads or {}, queues=w.queues or [],
        loaded_model=w.loaded_model, plan=w.plan, current_job=w.current_job, step=w.step,
        seconds_per_image=w.seconds_per_image, done=counts.get((w.name, "succeeded"), 0),
        failed=sum(n for (name, status), n in counts.items() if name == w.name and status not in
                   ("succeeded", "running")))
        for w in session.scalars(select(Worker).where(Worker.last_seen >= now - FORGET_AFTER).order_by(Worker.name))]
    return sorted(views, key=lambda v: not v.online)


@dataclass(frozen=True)
class FailureGroup:
    """A batch's failed (or dead) jobs that share one reason."""

    status: str
    error: str | None
    count: int
    row_id: str  # the first such row, to look at

    def as_json(self) -> dict[str, Any]:
        """For --json."""
        return asdict(self)


@dataclass(frozen=True)
class BatchStatus:
    """Where one batch stands."""

    batch: Batch
    counts: dict[str, int]
    failures: list[FailureGroup] = field(default_factory=list)  # largest group first
    unfit: list[tuple[str, str]] = field(default_factory=list)  # (row id, why no live worker can take it)

    def as_json(self) -> dict[str, Any]:
        """For --json."""
        b = self.batch
        return {"batch_id": b.id, "name": b.name, "manifest": b.manifest, "created_at": b.created_at.isoformat() + "Z",
                "jobs": sum(self.counts.values()), "counts": self.counts, "paused": b.paused, "priority": b.priority}


def recent_batches(session: Session) -> list[BatchStatus]:
    """The newest batches with their job counts."""
    return [BatchStatus(b, store.batch_counts(session, b.id)) for b in store.recent_batches(session)]


def batch_status(session: Session, batch_id: str, now: datetime, timeout: timedelta) -> BatchStatus:
    """One batch (an id or unique prefix): counts, failures with their reasons, and jobs no live worker fits."""
    found = find(session, batch_id)
    return BatchStatus(found, store.batch_counts(session, found.id),
                       [FailureGroup(*g) for g in store.batch_failures(session, found.id)],
                       fleet.unfit_jobs(session, found.id, live_since=now - timeout))


@dataclass(frozen=True)
class BatchProgress:
    """How far along a batch is, and when it will be done at the pace it is going."""

    total: int
    finished: int  # succeeded, failed, dead or cancelled
    active: int  # queued or running
    images_per_hour: float | None  # measured over the last RATE_WINDOW, else from its online workers' speed
    eta: timedelta | None  # None while nothing measures the pace, or when nothing is left

    def as_json(self) -> dict[str, Any]:
        """For --json."""
        return {"total": self.total, "finished": self.finished, "active": self.active,
                "images_per_hour": self.images_per_hour and round(self.images_per_hour, 1),
                "eta_seconds": self.eta and round(self.eta.total_seconds())}


def batch_progress(session: Session, status: BatchStatus, now: datetime, timeout: timedelta) -> BatchProgress:
    """A batch's progress: images finished in the last RATE_WINDOW give the pace; before any has, the online
    workers that serve its models, at their measured seconds per image."""
    counts = status.counts
    active = counts["queued"] + counts["running"]
    total = sum(counts.values())
    succeeded = (select(Job.updated_at).join(BatchJob, BatchJob.job_id == Job.id)
                 .where(BatchJob.batch_id == status.batch.id, Job.status == JobStatus.SUCCEEDED))
    if not active:  # a finished batch: its pace up to its last image, not a pace that fades as time passes
        now = session.scalar(select(func.max(succeeded.subquery().c.updated_at))) or now
    recent = session.scalar(select(func.count()).select_from(
        succeeded.where(Job.updated_at >= now - RATE_WINDOW).subquery())) or 0
    window = min(RATE_WINDOW, max(now - status.batch.created_at, timedelta(seconds=1)))
    rate: float | None = recent / (window.total_seconds() / 3600) if recent else None
    if rate is None and active:
        models = {model_key(m) for m in session.scalars(
            select(Job.model).join(BatchJob, BatchJob.job_id == Job.id)
            .where(BatchJob.batch_id == status.batch.id, Job.status == JobStatus.QUEUED).distinct())}
        speeds = [3600 / (w.seconds_per_image or 1) for w in session.scalars(select(Worker).where(
            Worker.last_seen >= now - timeout, Worker.seconds_per_image > 0))
            if models & {queue_model_key(q) for q in w.queues or []}]
        rate = sum(speeds) or None
    eta = timedelta(hours=active / rate) if rate and active else None
    return BatchProgress(total, total - active, active, rate, eta)


RETRY_SETTABLE = ("steps", "guidance", "seed", "width", "height")  # what `kiln retry --set` may change


@dataclass(frozen=True)
class Retried:
    """What `retry` did."""

    batch_id: str
    requeued: int  # the same jobs, queued again with a fresh attempt budget
    replaced: int  # new jobs with the changed parameters, in the batch in place of the old ones


def retry(session: Session, batch_id: str, statuses: list[JobStatus], changes: dict[str, str],
          now: datetime) -> Retried:
    """Queue a batch's jobs in `statuses` again, in the same batch. With `changes` (RETRY_SETTABLE fields), each
    becomes a new job with those parameters, which names the old one (`retry_of`) and takes its place in the
    batch; the old job and its attempts stay as history."""
    found = find(session, batch_id)
    unknown = sorted(set(changes) - set(RETRY_SETTABLE))
    if unknown:
        raise ConfigError(f"--set {unknown[0]}: only {', '.join(RETRY_SETTABLE)} can be changed on a retry")
    try:
        fields = RowFields.model_validate(changes)
    except ValidationError as exc:
        column = str(exc.errors()[0]["loc"][0])
        raise ConfigError(f"--set {column}={changes[column]}: must be {describe(column)}") from None
    values = {k: getattr(fields, k) for k in changes}
    rows = session.scalars(select(Job).join(BatchJob, BatchJob.job_id == Job.id).where(
        BatchJob.batch_id == found.id, Job.status.in_(statuses)).order_by(BatchJob.position)).all()
    requeued = replaced = 0
    for job in rows:
        if not values:
            store.requeue(session, job, now)
            requeued += 1
            continue
        made = {c: getattr(job, c) for c in ("model", "prompt", "width", "height", "steps", "guidance", "seed",
                                             "output_key", "reference", "reference_sha256")} | values
        new_id = image_job_id(**made)
        if new_id == job.id:
            store.requeue(session, job, now)
            requeued += 1
            continue
        twin = session.get(Job, new_id)
        if twin is None:
            queue = job_queue(job.model, resolve_model(job.model).profile, made["width"], made["height"],
                              references=1 if job.reference else 0)
            if queue is None:
                raise ConfigError(f"--set: {job.model} at {made['width']}x{made['height']} fits no card Kiln knows")
            session.add(Job(id=new_id, queue=queue, min_vram_gb=0, status=JobStatus.QUEUED, attempts=0,
                            created_at=now, updated_at=now, retry_of=job.id, **made))
            session.flush()
        elif twin.status in REQUEUEABLE:
            store.requeue(session, twin, now)
        session.execute(update(BatchJob).where(BatchJob.batch_id == found.id, BatchJob.job_id == job.id)
                        .values(job_id=new_id))
        replaced += 1
    if requeued or replaced:
        found.finished_at = None  # it has work again: batch.finished comes once more when that is done
    return Retried(found.id, requeued, replaced)


@dataclass(frozen=True)
class BatchChange:
    """What a batch control command did."""

    batch: Batch
    cancelled: int = 0  # jobs it cancelled (cancel), or cancelled jobs that stay so (resume)


def find(session: Session, batch_id: str) -> Batch:
    """A batch by id or unique prefix, or a KilnError saying how to find one."""
    found = store.find_batch(session, batch_id)
    if found is None:
        raise KilnError(f"no batch {batch_id!r}: `kiln status` lists the recent ones")
    return found


def pause(session: Session, batch_id: str, paused: bool) -> BatchChange:
    """Pause a batch (no more of its jobs are published or claimed; running ones finish) or resume it. Resuming
    does not bring cancelled jobs back: `cancelled` says how many stay so."""
    found = find(session, batch_id)
    found.paused = paused
    return BatchChange(found, 0 if paused else store.batch_counts(session, found.id)["cancelled"])


def set_priority(session: Session, batch_id: str, priority: int) -> BatchChange:
    """Set a batch's priority: higher batches are published first."""
    found = find(session, batch_id)
    found.priority = priority
    return BatchChange(found)


def cancel(session: Session, batch_id: str, now: datetime) -> BatchChange:
    """Cancel a batch's queued jobs; running ones finish. Submitting the manifest again brings them back."""
    found = find(session, batch_id)
    return BatchChange(found, store.cancel_queued(session, found.id, now))


def export_rows(session: Session, batch_id: str) -> tuple[Batch, list[dict[str, Any]]]:
    """A batch and one row per job: its manifest row's values, then Kiln's columns (store.export_rows)."""
    found = find(session, batch_id)
    return found, list(store.export_rows(session, found.id))


SHOWS: dict[str, list[JobStatus] | None] = {  # a gallery's filters
    "all": None, "done": [JobStatus.SUCCEEDED], "failed": [JobStatus.FAILED], "dead": [JobStatus.DEAD],
    "waiting": [JobStatus.QUEUED, JobStatus.RUNNING], "cancelled": [JobStatus.CANCELLED]}


@dataclass(frozen=True)
class Gallery:
    """One page of a batch's jobs (those a filter shows), each with its parameters and its image's place."""

    batch: Batch
    show: str
    rows: list[dict[str, Any]]  # export rows (store.export_rows)
    shown: int  # jobs the filter shows, on every page
    tallies: dict[str, int]  # how many jobs each filter (SHOWS) shows
    page: int  # from 1
    pages: int


def gallery(session: Session, batch_id: str, show: str = "all", page: int = 1, per_page: int = 48) -> Gallery:
    """The `page`th `per_page` jobs of a batch that `show` (a SHOWS key) picks, in manifest order."""
    if show not in SHOWS:
        raise ConfigError(f"show={show}: one of {', '.join(SHOWS)}")
    found = find(session, batch_id)
    counts = store.batch_counts(session, found.id)
    tallies = {name: sum(n for s, n in counts.items() if statuses is None or JobStatus(s) in statuses)
               for name, statuses in SHOWS.items()}
    pages = max(1, -(-tallies[show] // per_page))
    page = min(max(page, 1), pages)
    rows = list(store.export_rows(session, found.id, SHOWS[show], offset=(page - 1) * per_page, limit=per_page))
    return Gallery(found, show, rows, tallies[show], tallies, page, pages)


def output(session: Session, job_id: str) -> Output | None:
    """The stored image of a succeeded job."""
    return session.scalar(select(Output).where(Output.job_id == job_id))
