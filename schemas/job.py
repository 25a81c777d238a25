"""Jobs: their states and allowed transitions, what a worker is handed, and what it reports back."""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict

from schemas.errors import StaleStateError
from schemas.params import RenderParams


class JobStatus(enum.StrEnum):
    """Where a job stands. Only `TRANSITIONS` may move it, always as a compare-and-set."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"


Q, R, S, F, D, C = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED,
                    JobStatus.DEAD, JobStatus.CANCELLED)
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    Q: frozenset({R, C}),
    # running -> queued: its worker was interrupted or went silent; the attempt is recorded as lost.
    R: frozenset({S, F, D, Q, C}),
    S: frozenset(),  # a good image is never re-rendered or overwritten
    # failed, dead and cancelled jobs go back to the queue when their manifest is submitted again.
    F: frozenset({Q, D}),
    D: frozenset({Q}),
    # cancelled -> running: cancelled while its message was in flight, and its image landed anyway; it is
    # recorded, so that no stored image is without its row.
    C: frozenset({Q, R}),
}
ACTIVE = frozenset({Q, R})
REQUEUEABLE = frozenset(s for s, targets in TRANSITIONS.items() if Q in targets and s is not R)


def check_transition(current: JobStatus, target: JobStatus) -> None:
    """Raise StaleStateError unless the state machine allows moving from `current` to `target`."""
    if target not in TRANSITIONS[current]:
        raise StaleStateError(f"a job cannot go from {current} to {target}")


class JobSpec(BaseModel):
    """Everything a worker needs to render one image, and nothing that opens the database."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    attempt: int
    batch_id: str
    manifest: str
    manifest_row: int
    row_id: str
    output_key: str
    params: RenderParams

    @property
    def shape(self) -> str:
        """Jobs with equal shapes can share one pipeline call."""
        return self.params.shape

    @classmethod
    def of(cls, **fields: Any) -> JobSpec:
        """A spec from flat fields, the render parameters among the job's own (benchmarks and tests build them)."""
        params = {k: fields.pop(k) for k in list(fields) if k in RenderParams.model_fields}
        return cls(**fields, params=RenderParams(**params))


class RenderResult(BaseModel):
    """What a worker reports for one attempt at one job."""

    job_id: str
    attempt: int
    ok: bool
    worker: str
    seconds: float
    uri: str | None = None
    sha256: str | None = None
    md5: str | None = None
    bytes: int | None = None
    error: str | None = None
    error_kind: str | None = None  # "oom", "nan", "bad_input", "withdrawn", "worker", "error" (dispatcher.lifecycle)
    plan: str | None = None  # how the model was loaded for it (schemas.plan.Plan.describe)
