"""What a person asks of Kiln, as functions that return typed results: the CLI and the dashboard only present them.

Nothing here prints. A manifest in: plan (what it would render), submit (record it for the fleet), render here.
Then: the fleet's workers, a batch's status, progress and gallery, batch control (pause, resume, priority, cancel,
retry) and a batch's export rows.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import fleet, runner, store
from dispatcher.expand import Expansion, Options, expand
from dispatcher.reader import read_manifest
from schemas.capacity import job_queue, model_key, queue_model_key
from schemas.errors import ConfigError, KilnError, ModelError
from schemas.job import REQUEUEABLE, JobSpec, JobStatus, RenderResult
from schemas.manifest import RowFields, describe
from schemas.messages import ModelSheet, model_sheet_key
from schemas.models import REGISTRY, resolve_model, weights_location
from schemas.params import Decoder, RenderParams, format_name
from schemas.renderer import StepCallback
from schemas.settings import COMPILE_MIN_IMAGES, KilnSettings
from schemas.storage import open_storage, scheme
from schemas.tables import Attempt, Batch, BatchJob, Job, Output, Worker

FORGET_AFTER = timedelta(days=1)  # a worker silent this long is no longer listed
RATE_WINDOW = timedelta(minutes=10)  # the recent past whose finished images measure a batch's throughput


Clock = Callable[[], datetime]


@dataclass(frozen=True)
class Request:
    """A manifest and the options that decide how it expands into jobs (render and submit share them)."""

    manifest: Path
    model: str | None = None  # for every row, over the manifest's
    prompt: str | None = None  # a template for every row
    output: str | None = None  # an output key template for every row
    image_format: str | None = None  # png, webp, jpeg (or jpg) for every row
    quality: int | None = None  # webp and jpeg quality for every row
    decoder: Decoder | None = None  # the VAE decoder for every row
    name: str | None = None  # the batch's name [the manifest's file name]
    non_commercial: bool = False
    skip_incomplete: bool = False
    priority: int = 0

    @property
    def batch_name(self) -> str:
        return self.name or self.manifest.stem


def expansion(request: Request, settings: KilnSettings, keep_jobs: bool = True) -> Expansion:
    """Read and validate a manifest and expand it into jobs (only counted unless `keep_jobs`); a ManifestError says
    what to fix. Writes nothing but the cache of files the manifest names by bucket URI."""
    options = Options(batch=request.batch_name, base_dir=request.manifest.resolve().parent, prompt=request.prompt,
                      model=request.model, output=request.output, format=format_name(request.image_format),
                      quality=request.quality, decoder=request.decoder, non_commercial=request.non_commercial,
                      skip_incomplete=request.skip_incomplete, max_jobs=settings.max_jobs,
                      max_rows=settings.max_rows, fetch=_bucket_files(settings))
    return expand(read_manifest(request.manifest, max_bytes=settings.max_manifest_bytes), options, keep_jobs)


def _bucket_files(settings: KilnSettings) -> Callable[[str], Path] | None:
    """How expansion reads a LoRA or reference image named s3://bucket/key: downloaded once per version into the
    cache, with the fleet's bucket credentials; None without a bucket configured."""
    if scheme(settings.storage_url) != "s3":
        return None
    from dispatcher.bucket import Bucket

    bucket = functools.cache(lambda: Bucket.from_settings(settings))
    return lambda uri: bucket().fetch_uri(uri, settings.cache_dir / "bucket-files")


@dataclass(frozen=True)
class Plan:
    """What a manifest would render."""

    jobs: int
    per_model: dict[str, int]  # most jobs first
    skipped_rows: int
    megapixels: float
    examples: list[dict[str, Any]]  # the first three jobs: row id, prompt, output key, seed

    @classmethod
    def of(cls, found: Expansion) -> Plan:
        return cls(found.count, dict(found.per_model.most_common()), found.skipped_rows,
                   round(found.pixels / 1e6, 2),
                   [{"id": j.row_id, "prompt": j.params.prompt, "output": j.output_key, "seed": j.params.seed}
                    for j in found.first])

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def record(request: Request, sessions: sessionmaker[Session], found: Expansion, clock: Clock) -> store.Recorded:
    """Record an expanded manifest as a batch, all or nothing (a rerun with nothing to render adds no batch)."""
    digest = hashlib.sha256(request.manifest.read_bytes()).hexdigest()

    def batch() -> Batch:
        return Batch(id=uuid.uuid4().hex[:12], name=request.batch_name, manifest=str(request.manifest),
                     manifest_sha256=digest, non_commercial=request.non_commercial, created_at=clock(),
                     priority=request.priority, paused=False)

    return store.record_new_batch(sessions, batch, found, clock)


