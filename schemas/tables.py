"""The database tables (SQLAlchemy 2). Alembic migrations in schemas/migrations create them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy import false as sa_false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from schemas.job import JobStatus

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Timestamps are naive UTC everywhere: SQLite keeps no zone, and one convention beats two.
Timestamp = DateTime(timezone=False)


class Base(DeclarativeBase):
    """Declarative base with constraint names fixed, so migrations are the same on every database."""

    metadata = MetaData(naming_convention=NAMING)


class Batch(Base):
    """One submission of one manifest."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    manifest: Mapped[str] = mapped_column(Text)  # the file as given
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    non_commercial: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # higher goes first
    paused: Mapped[bool] = mapped_column(default=False, server_default=sa_false())
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)  # when nothing of it was left to render


class Job(Base):
    """One image to make. Its id is a hash of everything that decides the image, so it is the same
    on every machine and a manifest submitted twice names the same jobs."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(300))
    prompt: Mapped[str] = mapped_column(Text)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    guidance: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(BigInteger)  # up to 2**32 - 1
    output_key: Mapped[str] = mapped_column(String(1024))
    reference: Mapped[str | None] = mapped_column(Text)  # the file where it was submitted
    reference_sha256: Mapped[str | None] = mapped_column(String(64))  # its content: how it travels to workers
    # schemas.params.RenderParams: the parameters added after the first release, where not at their default
    params: Mapped[dict[str, object] | None] = mapped_column(JSON)
    shape: Mapped[str] = mapped_column(String(32))  # RenderParams.shape: jobs that can share a pipeline call
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e],
             name="job_status", create_constraint=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)
    # the fleet: which card the job needs, when it was last handed to the broker, and its retry backoff
    min_vram_gb: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # raised after an OOM
    # when its worker's report of the current attempt arrived, while that report waits to be recorded
    reported_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # attempts up to this number belong to an earlier submission: a resubmitted job gets a fresh budget
    budget_from: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    queue: Mapped[str | None] = mapped_column(String(64))
    published_at: Mapped[datetime | None] = mapped_column(Timestamp)
    not_before: Mapped[datetime | None] = mapped_column(Timestamp)
    # `kiln retry --set`: the job this one was made from, with changed parameters (its lineage)
    retry_of: Mapped[str | None] = mapped_column(String(32))
    # The order the feeder publishes in, kept on the row so that choosing the next jobs is an index scan however
    # many are queued (dispatcher.fleet._next_jobs): the highest priority of the job's batches not paused (NULL: every
    # batch of it is paused), then its place in the order work was asked for (its first batch's submission second,
    # then its manifest position: store.ordinal).
    priority: Mapped[int | None] = mapped_column(Integer)
    ordinal: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        # an embedded run's next job of the warm shape, in order (dispatcher.store.claim); jobs counted by status
        Index("ix_jobs_claim", "status", "model", "shape", "ordinal"),
        # the next jobs of a queue in publishing order; a queue's published jobs, counted (a backlog per worker)
        Index("ix_jobs_ready", "queue", "status", priority.desc(), "ordinal"),
        Index("ix_jobs_published", "queue", "status", postgresql_where=published_at.is_not(None),
              sqlite_where=published_at.is_not(None)),
    )


class BatchJob(Base):
    """A job as one batch asked for it: the manifest row it came from and that row's values."""

    __tablename__ = "batch_jobs"

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True, index=True)
    position: Mapped[int] = mapped_column(Integer)  # order of the job in the expanded manifest
    manifest_row: Mapped[int] = mapped_column(Integer)  # 1-based record number
    manifest_line: Mapped[int] = mapped_column(Integer)  # 1-based line where the record starts
    row_id: Mapped[str] = mapped_column(String(200))
    variant: Mapped[int] = mapped_column(Integer)
    row_data: Mapped[dict[str, object]] = mapped_column(JSON)  # the row's values, for exports


class Attempt(Base):
    """One try at one job by one worker."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))  # running, succeeded, failed, lost
    error: Mapped[str | None] = mapped_column(Text)
    error_kind: Mapped[str | None] = mapped_column(String(16))
    seconds: Mapped[float | None] = mapped_column(Float)
    plan: Mapped[str | None] = mapped_column(String(120))  # how the worker loaded the model for it
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Output(Base):
    """The one stored image of a succeeded job, and where it came from."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), index=True)
    manifest: Mapped[str] = mapped_column(Text)
    manifest_row: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(1024), index=True)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))  # unknown when an earlier attempt's upload stood
    md5: Mapped[str | None] = mapped_column(String(32))  # what the storage verified (the S3 ETag)
    bytes: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(200))
    seconds: Mapped[float] = mapped_column(Float)
    plan: Mapped[str | None] = mapped_column(String(120))  # how the worker loaded the model for it
    created_at: Mapped[datetime] = mapped_column(Timestamp)


class Worker(Base):
    """A process that renders: the embedded renderer, or a fleet worker."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    device: Mapped[str] = mapped_column(String(200))
    vram_mb: Mapped[int | None] = mapped_column(Integer)
    first_seen: Mapped[datetime] = mapped_column(Timestamp)
    last_seen: Mapped[datetime] = mapped_column(Timestamp)
    queues: Mapped[list[str] | None] = mapped_column(JSON)
    models: Mapped[list[str] | None] = mapped_column(JSON)  # whose weights it has
    unserved: Mapped[dict[str, str] | None] = mapped_column(JSON)  # model -> why it does not take its work
    problem: Mapped[str | None] = mapped_column(Text)  # why it takes no work at all
    model_loads: Mapped[dict[str, int] | None] = mapped_column(JSON)  # loads per model since it started
    load_seconds: Mapped[dict[str, float] | None] = mapped_column(JSON)  # each model's last load, in seconds
    loaded_model: Mapped[str | None] = mapped_column(String(300))
    warm_shape: Mapped[str | None] = mapped_column(String(32))  # what it rendered last: the feeder offers more of it
    plan: Mapped[str | None] = mapped_column(String(120))  # how the loaded model sits on its card
    rendering: Mapped[list[str] | None] = mapped_column(JSON)  # the jobs of the render message in hand
    storing: Mapped[list[str] | None] = mapped_column(JSON)  # rendered, their images being stored
    step: Mapped[str | None] = mapped_column(String(16))  # "3/4"
    seconds_per_image: Mapped[float | None] = mapped_column(Float)


class Event(Base):
    """Something a webhook is told (job.dead, batch.finished): written in the transaction that made it happen,
    delivered afterwards, retried until it lands (a transactional outbox)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, object]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_at: Mapped[datetime] = mapped_column(Timestamp)  # not delivered before this (its backoff)
    delivered_at: Mapped[datetime | None] = mapped_column(Timestamp, index=True)
    error: Mapped[str | None] = mapped_column(Text)  # why the last delivery failed
