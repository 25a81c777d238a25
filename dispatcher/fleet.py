"""The fleet's bookkeeping in SQL: feeding render queues, recording reports and heartbeats, reaping silent
workers, retrying with backoff, withdrawing messages nobody wants any more. No I/O but through what is passed
in: sessions, the bucket, and callables that publish or mark."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import and_, func, insert, or_, select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import store
from dispatcher.bucket import Bucket, StoredObject
from dispatcher.lifecycle import RetryPolicy
from schemas.capacity import job_queue, model_key, queue_model_key, queue_tier, why_unfit
from schemas.errors import KilnError, StaleStateError, StorageError
from schemas.job import JobStatus, RenderResult, check_transition
from schemas.messages import Heartbeat, RenderMessage, RenderTask, Report, protocol_problem, unwanted_key
from schemas.models import resolve_model
from schemas.params import RenderParams
from schemas.plan import Shape
from schemas.settings import KilnSettings
from schemas.storage import KeyTakenError
from schemas.tables import BatchJob, Job, Worker

Publish = Callable[[str, dict[str, Any]], None]  # (queue, RenderTask payload)
LOST_QUEUE_GRACE = timedelta(seconds=20)
# How long a render queue must stay empty while the database says it holds published jobs before the broker is
# taken to have lost them: a worker that took the last message says so in its started report, which comes a
# moment later (a worker's outbox holds it up to a second; a busy dispatcher has reports queued).
EMPTY_CONFIRM = timedelta(seconds=5)
WAITING_COUNTED = 1000  # a queue's waiting jobs are counted up to this many (waiting): a tick's count is a few
# index entries however many are queued
WARM_LOOKAHEAD = 1000  # jobs next in a queue's line among which a warm shape's go first (_next_jobs)
REPORT_RETRY_SECONDS = 3.0  # a report that cannot be recorded yet is tried again this much later...
REPORT_RETRIES = 1200  # ...for an hour; then it is dropped and the reaper gives the job back


@dataclass(frozen=True)
class Policy:
    """The numbers that govern retries and silence, from the settings."""

    backlog: int  # messages per live consumer of a queue
    message_ttl: timedelta
    worker_timeout: timedelta
    max_attempts: int
    retry_base: timedelta
    time_limit: timedelta = timedelta(minutes=30)  # a worker kills a render running longer
    report_hold: timedelta = timedelta(seconds=REPORT_RETRY_SECONDS * REPORT_RETRIES)  # a report in hand keeps
    # its job from the reaper while it is being retried
    message_jobs: int = 1  # jobs of one shape per render message (KILN_BATCH_SIZE)

    @property
    def retry(self) -> RetryPolicy:
        """The lifecycle's retry policy: max_attempts over at least two workers."""
        return RetryPolicy(self.max_attempts, self.retry_base)

    @classmethod
    def from_settings(cls, s: KilnSettings) -> Policy:
        """Build from KilnSettings."""
        return cls(s.backlog, timedelta(seconds=s.message_ttl_seconds), timedelta(seconds=s.worker_timeout_seconds),
                   s.max_attempts, timedelta(seconds=s.retry_base_seconds),
                   timedelta(seconds=s.job_time_limit_seconds), message_jobs=s.batch_size)


def withdraw(session: Session, mark: Callable[[str], None]) -> int:
    """Tell workers which published render messages are no longer wanted: those of cancelled jobs, and of queued
    jobs whose every batch is paused (published again on resume). A worker checks before rendering and before
    uploading (schemas.messages.unwanted_key)."""
    jobs = session.scalars(select(Job).where(Job.published_at.is_not(None), or_(
        Job.status == JobStatus.CANCELLED, and_(Job.status == JobStatus.QUEUED, Job.priority.is_(None))))).all()
    for job in jobs:
        assert job.published_at is not None
        mark(unwanted_key(job.id, token(job.published_at)))
        job.published_at = None
    return len(jobs)


def token(published_at: datetime) -> str:
    """Which publication of a job a render message is."""
    return published_at.isoformat()


class Outlook(NamedTuple):
    """What feeding reads once a tick and the top-ups between ticks reuse: the render queues with queued jobs,
    the live consumers of each, and the shapes they rendered last (their LoRAs are on: those jobs go first)."""

    queues: list[str]
    consumers: Counter[str]
    warm: dict[str, set[str]]


