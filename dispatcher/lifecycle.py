"""One job lifecycle for the embedded run and the fleet: whose fault a failed attempt was, and what happens next.

Pure: no SQL, no clock. `store.record_failure` applies a decision with compare-and-set moves.

    job fault        bad input: not retried; the job fails with its reason until it is submitted again
    worker fault     this worker cannot render it (its configuration, missing weights, a load failure, a lost
                     device): the job goes back at once, nothing charged, and the worker stops taking that model
                     (or, for a lost device, all work)
    card fault       out of memory: the job moves to a bigger class of card, nothing charged
    nobody's fault   withdrawn (its batch paused while it rendered): queued again, nothing charged
    transient        anything else (an upload that did not land, NaN pixels, a library error, a lost worker):
                     back with exponential backoff, charged, dead when the attempt budget is spent
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta

from schemas.job import JobStatus


class Fault(enum.StrEnum):
    """Whose fault a failed attempt was."""

    JOB = "job"
    WORKER = "worker"
    CARD = "card"
    NOBODY = "nobody"
    TRANSIENT = "transient"


# RenderResult.error_kind -> fault; any other kind ("error", "nan", None) is transient
FAULT_OF_KIND = {"bad_input": Fault.JOB, "worker": Fault.WORKER, "oom": Fault.CARD, "withdrawn": Fault.NOBODY}
# the attempt row's status for each fault: only "failed" and "lost" (a worker vanished) are charged
ATTEMPT_STATUS = {Fault.JOB: "failed", Fault.TRANSIENT: "failed", Fault.WORKER: "worker", Fault.CARD: "oom",
                  Fault.NOBODY: "withdrawn"}
CHARGED = ("failed", "lost")


def fault_of(error_kind: str | None) -> Fault:
    """Whose fault a failure of this kind is."""
    return FAULT_OF_KIND.get(error_kind or "", Fault.TRANSIENT)


@dataclass(frozen=True)
class RetryPolicy:
    """How many charged attempts a job gets, on how many workers, and how long it waits between them."""

    max_attempts: int
    retry_base: timedelta
    spread: int = 2  # distinct workers the attempts must have run on before giving up (one bad card does not
    # kill a job); 1 where there is one worker, as in `kiln render`

    def exhausted(self, charged: int, workers: int) -> bool:
        """Whether to give up: max_attempts charged tries on `spread` workers, or twice that on fewer."""
        return self.max_attempts <= charged and (workers >= self.spread or charged >= 2 * self.max_attempts)

    def delay(self, charged: int) -> timedelta:
        """The wait before retry number `charged`: base * 2**(charged-1)."""
        return self.retry_base * 2 ** max(charged - 1, 0)


@dataclass(frozen=True)
class Next:
    """What becomes of a job after a failed attempt."""

    status: JobStatus  # FAILED (until resubmitted), QUEUED (again) or DEAD
    delay: timedelta | None = None  # before it may be taken again
    bigger_card: bool = False  # it goes to the next class of card up (where there is one; else it fails)
    note: str = ""


def after_failure(fault: Fault, charged: int, workers: int, policy: RetryPolicy) -> Next:
    """The next step for a job whose attempt just failed with `fault`, `charged` attempts charged to it so far
    (this one included) on `workers` distinct workers."""
    if fault is Fault.JOB:
        return Next(JobStatus.FAILED, note="failed: bad input, not retried")
    if fault is Fault.WORKER:
        return Next(JobStatus.QUEUED, note="the worker's fault: queued again for another worker, nothing charged")
    if fault is Fault.NOBODY:
        return Next(JobStatus.QUEUED, note="withdrawn while it rendered: queued again, nothing charged")
    if fault is Fault.CARD:
        return Next(JobStatus.QUEUED, bigger_card=True, note="out of memory: to a bigger card, nothing charged")
    if policy.exhausted(charged, workers):
        return Next(JobStatus.DEAD, note=f"dead after {charged} attempts on {workers} workers")
    delay = policy.delay(charged)
    return Next(JobStatus.QUEUED, delay=delay, note=f"failed, retry in {delay.total_seconds():g} s")