@dataclass(frozen=True)
class Submitted:
    """What `submit` did: the plan, and unless it was a dry run, the batch it recorded."""

    plan: Plan
    recorded: store.Recorded | None  # None: a dry run, nothing written
    references_uploaded: int = 0  # reference images and LoRAs put in the bucket for workers on other PCs

    def as_json(self) -> dict[str, Any]:
        r = self.recorded
        return self.plan.as_json() | ({} if r is None else {
            "references_uploaded": self.references_uploaded, "batch_id": r.batch_id, "queued": r.new + r.requeued,
            "already_done": r.already_done, "in_progress": r.in_progress})


def submit(request: Request, settings: KilnSettings, clock: Clock, dry_run: bool = False) -> Submitted:
    """Validate a manifest and, unless `dry_run`, record it as a batch of queued jobs for the fleet. With S3
    storage, each reference image and LoRA goes to the bucket once, by content, before the batch is recorded (one
    uploaded for a batch that then fails to record is harmless)."""
    found = expansion(request, settings, keep_jobs=not dry_run)
    if dry_run:
        return Submitted(Plan.of(found), None)
    uploaded = _upload_references(found, settings)
    return Submitted(Plan.of(found), record(request, store.open_database(settings.database_url), found, clock),
                     uploaded)


def _upload_references(found: Expansion, settings: KilnSettings) -> int:
    references = {f.sha256: f.path for j in found.jobs for f in (*j.params.reference_files, *j.params.loras)}
    if not references or scheme(settings.storage_url) != "s3":
        return 0
    from dispatcher.bucket import Bucket

    bucket = Bucket.from_settings(settings)
    bucket.check()
    for sha256, path in references.items():
        bucket.put_reference(Path(path), sha256)
    return len(references)


SHEET_URL_SECONDS = 12 * 3600  # a pushed model's signed GETs: a slow PC downloads 35 GB well inside this
SHEET_KEEP_SECONDS = 3600  # a sheet in Redis outlives the dispatcher's renewal (SHEETS_EVERY_SECONDS) many times


def push_model(name: str, folder: Path | None, settings: KilnSettings,
               said: Callable[[str, int, bool], None] = lambda *_: None) -> ModelSheet:
    """Put a registered model's files in the fleet's bucket once, so that workers without them pull them from there
    (checked file by file) instead of each downloading them from the hub; `folder` where they are not in this
    machine's Hugging Face cache. With a fleet configured, its workers are told at once."""
    if name not in REGISTRY or REGISTRY[name].is_tiny:
        raise ModelError(f"kiln models push takes a registered model ({', '.join(n for n in REGISTRY if n != 'tiny')}"
                         "); --from FOLDER names the folder that holds its files")
    spec = REGISTRY[name]
    where = folder.expanduser().resolve() if folder else weights_location(spec, settings.cache_dir)
    if where is None:
        raise ModelError(f"the weights of {name} are not on this machine: `hf download {spec.source}` first, or "
                         "pass --from FOLDER with a diffusers copy of them")
    found = resolve_model(str(where))
    if found.profile != spec.profile:
        raise ModelError(f"{where} holds a {found.profile} model, not {name}")
    if scheme(settings.storage_url) != "s3":
        raise ConfigError("KILN_STORAGE_URL: kiln models push needs the fleet's bucket (s3://bucket/prefix)")
    from dispatcher.bucket import Bucket

    bucket = Bucket.from_settings(settings)
    bucket.check()
    sheet = bucket.push_model(name, where, said)
    if settings.broker_url:
        import redis

        share_models(bucket, redis.Redis.from_url(settings.broker_url,
                                                  socket_timeout=settings.storage_timeout_seconds))
    return sheet