def look(session: Session, now: datetime, policy: Policy, queues: list[str] | None = None) -> Outlook:
    """The outlook for feeding now: `queues`, else every queue with queued jobs (`queued_queues`), and the workers
    that beat within the worker timeout."""
    live = session.execute(select(Worker.queues, Worker.warm_shape).where(
        Worker.last_seen >= now - policy.worker_timeout)).all()
    warm: dict[str, set[str]] = {}
    for served, shape in live:
        for q in served or []:
            if shape:
                warm.setdefault(q, set()).add(shape)
    return Outlook(queued_queues(session) if queues is None else queues,
                   Counter(q for served, _ in live for q in served or []), warm)


def feed(session: Session, now: datetime, policy: Policy, bucket: Bucket, publish: Publish,
         queue_depth: Callable[[str], int], outlook: Outlook | None = None,
         empty_since: dict[str, datetime] | None = None) -> int:
    """The tick's feed: republish what the broker lost or let expire, then top every queue of the outlook (by
    default, `look` now) up (`top_up`). `empty_since` is the caller's memory across feeds of when each queue was
    first seen empty while holding published jobs (EMPTY_CONFIRM); without it, one look decides. Returns how
    many jobs went out (in fewer messages when they carry several jobs of one shape)."""
    if outlook is None:
        outlook = look(session, now, policy)
    if empty_since is not None:
        for gone in set(empty_since) - set(outlook.queues):  # no queued jobs now: what was seen of it is over
            del empty_since[gone]
    seen = empty_since if empty_since is not None else {}
    waiting: dict[str, int] = {}
    for queue in sorted(q for q in outlook.queues if q):
        waiting[queue] = _waiting(session, queue)
        empty = queue_depth(queue) == 0 and waiting[queue] > 0
        if empty:
            seen.setdefault(queue, now)
        else:
            seen.pop(queue, None)
        lost = empty and (empty_since is None or now - seen[queue] >= EMPTY_CONFIRM)
        # A message not taken within its TTL has expired on the broker; an empty queue that should hold
        # messages means the broker lost them (a Redis restart without AOF). Either way: publish again.
        again = session.execute(update(Job).where(
            Job.status == JobStatus.QUEUED, Job.queue == queue, Job.published_at.is_not(None),
            Job.published_at < (now - LOST_QUEUE_GRACE if lost else now - policy.message_ttl))
            .values(published_at=None).execution_options(synchronize_session=False))
        waiting[queue] -= again.rowcount  # type: ignore[attr-defined]
    return top_up(session, now, policy, bucket, publish, outlook, waiting)


def top_up(session: Session, now: datetime, policy: Policy, bucket: Bucket, publish: Publish, outlook: Outlook,
           waiting: dict[str, int] | None = None) -> int:
    """Top every queue of the outlook up to the backlog for each live worker consuming it (at least one backlog),
    from the database, given how many published jobs each holds (`waiting`; counted here when not given): what
    the dispatcher does between ticks, whenever a worker took a message. Returns how many jobs went out."""
    published = 0
    for queue in sorted(q for q in outlook.queues if q):
        consumers = max(1, outlook.consumers[queue])
        # One backlog per consumer: fifty workers on one queue drain a fixed few messages faster than reports
        # arrive to top it up. Bounded all the same: Redis holds a few messages per worker, not the batch.
        size = _message_size(session, queue, now, policy.message_jobs, consumers)
        free = policy.backlog * size * consumers - (
            waiting[queue] if waiting is not None else _waiting(session, queue))
        chosen = _next_jobs(session, queue, now, free, outlook.warm.get(queue, set())) if free > 0 else []
        rows = store.batch_rows(session, [job.id for job in chosen]) if chosen else {}
        for group in _messages([job for job in chosen if job.id in rows], size):  # not paused since it was chosen
            tasks = []
            for job in group:
                spec = store.job_spec(job, *rows[job.id], job.attempts + 1)
                tasks.append(RenderTask(job=spec, upload=bucket.upload_for(job.id, job.output_key),
                                        reference_urls=bucket.reference_urls(spec), lora_urls=bucket.lora_urls(spec),
                                        token=token(now)))
            publish(queue, RenderMessage(tasks=tasks).model_dump(mode="json"))
            for job in group:
                job.published_at = now
            published += len(group)
    return published


