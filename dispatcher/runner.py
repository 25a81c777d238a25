"""The embedded default: claim, render and record in this one process, on SQLite and a local folder."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib.metadata import entry_points

from sqlalchemy.orm import Session, sessionmaker

from dispatcher import lifecycle, store
from dispatcher.interrupts import transaction
from dispatcher.lifecycle import Fault, RetryPolicy
from schemas.errors import ConfigError, StaleStateError
from schemas.job import JobSpec, JobStatus, RenderResult
from schemas.renderer import Renderer, StepCallback, Storage
from schemas.settings import KilnSettings

Clock = Callable[[], datetime]
# An embedded job holds its lease while it renders; a process that dies is noticed sooner by its pid (below).
LEASE = timedelta(hours=1)


def local_worker_name() -> str:
    """This process as a worker: host and pid, so a later run on this host can tell whether it still lives."""
    return f"{socket.gethostname()}:{os.getpid()}"


def load_renderer(settings: KilnSettings, worker: str) -> Renderer:
    """The renderer registered under the `kiln.renderers` entry point; the dispatcher never imports it."""
    found = entry_points(group="kiln.renderers", name="local")
    if not found:
        raise ConfigError("no renderer is installed: rendering needs Kiln's worker package and torch "
                          "(pip install -e . in a Kiln checkout)")
    factory = next(iter(found)).load()
    renderer: Renderer = factory(settings, worker)
    return renderer


def recover_orphans(session: Session, now: datetime, host: str = socket.gethostname()) -> int:
    """Requeue running jobs whose worker is gone: a dead process on this host, or an expired lease."""
    recovered = 0
    for job_id, attempt, worker, lease_until in store.running_jobs(session):
        dead_here = worker is not None and worker.rpartition(":")[0] == host and not _alive(worker)
        if dead_here or (lease_until is not None and lease_until < now):
            try:
                store.release(session, job_id, attempt, now, f"worker {worker} stopped before finishing")
                recovered += 1
            except StaleStateError:
                pass  # it finished meanwhile
    return recovered


def _alive(worker: str) -> bool:
    pid = worker.rpartition(":")[2]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunSummary:
    """What one embedded run did."""

    rendered: int = 0
    failed: int = 0  # failed (bad input, out of memory here) or dead (its retries spent)
    retried: int = 0  # attempts that failed and were tried again
    seconds: float = 0.0
    loading: float = 0.0  # of those seconds, loading models
    unserved: dict[str, str] = field(default_factory=dict)  # model -> why this machine cannot render it
    left: int = 0  # jobs left queued: this machine cannot render their model, or the batch was paused

    @property
    def seconds_per_image(self) -> float | None:
        """Wall seconds per attempted image, loading left out, or None when nothing ran."""
        done = self.rendered + self.failed
        return (self.seconds - self.loading) / done if done else None


def embedded_policy(settings: KilnSettings) -> RetryPolicy:
    """The retry policy of a run on one machine: the fleet's attempts and backoff, on the one worker there is."""
    return RetryPolicy(settings.max_attempts, timedelta(seconds=settings.retry_base_seconds), spread=1)


def run_batch(sessions: sessionmaker[Session], renderer: Renderer, batch_id: str, clock: Clock, policy: RetryPolicy,
              batch_size: int = 1, on_step: StepCallback | None = None,
              on_result: Callable[[JobSpec, RenderResult, JobStatus], None] | None = None,
              storage: Storage | None = None, sleep: Callable[[float], None] = time.sleep) -> RunSummary:
    """Render every queued job of a batch here, recording each result as it comes, with the fleet's lifecycle
    (dispatcher.lifecycle): a transient failure is retried after its backoff, bad input fails at once, and a model
    this machine cannot load is left queued for another run or a fleet. The jobs in hand are stored while the next
    ones render, and recorded once stored. On Ctrl-C the jobs in hand go back to the queue, so the next run picks
    them up. `on_result` hears each attempt with the job's new status."""
    summary = RunSummary()
    started, loading = time.perf_counter(), renderer.loading_seconds
    with transaction(sessions) as session:
        store.see_worker(session, renderer.worker, renderer.device_name, renderer.vram_mb, clock())
    storing: tuple[list[JobSpec], Future[list[RenderResult]]] | None = None  # rendered, being stored
    jobs: list[JobSpec] = []

    def record(jobs: list[JobSpec], results: list[RenderResult]) -> None:
        with transaction(sessions) as session:
            outcomes = [store.record_result(session, job, result, clock(), policy)[0]
                        for job, result in zip(jobs, results, strict=True)]
            store.see_worker(session, renderer.worker, renderer.device_name, renderer.vram_mb, clock())
        for job, result, status in zip(jobs, results, outcomes, strict=True):
            summary.rendered += status is JobStatus.SUCCEEDED
            summary.failed += status in (JobStatus.FAILED, JobStatus.DEAD)
            if lifecycle.fault_of(result.error_kind) is Fault.WORKER:
                summary.unserved.setdefault(job.params.model, result.error or "cannot load it")
            elif status is JobStatus.QUEUED:
                summary.retried += 1
            if on_result:
                on_result(job, result, status)

    try:
        while True:
            with transaction(sessions) as session:
                jobs = store.claim(session, renderer.worker, clock(), LEASE, batch_id=batch_id, limit=batch_size,
                                   prefer_model=renderer.loaded_model, prefer_shape=renderer.warm_shape,
                                   skip_models=summary.unserved)
                retry_at = None if jobs else store.next_retry(session, batch_id, summary.unserved)
            rendering = renderer.start(jobs, on_step, storage) if jobs else None
            recorded = storing is not None
            if storing is not None:  # the previous jobs, stored meanwhile
                record(storing[0], storing[1].result())
                storing = None
            if rendering is not None:
                if rendering.done():  # settled already (a model it cannot load, say): recorded before claiming
                    record(jobs, rendering.result())  # more of the same
                else:
                    storing = (jobs, rendering)
                jobs = []
            elif recorded:
                continue  # what was just recorded may have queued a retry: look again
            elif retry_at is None:
                break
            else:
                sleep(max((retry_at - clock()).total_seconds(), 0.0) + 0.01)  # a retry's backoff
    except BaseException:  # Ctrl-C or SIGTERM anywhere from the claim on: the jobs in hand go back
        _release(sessions, jobs + (storing[0] if storing else []), clock)
        raise
    with transaction(sessions) as session:  # what is left: a model this machine cannot load, or the batch was paused
        summary.left = store.batch_counts(session, batch_id)["queued"]
    summary.seconds = time.perf_counter() - started
    summary.loading = renderer.loading_seconds - loading
    return summary


def _release(sessions: sessionmaker[Session], jobs: list[JobSpec], clock: Clock) -> None:
    with transaction(sessions) as session:
        for job in jobs:
            try:
                with session.begin_nested():
                    store.release(session, job.job_id, job.attempt, clock(), "interrupted")
            except StaleStateError:
                pass  # its result was recorded just before the interrupt