def share_models(bucket: Any, broker: Any) -> int:
    """Hand workers a freshly signed sheet of every model pushed to the bucket, in the broker's Redis (kept
    SHEET_KEEP_SECONDS); how many."""
    sheets = bucket.pushed_models()
    for sheet in sheets:
        broker.set(model_sheet_key(sheet.model), bucket.signed_sheet(sheet, SHEET_URL_SECONDS).model_dump_json(),
                   ex=SHEET_KEEP_SECONDS)
    return len(sheets)


@dataclass(frozen=True)
class Rendered:
    """What rendering a manifest here did."""

    batch_id: str
    jobs: int
    rendered: int
    failed: int  # failed or dead
    retried: int  # attempts that failed and were tried again
    left_queued: int  # its model cannot be loaded here, or the batch was paused
    unserved_models: dict[str, str]  # model -> why this machine cannot render it
    already_done: int
    skipped_rows: int
    counts: dict[str, int]
    wall_seconds: float
    load_seconds: float  # of the wall time, loading models
    seconds_per_image: float | None  # loading left out
    storage: str
    device: str
    failures: list[tuple[str, str | None]] = field(default_factory=list)  # (row id, error) of this run's failures

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "failures"}


class Interrupted(Exception):
    """Rendering here stopped at Ctrl-C or SIGTERM; the job in hand went back to the queue."""

    def __init__(self, batch_id: str, counts: dict[str, int]) -> None:
        super().__init__(f"batch {batch_id} interrupted")
        self.batch_id = batch_id
        self.counts = counts


def render_here(request: Request, settings: KilnSettings, clock: Clock, *,
                on_start: Callable[[int], None] = lambda queued: None, on_step: StepCallback | None = None,
                on_result: Callable[[JobSpec, RenderResult], None] = lambda job, result: None) -> Rendered:
    """Expand, record and render a manifest in this process. Everything that can be known to fail (a bad manifest,
    storage, missing weights, rows too big for this card) fails before anything is written. `on_start` hears how
    many jobs are to render, `on_result` each one done with (not retries). A KeyboardInterrupt puts the job in hand
    back and becomes Interrupted."""
    found = expansion(request, settings)
    if settings.compile == "auto" and len(found.jobs) < COMPILE_MIN_IMAGES:  # the warm-up would not pay
        settings = settings.model_copy(update={"compile": "off"})
    storage = open_storage(settings)  # a folder, or S3 with our own credentials
    storage.check()
    renderer = runner.load_renderer(settings, runner.local_worker_name())
    renderer.prepare(list(found.models.values()))  # missing weights fail before anything is written
    shapes = {(j.params.model, j.params.width, j.params.height, j.params.references) for j in found.jobs}
    unfit = sorted({reason for shape in shapes if (reason := renderer.why_unfit(*shape))})
    if unfit:  # before anything is written: this machine cannot render these rows at all
        raise ModelError("; ".join(unfit) + ". Render them on a fleet worker with a bigger card (`kiln submit`), "
                         "or choose a smaller model or size")
    sessions = store.open_database(settings.database_url)
    recorded = record(request, sessions, found, clock)
    with sessions.begin() as session:
        runner.recover_orphans(session, clock())
    on_start(recorded.new + recorded.requeued + recorded.in_progress)
    failures: list[tuple[str, str | None]] = []

    def recorded_one(job: JobSpec, result: RenderResult, status: JobStatus) -> None:
        if status is not JobStatus.QUEUED:  # done with, one way or the other; not a retry
            on_result(job, result)
        if status in (JobStatus.FAILED, JobStatus.DEAD):
            failures.append((job.row_id, result.error))

    try:
        summary = runner.run_batch(sessions, renderer, recorded.batch_id, clock, runner.embedded_policy(settings),
                                   settings.batch_size, on_step, recorded_one, storage)
    except KeyboardInterrupt:  # the jobs in hand are back in the queue (run_batch)
        with sessions.begin() as session:
            raise Interrupted(recorded.batch_id, store.batch_counts(session, recorded.batch_id)) from None
    with sessions.begin() as session:
        counts = store.batch_counts(session, recorded.batch_id)
        store.finish_batches(session, clock())
    if settings.webhook_url and settings.webhook_secret:  # one round; what does not land goes with the next run
        from dispatcher import webhooks

        webhooks.deliver(sessions, settings.webhook_url, settings.webhook_secret, clock())
    return Rendered(recorded.batch_id, recorded.jobs, summary.rendered, summary.failed, summary.retried,
                    summary.left, summary.unserved, recorded.already_done, found.skipped_rows, counts,
                    round(summary.seconds, 3), round(summary.loading, 3),
                    summary.seconds_per_image and round(summary.seconds_per_image, 3),
                    storage.uri(""), renderer.device_name, failures)


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
    load_seconds: dict[str, float] = field(default_factory=dict)  # each model's last load
    queues: list[str] = field(default_factory=list)
    loaded_model: str | None = None
    plan: str | None = None
    rendering: list[str] = field(default_factory=list)  # the jobs of the render message in hand
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
        unserved=w.unserved or {}, problem=w.problem, model_loads=w.model_loads or {},
        load_seconds=w.load_seconds or {}, queues=w.queues or [],
        loaded_model=w.loaded_model, plan=w.plan, rendering=w.rendering or [], step=w.step,
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
class UnfitGroup:
    """A batch's queued jobs that no live worker can take, for one reason."""

    reason: str
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
    failures: list[FailureGroup] = field(default_factory=list)  # the largest groups first (store.batch_failures)
    unfit: list[UnfitGroup] = field(default_factory=list)  # why no live worker can take them, largest first

    def detail_json(self, progress: BatchProgress) -> dict[str, Any]:
        """One batch in full, with its progress: `kiln status BATCH --json` and the dashboard's API."""
        return self.as_json() | {"progress": progress.as_json(), "failures": [g.as_json() for g in self.failures],
                                 "unfit": [g.as_json() for g in self.unfit]}

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
                       [UnfitGroup(*g) for g in fleet.unfit_jobs(session, found.id, live_since=now - timeout)])


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
        made = RenderParams.of_row(job).model_copy(update=values)
        new_id = made.job_id(job.output_key)
        if new_id == job.id:
            store.requeue(session, job, now)
            requeued += 1
            continue
        twin = session.get(Job, new_id)
        if twin is None:
            queue = job_queue(made.model, resolve_model(made.model).profile, made.width, made.height,
                              references=made.references)
            if queue is None:
                raise ConfigError(f"--set: {made.model} at {made.width}x{made.height} fits no card Kiln knows")
            session.add(Job(id=new_id, queue=queue, min_vram_gb=0, status=JobStatus.QUEUED, attempts=0,
                            created_at=now, updated_at=now, retry_of=job.id, output_key=job.output_key,
                            priority=job.priority, ordinal=job.ordinal,
                            **made.columns()))
            session.flush()
        elif twin.status in REQUEUEABLE:
            store.requeue(session, twin, now)
        session.execute(update(BatchJob).where(BatchJob.batch_id == found.id, BatchJob.job_id == job.id)
                        .values(job_id=new_id))
        replaced += 1
    if replaced:  # the new jobs, or twins asked for by other batches too
        store.reprioritize_batch(session, found.id)
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
    store.reprioritize_batch(session, found.id)
    return BatchChange(found, 0 if paused else store.batch_counts(session, found.id)["cancelled"])


