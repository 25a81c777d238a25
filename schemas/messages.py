"""What travels through the broker. Workers hold no database or storage credentials: a render message carries the
job and a signed upload, and everything a worker learns goes back to the dispatcher as a report message."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.capacity import model_key
from schemas.job import JobSpec, RenderResult

RENDER_TASK = "kiln.render"
# Reports are no Celery tasks either: a worker adds each report message to a Redis stream, and the dispatcher reads
# it in a consumer group (dispatcher.reports): many entries in one command, each acknowledged (and deleted) once its
# reports are recorded, one that could not be recorded yet read again a few seconds later, and those a dispatcher
# killed mid-way held read again by the next. The entries are deleted as they are recorded, so the stream holds only
# what waits: nothing trims it, so no report is lost to a long backlog.
REPORTS_STREAM = "kiln.reports.stream"
REPORTS_GROUP = "kiln.dispatchers"
# Heartbeats are no broker messages: a worker adds each to a Redis stream, and the dispatcher reads every one that
# came since its last tick in one command, records each worker's latest in one transaction, and dates it by the
# stream's own clock (an entry's id is the Redis time it was added). A backlog of reports never makes a living worker
# look silent, a late tick dates every heartbeat right, and a fleet's heartbeats cost the dispatcher no Celery task
# or transaction each. The stream keeps about HEARTBEATS_KEPT entries (each a few hundred bytes).
HEARTBEATS_STREAM = "kiln.heartbeats"
HEARTBEATS_KEPT = 10_000
# Where workers before protocol 5 sent their reports, and before protocol 4 their heartbeats, as Celery tasks: no
# longer read; the dispatcher says when something waits there, and clears it (dispatcher.reports.LegacyQueues).
LEGACY_QUEUES = ("kiln.reports", "kiln.reports.heartbeats")
UNWANTED_PREFIX = "kiln.render.unwanted."  # under kiln.render.*, which a worker's Redis account may read


def unwanted_key(job_id: str, token: str) -> str:
    """The Redis key whose presence tells workers that one published render message is no longer wanted (its
    batch was cancelled or paused): checked before rendering and before uploading."""
    return f"{UNWANTED_PREFIX}{job_id}.{token}"


def waiting_key(queue: str) -> str:
    """The Redis key where the dispatcher says how many jobs a render queue has waiting (published or not yet):
    what a worker reads to keep to its loaded model while that model's work waits (worker.serving)."""
    return f"{queue}.waiting"


class Upload(BaseModel):
    """A signed, create-once PUT for one output key: a late duplicate upload gets 412 and replaces nothing."""

    model_config = ConfigDict(frozen=True)

    url: str
    headers: dict[str, str]  # signed headers the PUT must send (If-None-Match, x-amz-meta-kiln-job)
    uri: str  # s3://bucket/key, for the record


# Raised whenever a message's shape changes, so that a dispatcher and workers of different Kiln versions say so
# instead of dropping each other's messages: 2 = the render parameters nested in the job (schemas.params), reference
# images and LoRAs fetched by content through signed links; 3 = a render message carries several jobs of one shape
# (RenderMessage), reports travel in groups (Reports), and heartbeats name every job a worker holds (rendering,
# storing); 4 = heartbeats go to a Redis stream (HEARTBEATS_STREAM), not the broker's queue; 5 = reports go to a Redis
# stream too (REPORTS_STREAM).
# A message or heartbeat without the field comes from a Kiln before protocol numbers: protocol 1 (`on_the_wire`).
PROTOCOL = 5
UNNUMBERED = 1


def on_the_wire(payload: dict[str, Any]) -> int:
    """The protocol a received message or heartbeat was written in."""
    value = payload.get("protocol", UNNUMBERED)
    return value if isinstance(value, int) else UNNUMBERED  # junk is refused later, as malformed


def protocol_problem(theirs: int, who: str) -> str | None:
    """Why a peer speaking `theirs` cannot work with this process, or None when both speak the same protocol."""
    if theirs == PROTOCOL:
        return None
    return (f"{who} speaks Kiln message protocol {theirs} and this process protocol {PROTOCOL}: install the same "
            "Kiln version on the dispatcher and every worker")


