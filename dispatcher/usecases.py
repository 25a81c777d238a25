"""What a person asks of Kiln, as functions that return typed results: the CLI (and a dashboard) only present them.

Sessions come in; nothing here prints. So far: the fleet's workers, and a batch's status.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from dispatcher import fleet, store
from schemas.errors import KilnError
from schemas.tables import Attempt, Batch, Worker

FORGET_AFTER = timedelta(days=1)  # a worker silent this long is no longer listed


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
    """Every worker heard from in the last day, online ones first; older ones are forgotten (deleted)."""
    session.execute(delete(Worker).where(Worker.last_seen < now - FORGET_AFTER))
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
        for w in session.scalars(select(Worker).order_by(Worker.name))]
    return sorted(views, key=lambda v: not v.online)


@dataclass(frozen=True)
class BatchStatus:
    """Where one batch stands."""

    batch: Batch
    counts: dict[str, int]
    failures: list[tuple[str, str, str | None]] = field(default_factory=list)  # (row id, status, error)
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
    found = store.find_batch(session, batch_id)
    if found is None:
        raise KilnError(f"no batch {batch_id!r}: `kiln status` lists the recent ones")
    return BatchStatus(found, store.batch_counts(session, found.id), store.batch_failures(session, found.id),
                       fleet.unfit_jobs(session, found.id, live_since=now - timeout))