def set_priority(session: Session, batch_id: str, priority: int) -> BatchChange:
    """Set a batch's priority: higher batches are published first."""
    found = find(session, batch_id)
    found.priority = priority
    store.reprioritize_batch(session, found.id)
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
    tallies: dict[str, int]  # how many jobs each filter (SHOWS) shows, on every page
    page: int  # from 1
    pages: int


def gallery(session: Session, status: BatchStatus, show: str = "all", page: int = 1, per_page: int = 48) -> Gallery:
    """The `page`th `per_page` jobs of a batch (its `batch_status`) that `show` (a SHOWS key) picks, in manifest
    order."""
    if show not in SHOWS:
        raise ConfigError(f"show={show}: one of {', '.join(SHOWS)}")
    tallies = {name: sum(n for s, n in status.counts.items() if statuses is None or JobStatus(s) in statuses)
               for name, statuses in SHOWS.items()}
    pages = max(1, -(-tallies[show] // per_page))
    page = min(max(page, 1), pages)
    rows = list(store.export_rows(session, status.batch.id, SHOWS[show], offset=(page - 1) * per_page,
                                  limit=per_page))
    return Gallery(status.batch, show, rows, tallies, page, pages)


def output(session: Session, job_id: str) -> Output | None:
    """The stored image of a succeeded job."""
    return session.scalar(select(Output).where(Output.job_id == job_id))