class RenderTask(BaseModel):
    """One job of a render message, with its own signed upload and files."""

    job: JobSpec
    upload: Upload
    reference_urls: list[str] = []  # a signed GET of each of the job's reference images, uploaded at submit
    lora_urls: list[str] = []  # and of each of its LoRAs
    token: str = ""  # which publication of the job this message is (see unwanted_key)


class RenderMessage(BaseModel):
    """What one worker takes at once: jobs of one shape (RenderParams.shape: one model, size, step count, LoRAs and
    reference images), rendered in as few pipeline calls as its card fits, each with its own seed and result.
    Acknowledged once they are all rendered; a worker that dies before has them all rendered again elsewhere."""

    protocol: int = PROTOCOL
    tasks: list[RenderTask] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_shape(self) -> RenderMessage:
        shapes = {task.job.params.shape for task in self.tasks}
        if len(shapes) > 1:
            raise ValueError(f"a render message mixes {len(shapes)} shapes; its jobs must share one pipeline call")
        return self


class Report(BaseModel):
    """A worker's word on one attempt: it started, or it finished (with its result)."""

    kind: Literal["started", "finished"]
    job_id: str
    attempt: int
    worker: str
    result: RenderResult | None = None
    # seconds the worker held it before sending (a started report waits in its outbox for company): the
    # dispatcher dates the attempt's start that much earlier, on its own clock
    held: float = Field(default=0.0, ge=0)


class Reports(BaseModel):
    """A worker's reports on the jobs of one render message, in one broker message: the dispatcher's cost is per
    broker message as much as per report."""

    protocol: int = PROTOCOL
    reports: list[Report] = Field(min_length=1)


def reports_in(payload: Any) -> list[Report]:
    """The reports a report message carries: several (protocol 3), or one (a worker before it, whose last reports
    may still be queued when the fleet is upgraded). Raises pydantic's ValidationError for anything else."""
    if isinstance(payload, dict) and "reports" in payload:
        return Reports.model_validate(payload).reports
    return [Report.model_validate(payload)]


class Heartbeat(BaseModel):
    """A worker saying it lives, what it can take, and what it is doing."""

    protocol: int = PROTOCOL
    worker: str
    device: str
    vram_gb: float
    queues: list[str]  # every render queue it may consume (schemas.capacity), of every model it serves
    models: list[str] = []  # the models whose weights it made sure of at start
    unserved: dict[str, str] = {}  # model -> why it does not take that model's work (no weights, failed to load)
    problem: str | None = None  # why it takes no work at all (its device was lost)
    model_loads: dict[str, int] = {}  # how many times it loaded each model since it started
    load_seconds: dict[str, float] = {}  # how long each model's last load took (not in seconds_per_image)
    loaded_model: str | None = None
    warm_shape: str | None = None  # RenderParams.shape of what it rendered last: its LoRAs are still applied
    plan: str | None = None  # how the loaded model sits on the card (schemas.plan.Plan.describe)
    rendering: list[str] = []  # the jobs of the message in hand
    storing: list[str] = []  # jobs rendered before them, their images being stored (and then reported)
    step: int | None = None
    steps: int | None = None
    seconds_per_image: float | None = None


def heartbeat_in(payload: Any) -> Heartbeat:
    """A heartbeat as received (a stream entry's JSON, or an older worker's Celery task), with the protocol it was
    written in. Raises pydantic's ValidationError for anything else."""
    if not isinstance(payload, dict):
        return Heartbeat.model_validate(payload)
    return Heartbeat.model_validate({**payload, "protocol": on_the_wire(payload)})


def model_sheet_key(model: str) -> str:
    """The Redis key where the dispatcher keeps the signed sheet of a model pushed to the bucket: outside
    kiln.render.*, under kiln.models.*, which a worker's account may read and not write (schemas.broker)."""
    return f"kiln.models.{model_key(model)}"


class ModelFile(BaseModel):
    """One file of a model pushed to the fleet's bucket: its path in the model's folder, size and content; on a
    sheet, with a signed GET."""

    path: str
    size: int
    sha256: str
    url: str = ""


class ModelSheet(BaseModel):
    """What `kiln models push` wrote to the bucket (without URLs), and what the dispatcher hands workers (with)."""

    model: str
    files: list[ModelFile]