def queued_queues(session: Session) -> list[str]:
    """The render queues that have queued jobs. A skip scan of ix_jobs_ready: the next queue name after the last,
    then whether it has a queued job, each an index lookup, so it costs the same with ten jobs queued or a
    million (a DISTINCT read every queued job: 39 ms at 100,000 on PostgreSQL, once a tick)."""
    jobs = store.JOBS.c
    names = select(func.min(jobs.queue).label("queue")).cte("names", recursive=True)
    names = names.union_all(select(select(func.min(jobs.queue)).where(jobs.queue > names.c.queue).scalar_subquery())
                            .where(names.c.queue.is_not(None)))
    # a correlated LIMIT 1, not EXISTS: PostgreSQL makes an EXISTS a hash of every queued job when the table is
    # not analyzed yet (a batch just recorded)
    queued = (select(jobs.id).where(jobs.queue == names.c.queue, jobs.status == JobStatus.QUEUED).limit(1)
              .scalar_subquery().is_not(None))
    return sorted(q for q in session.scalars(select(names.c.queue).where(names.c.queue.is_not(None), queued)) if q)


def _message_size(session: Session, queue: str, now: datetime, most: int, consumers: int) -> int:
    """Jobs per render message on a queue: up to `most` (KILN_BATCH_SIZE), fewer when the queue's work would not
    keep every consumer busy otherwise (ten jobs and three workers: messages of four, not one of eight)."""
    if most == 1:
        return 1
    # Counted up to what fills every consumer's message: a 100,000-job queue is not counted on every top-up.
    due = session.scalar(select(func.count()).select_from(select(Job.id).where(
        Job.status == JobStatus.QUEUED, Job.queue == queue, store.due(now)).limit(most * consumers).subquery())) or 0
    return max(1, min(most, -(-due // consumers)))


def _messages(chosen: list[Job], size: int) -> list[list[Job]]:
    """The chosen jobs as render messages of one shape and at most `size` jobs, in the order they were chosen
    (a message goes out where its first job stood). A job tried before goes alone: if it kills its worker's
    process every time, it costs no other job an attempt more than once."""
    groups: dict[str, list[list[Job]]] = {}
    out: list[list[Job]] = []
    for job in chosen:
        if job.attempts:
            out.append([job])
            continue
        open_ = groups.setdefault(job.shape, [])
        if not open_ or len(open_[-1]) >= size:
            open_.append([])
            out.append(open_[-1])
        open_[-1].append(job)
    return out


def waiting(session: Session, now: datetime) -> dict[str, int]:
    """How many jobs each render queue has that a worker could take now (published or not; not paused, not
    waiting out a backoff), counted up to WAITING_COUNTED: what a worker reads to decide whether to stay on its
    loaded model (it asks only whether work waits). Every queue a registered worker consumes is listed, zeros
    included."""
    counts = {q: 0 for served in session.scalars(select(Worker.queues)) for q in served or []}
    for queue in queued_queues(session):
        counts[queue] = session.scalar(select(func.count()).select_from(select(Job.id).where(
            Job.queue == queue, Job.status == JobStatus.QUEUED, Job.priority.is_not(None), store.due(now))
            .limit(WAITING_COUNTED).subquery())) or 0
    return counts


def _waiting(session: Session, queue: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.status == JobStatus.QUEUED, Job.queue == queue, Job.published_at.is_not(None))) or 0


def _next_jobs(session: Session, queue: str, now: datetime, limit: int, warm: Collection[str] = ()) -> list[Job]:
    """The next publishable jobs of a queue: highest batch priority, then oldest batch, then manifest order; and of
    the next WARM_LOOKAHEAD in that line, those of a shape a consumer rendered last go first (its LoRAs stay
    applied: no unload and load between jobs). A query reads the first entries of an index in that order
    (ix_jobs_ready), so choosing costs the same with ten jobs queued or a million."""
    ready = (Job.queue == queue, Job.status == JobStatus.QUEUED, Job.published_at.is_(None), Job.priority.is_not(None),
             store.due(now))
    line = (Job.priority.desc(), Job.ordinal)
    if not warm:
        return list(session.scalars(select(Job).where(*ready).order_by(*line).limit(limit)))
    ahead = session.execute(select(Job.id, Job.shape, Job.priority).where(*ready).order_by(*line)
                            .limit(max(limit, WARM_LOOKAHEAD))).all()
    ids = [row.id for row in sorted(ahead, key=lambda row: (-row.priority, row.shape not in warm))[:limit]]  # stable
    jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}
    return [jobs[job_id] for job_id in ids if job_id in jobs]


Checked = dict[tuple[str, int], StoredObject | None]  # what the bucket holds for each (job id, attempt)
Uploads = dict[tuple[str, int], StoredObject | None | StorageError]  # the same, or why storage could not say


def check_uploads(sessions: sessionmaker[Session], reports: list[Report], now: datetime, bucket: Bucket,
                  each: Callable[..., Iterable[Any]] = map) -> Uploads:
    """What the bucket holds at the output key of each finished report's job, by (job id, attempt): the jobs are
    touched first (one transaction), and their uploads checked outside any transaction, so a slow storage answer
    holds no row lock and the reaper leaves the jobs be meanwhile. `each` maps the checks (a thread pool's `map`
    runs them at once); one that storage could not answer is its StorageError. Raises the database's error."""
    finished = [r for r in reports if r.kind == "finished" and r.result and r.result.ok]
    if not finished:
        return {}
    with sessions.begin() as session:
        keys = touch(session, finished, now)

    def stat(key: str | None) -> StoredObject | None | StorageError:
        try:
            return bucket.stat(key) if key else None
        except StorageError as exc:
            return exc

    return dict(zip(keys, each(stat, keys.values()), strict=True))


def receive_reports(sessions: sessionmaker[Session], reports: list[Report], clock: Callable[[], datetime],
                    policy: Policy, bucket: Bucket,
                    submit: Callable[[Report, StoredObject | None], Future[str]] | None = None) -> list[Future[str]]:
    """Record reports in full: their uploads checked (`check_uploads`), then each recorded, by `submit(report,
    stored)` when given (the dispatcher's group commit, dispatcher.recorder), else in a transaction of its own.
    Returns each report's outcome (or what recording it raised) as a future; raises StorageError, or the
    database's error, when the uploads cannot be checked."""
    stored = check_uploads(sessions, reports, clock(), bucket)
    for found in stored.values():
        if isinstance(found, StorageError):
            raise found
    checked = cast(Checked, stored)
    if submit is not None:
        return [submit(r, checked.get((r.job_id, r.attempt))) for r in reports]
    answers = []
    for r in reports:
        answer: Future[str] = Future()
        try:
            with sessions.begin() as session:
                answer.set_result(record_report(session, r, clock(), policy, bucket,
                                                checked.get((r.job_id, r.attempt))))
        except Exception as exc:
            answer.set_exception(exc)
        answers.append(answer)
    return answers


def receive_report(sessions: sessionmaker[Session], report: Report, clock: Callable[[], datetime], policy: Policy,
                   bucket: Bucket) -> str:
    """Record one report in full (`receive_reports`, in a transaction of its own); returns what happened."""
    return receive_reports(sessions, [report], clock, policy, bucket)[0].result()


class Held(NamedTuple):
    """What recording a report reads of its job, from the row locked for the report's transaction."""

    id: str
    status: JobStatus
    attempts: int
    worker: str | None
    output_key: str


def record_report(session: Session, report: Report, now: datetime, policy: Policy, bucket: Bucket,
                  stored: StoredObject | None = None) -> str:
    """Record a worker's report; returns what happened, for the log. Late and duplicate reports change nothing.
    `stored` is what the bucket holds at the job's output key, looked up before this transaction
    (`receive_reports`)."""
    return record_reports(session, [(report, stored)], now, policy, bucket)[0]


def record_reports(session: Session, items: list[tuple[Report, StoredObject | None]], now: datetime, policy: Policy,
                   bucket: Bucket) -> list[str]:
    """Record reports (each with what the bucket holds at its job's output key) in this transaction, in a few
    statements for all of them: their jobs' rows read and locked in one (in id order, as `reap` locks them), and
    their writes held back and made one statement per kind (`_Writes`). Returns what happened to each. Raises
    StaleStateError if a job moved under a write; recorded one at a time, each then says for itself."""
    held: dict[str, Held | None] = dict(_lock(session, sorted({report.job_id for report, _ in items})))
    writes = _Writes()
    outcomes = []
    for report, stored in items:
        if report.job_id in writes.jobs:  # a second report on one job waits for the first one's writes
            writes.flush(session)
        job = held.get(report.job_id) or _lock(session, [report.job_id]).get(report.job_id)
        if job is None:
            outcomes.append("unknown job")
            continue
        outcome, held[job.id] = _record(session, job, report, now, policy, bucket, stored, writes)
        outcomes.append(outcome)
    writes.flush(session)
    return outcomes


def _lock(session: Session, job_ids: list[str]) -> dict[str, Held]:
    jobs = store.JOBS.c
    rows = session.execute(select(jobs.id, jobs.status, jobs.attempts, jobs.worker, jobs.output_key)
                           .where(jobs.id.in_(job_ids)).order_by(jobs.id).with_for_update())
    return {row[0]: Held(*row) for row in rows}


def _record(session: Session, job: Held, report: Report, now: datetime, policy: Policy, bucket: Bucket,
            stored: StoredObject | None, writes: _Writes) -> tuple[str, Held | None]:
    """One report's outcome and its job as it is after it (None: read it again), its writes added to `writes`."""
    started = False
    if job.status is JobStatus.QUEUED and job.attempts == report.attempt - 1:
        job, started = _start(job, report, now, writes), True  # a started report may arrive late, or not at all
    elif (job.status is JobStatus.CANCELLED and job.attempts == report.attempt - 1 and report.result is not None
          and report.result.ok and stored is not None and stored.job_id == job.id):
        # Cancelled while its message was in flight, and its image landed before the worker could hear: the image
        # is kept and recorded, so that no stored image is without its row.
        job, started = _start(job, report, now, writes), True
    elif report.kind == "started":
        return f"stale start (job is {job.status.value}, attempt {job.attempts})", job
    if report.kind == "started":
        return "started", job
    if started:  # a finished report on a job it started just now: the start's writes first
        writes.flush(session)
    if job.attempts == report.attempt and job.worker == report.worker and job.status is not JobStatus.RUNNING:
        return f"already recorded (job is {job.status.value})", job  # delivered again after a commit we never heard of
    if job.status is not JobStatus.RUNNING or job.attempts != report.attempt or job.worker != report.worker:
        return f"stale result (job is {job.status.value}, attempt {job.attempts}, worker {job.worker})", job
    assert report.result is not None, "a finished report carries its result"
    result = report.result
    if result.ok and stored is not None and stored.job_id == job.id:
        own = result.md5 == stored.md5  # False: an earlier attempt's upload of this same job stood
        writes.move(job, JobStatus.SUCCEEDED, now, error=None)
        writes.finish_attempt(job, "succeeded", now, seconds=result.seconds, plan=result.plan)
        writes.add_output(job.id, dict(key=job.output_key, uri=bucket.uri(job.output_key),
                                       sha256=result.sha256 if own else None, md5=stored.md5, bytes=stored.size,
                                       worker=result.worker, seconds=result.seconds, plan=result.plan,
                                       created_at=now))
        return ("succeeded" if own else "succeeded (an earlier attempt's upload stood)"), \
            job._replace(status=JobStatus.SUCCEEDED)
    if result.ok:
        result = result.model_copy(update={"ok": False, "error_kind": "error", "error": (
            "the worker reported an upload that is not in the bucket")} if stored is None else {
            "ok": False, "error_kind": "bad_input", "error": str(KeyTakenError(bucket.uri(job.output_key),
                                                                             stored.job_id))})
    writes.flush(session)  # failing reads the job's attempts (the lifecycle's charge): what is held back, first
    return _fail(session, job, result, now, policy), None


def touch(session: Session, reports: list[Report], now: datetime) -> dict[tuple[str, int], str | None]:
    """Note that running jobs' reports are in hand but not yet recorded, so the reaper leaves the jobs be while
    their uploads are checked (one statement for all of them); returns each report's (job id, attempt) with its
    job's output key (None for a job this database does not know)."""
    jobs = store.JOBS.c
    keys: dict[str, str | None] = {job_id: key for job_id, key in session.execute(
        update(store.JOBS).where(tuple_(jobs.id, jobs.attempts).in_([(r.job_id, r.attempt) for r in reports]),
                                 jobs.status == JobStatus.RUNNING)
        .values(updated_at=now, reported_at=now).returning(jobs.id, jobs.output_key))}
    others = {r.job_id for r in reports} - set(keys)  # not running at that attempt: recording says what it is
    if others:
        keys.update((job_id, key) for job_id, key in session.execute(
            select(jobs.id, jobs.output_key).where(jobs.id.in_(others))))
    return {(r.job_id, r.attempt): keys.get(r.job_id) for r in reports}


def _start(job: Held, report: Report, now: datetime, writes: _Writes) -> Held:
    writes.move(job, JobStatus.RUNNING, now, attempts=report.attempt, worker=report.worker, reported_at=None)
    writes.start_attempt(job.id, report.attempt, report.worker, now - timedelta(seconds=report.held))
    return job._replace(status=JobStatus.RUNNING, attempts=report.attempt, worker=report.worker)


class _Writes:
    """What recording a group of reports writes, held back and then made one statement per kind and shape
    (executemany): the jobs' compare-and-set moves, new attempts, finished attempts, outputs. A job appears at most
    once between two flushes (`record_reports` flushes before a second report on it), so the order of the kinds
    within a flush does not matter."""

    def __init__(self) -> None:
        self.jobs: set[str] = set()
        self.moves: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        self.started: list[dict[str, Any]] = []
        self.finished: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        self.outputs: dict[str, dict[str, Any]] = {}

    def move(self, job: Held, target: JobStatus, now: datetime, **values: Any) -> None:
        """`store.move`, held back."""
        check_transition(job.status, target)
        self.jobs.add(job.id)
        values = {"status": target, "updated_at": now, **values}
        self.moves.setdefault(tuple(values), []).append(
            {"_id": job.id, "_status": job.status, "_attempts": job.attempts, **values})

    def start_attempt(self, job_id: str, number: int, worker: str, now: datetime) -> None:
        """`store.start_attempt`, held back."""
        self.started.append(dict(job_id=job_id, number=number, worker=worker, status="running", started_at=now))

    def finish_attempt(self, job: Held, status: str, now: datetime, **values: Any) -> None:
        """`store.finish_attempt`, held back."""
        values = {"status": status, "finished_at": now, **values}
        self.finished.setdefault(tuple(values), []).append({"_id": job.id, "_number": job.attempts, **values})

    def add_output(self, job_id: str, values: dict[str, Any]) -> None:
        """`store.add_output`, held back."""
        self.outputs[job_id] = values

    def flush(self, session: Session) -> None:
        """Make the writes held back; raises StaleStateError if a job was not where it was read."""
        for rows in self.moves.values():
            store.move_all(session, rows)
        if self.started:
            session.execute(insert(store.ATTEMPTS), self.started)
        for rows in self.finished.values():
            store.finish_attempts(session, rows)
        if self.outputs:
            session.execute(insert(store.OUTPUTS), [
                {"job_id": job_id, **first, **values}
                for job_id, first in store.first_batches(session, list(self.outputs)).items()
                for values in [self.outputs[job_id]]])
        self.__init__()  # type: ignore[misc]


def _fail(session: Session, held: Held, result: RenderResult, now: datetime, policy: Policy) -> str:
    def bigger_card() -> str | None:
        # Never the same shape on the same class of card again: the job needs a bigger class than the biggest
        # this worker serves for its model.
        job = session.get_one(Job, held.id)
        served = session.scalar(select(Worker.queues).where(Worker.name == result.worker)) or []
        mine = [queue_tier(q) for q in served if queue_model_key(q) == model_key(job.model)]
        above = max(mine, default=queue_tier(job.queue) if job.queue else 0)
        return job_queue(job.model, resolve_model(job.model).profile, job.width, job.height,
                         references=RenderParams.of_row(job).references, above=above)

    return store.record_failure(session, held.id, held.attempts, result, now, policy.retry, bigger_card)[1]


def record_heartbeats(session: Session, beats: list[tuple[Heartbeat, datetime]]) -> None:
    """Register workers or refresh what they are doing, each heartbeat with when it came (dispatcher.heartbeats):
    one UPDATE for all of them (executemany), after registering those never seen."""
    if not beats:
        return
    known = set(session.scalars(select(Worker.name).where(Worker.name.in_([beat.worker for beat, _ in beats]))))
    for beat, seen in beats:
        if beat.worker not in known:  # its first heartbeat
            session.add(Worker(name=beat.worker, device=beat.device, first_seen=seen, last_seen=seen))
            known.add(beat.worker)
    session.flush()
    session.execute(update(Worker), [dict(
        name=beat.worker, device=beat.device, vram_mb=int(beat.vram_gb * 1024), last_seen=seen, queues=beat.queues,
        models=beat.models, unserved=beat.unserved,
        problem=protocol_problem(beat.protocol, "this worker") or beat.problem,
        model_loads=beat.model_loads, load_seconds=beat.load_seconds, loaded_model=beat.loaded_model, plan=beat.plan,
        warm_shape=beat.warm_shape, rendering=beat.rendering, storing=beat.storing,
        step=f"{beat.step}/{beat.steps}" if beat.step is not None else None,
        seconds_per_image=beat.seconds_per_image) for beat, seen in beats])


def record_heartbeat(session: Session, beat: Heartbeat, now: datetime) -> None:
    """Register a worker or refresh what it is doing (`record_heartbeats`, for one)."""
    record_heartbeats(session, [(beat, now)])


def reap(session: Session, now: datetime, policy: Policy, heard_since: datetime | None = None) -> int:
    """Give back the running jobs of workers that went silent, or that live but say they are not on the job
    (its GPU process died and Celery gave up on the message), and every job running past its time limit plus the
    worker timeout, whatever its worker's heartbeats say (a render hung where the worker cannot kill it). A job
    whose workers keep vanishing goes dead. `heard_since`: since when the caller has heard heartbeats without a
    break (None: always); until that is a worker timeout ago, nobody is judged by their heartbeats (a dispatcher
    just started, or a broker just back, has not yet heard workers that beat all along), only by the time limit."""
    cutoff = now - policy.worker_timeout
    silent = or_(Worker.last_seen.is_(None), Worker.last_seen < cutoff)
    overdue = Job.updated_at < cutoff - policy.time_limit
    # A report in hand means the worker is done with the job; while it waits to be recorded (storage slow to
    # confirm the upload), giving the job back would only render it again.
    unreported = or_(Job.reported_at.is_(None), Job.reported_at < now - policy.report_hold)
    rows = session.execute(select(Job.id, Job.attempts, Job.worker, silent, overdue, Worker.rendering, Worker.storing)
                           .outerjoin(Worker, Worker.name == Job.worker)
                           .where(Job.status == JobStatus.RUNNING, Job.updated_at < cutoff, unreported)
                           .order_by(Job.id)).all()  # each locked below in id order, as the recorder's groups are
    # Whether the worker's heartbeats still name the job (the lists are JSON: compared here, not in SQL). Only jobs
    # running longer than the worker timeout are read: a few per worker.
    hearing = heard_since is None or heard_since <= cutoff
    lost = [(job_id, attempt, worker, hearing and was_silent, was_overdue)
            for job_id, attempt, worker, was_silent, was_overdue, rendering, storing in rows
            if was_overdue or hearing and (was_silent or job_id not in (rendering or []) + (storing or []))]
    reaped = 0
    for job_id, attempt, worker, was_silent, was_overdue in lost:
        reason = f"worker {worker} " + (
            "went silent" if was_silent else
            f"ran past the {policy.time_limit.total_seconds():.0f} s time limit" if was_overdue else
            "stopped working on it (its process died)")
        try:
            with session.begin_nested():  # all of it, or none if the job moved meanwhile
                # the job's row first, as recording a report locks it (then its attempt's): never the other way
                session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
                store.finish_attempt(session, job_id, attempt, "lost", now, error=reason)
                charged, workers = store.charged_attempts(session, job_id)
                if policy.retry.exhausted(charged, workers):
                    store.move(session, job_id, JobStatus.RUNNING, JobStatus.DEAD, attempt, now, lease_until=None,
                               error=f"lost {charged} times: {reason}")
                    store.job_dead(session, job_id, now)
                else:
                    store.move(session, job_id, JobStatus.RUNNING, JobStatus.QUEUED, attempt, now,
                               lease_until=None, worker=None, published_at=None)
            reaped += 1
        except StaleStateError:
            pass
    return reaped


def unfit_jobs(session: Session, batch_id: str, live_since: datetime | None = None) -> list[tuple[str, int, str]]:
    """A batch's queued jobs that no worker (heard from since `live_since`, when given) can take, grouped by why:
    (reason, how many, the first such row id), the largest groups first. Why: no worker has the model's weights,
    or none of those that have them has a card big enough. Jobs are grouped in SQL by what decides the answer
    (model, queue, size, whether they have reference images) and each group is explained by its first job, so
    a 100,000-job batch costs one grouped scan, not 100,000 rows in Python."""
    served: dict[str, list[int]] = {}
    live = [] if live_since is None else [Worker.last_seen >= live_since]
    for queues in session.scalars(select(Worker.queues).where(*live)):
        for q in queues or []:
            served.setdefault(queue_model_key(q), []).append(queue_tier(q))
    largest = max((t for tiers in served.values() for t in tiers), default=None)
    first = func.min(BatchJob.position)
    groups = session.execute(
        select(Job.model, Job.queue, func.count(), first).join(Job, BatchJob.job_id == Job.id)
        .where(BatchJob.batch_id == batch_id, Job.status == JobStatus.QUEUED)
        .group_by(Job.model, Job.queue, Job.width, Job.height, Job.reference.is_(None))).all()
    unfit = [(n, position) for model, queue, n, position in groups
             if not (served.get(model_key(model)) and queue and max(served[model_key(model)]) >= queue_tier(queue))]
    if not unfit:
        return []
    unserved = _unserved_reasons(session, live)
    firsts = {position: (row_id, job) for position, row_id, job in session.execute(
        select(BatchJob.position, BatchJob.row_id, Job).join(Job, BatchJob.job_id == Job.id)
        .where(BatchJob.batch_id == batch_id, BatchJob.position.in_([position for _, position in unfit])))}
    found: dict[str, tuple[int, int, str]] = {}  # reason -> (how many, first position, its row id)
    for n, position in unfit:
        row_id, job = firsts[position]
        why = _why_unfit(job, served, largest, unserved)
        count, at, first_row = found.get(why, (0, position, row_id))
        found[why] = (count + n, *min((at, first_row), (position, row_id)))
    return [(why, n, row_id) for why, (n, _, row_id) in sorted(found.items(), key=lambda i: (-i[1][0], i[1][1]))]


def _why_unfit(job: Job, served: dict[str, list[int]], largest: int | None,
               unserved: dict[str, list[tuple[str, str]]]) -> str:
    """Why no live worker takes `job`: those serving its model (by model key: `served`, their tiers) or all of
    them (`largest`) and what workers said of models they do not serve (`unserved`)."""
    tiers = served.get(model_key(job.model))
    tier = queue_tier(job.queue) if job.queue else None
    try:
        profile = resolve_model(job.model).profile
    except KilnError:
        return f"{job.model} is not a model this dispatcher knows"
    if not tiers and largest is not None and tier is not None and largest >= tier:
        why = "; ".join(f"{w}: {reason}" for w, reason in unserved.get(job.model, []))
        return f"no worker has {job.model}: start one with `kiln worker --models {job.model}`" + (
            f" ({why})" if why else "")
    shape = Shape.of(job.width, job.height, 1, RenderParams.of_row(job).references)
    return why_unfit(profile, shape, max(tiers) if tiers else largest)


def _unserved_reasons(session: Session, live: list[Any]) -> dict[str, list[tuple[str, str]]]:
    """model -> (worker, why it does not serve that model), from the workers' heartbeats."""
    found: dict[str, list[tuple[str, str]]] = {}
    for name, unserved in session.execute(select(Worker.name, Worker.unserved).where(*live)):
        for model, why in (unserved or {}).items():
            found.setdefault(model, []).append((name, why))
    return found
