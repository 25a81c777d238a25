"""`kiln worker`: a GPU machine's place in the fleet. It needs only the broker URL: jobs arrive with signed
uploads, and results and heartbeats go back as messages the dispatcher records."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import redis
from celery import Celery, bootsteps, signals
from celery.exceptions import Reject
from pydantic import ValidationError
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from schemas.broker import make_app
from schemas.capacity import TIER_FLOOR_GIB, model_key, queue_model_key
from schemas.errors import ConfigError, RenderError
from schemas.job import JobSpec, RenderResult
from schemas.messages import (
    RENDER_TASK,
    Heartbeat,
    ModelSheet,
    RenderMessage,
    RenderTask,
    Report,
    model_sheet_key,
    on_the_wire,
    protocol_problem,
    unwanted_key,
    waiting_key,
)
from schemas.models import ModelSpec, weights_location
from schemas.plan import Card
from schemas.settings import KilnSettings
from schemas.storage import WithdrawnError

# Imported here, before Celery forks the GPU process, so a replacement process (after a crash or a time limit)
# starts rendering in a second instead of importing torch and diffusers again. CUDA is first touched in the child.
from worker.device import advertised_card
from worker.outbox import Outbox, send_heartbeat, send_reports
from worker.pipeline import weights_folder
from worker.pull import pull_model
from worker.render import LocalRenderer
from worker.serving import ModelChooser, default_models, prepare_models
from worker.speedups import check_attention
from worker.upload import SignedUpload, fetch_reference

log = logging.getLogger("kiln.worker")
AFFINITY_SECONDS = 1.0  # how often a worker looks whether to move to another model's work
REPORT_SEND_RETRIES = 8  # about 10 s of backoff (0.1 s doubling, at most 2 s a wait)


class WorkerState:
    """What this worker is doing, for its heartbeats; shared by the task and the heartbeat thread."""

    def __init__(self, name: str, device: str, card: Card, served: dict[str, list[str]],
                 unserved: dict[str, str]) -> None:
        self.card = card
        self.beat = Heartbeat(worker=name, device=device, vram_gb=round(card.gib, 2),
                              queues=[q for queues in served.values() for q in queues], models=list(served),
                              unserved=unserved)
        self.lock = threading.Lock()
        self._stored: set[str] = set()  # jobs stored before their hand-over was noted

    def update(self, **values: Any) -> None:
        """Change what the next heartbeat says."""
        with self.lock:
            self.beat = self.beat.model_copy(update=values)

    def handed_over(self, job_ids: list[str], **values: Any) -> None:
        """A message's jobs are rendered and their images handed to the writer: heartbeats name them as storing
        (so the dispatcher does not take them back while they upload) until `stored` says they are done."""
        with self.lock:
            storing = [job for job in job_ids if job not in self._stored]
            self._stored.difference_update(job_ids)
            self.beat = self.beat.model_copy(update=values | {"storing": [*self.beat.storing, *storing]})

    def stored(self, job_ids: list[str]) -> None:
        """Jobs' images are stored and their results reported (on the writer thread, maybe before
        `handed_over`)."""
        with self.lock:
            storing = self.beat.storing
            self._stored.update(job for job in job_ids if job not in storing)
            self.beat = self.beat.model_copy(update={"storing": [job for job in storing if job not in job_ids]})


class FleetWorker:
    """This machine's place in the fleet: the models it serves (their weights fetched before it subscribes), its
    heartbeats, and the render task. `app` is the Celery app whose task and signals call these methods; the task
    runs in Celery's GPU child process, which makes its renderer on its first message."""

    def __init__(self, settings: KilnSettings, name: str) -> None:
        if not settings.broker_url:
            raise ConfigError("KILN_BROKER_URL is not set: a worker needs the fleet's Redis, e.g. redis://host:6379/0")
        check_attention(settings.attention)  # a misnamed or uninstalled kernel fails here, before any work is taken
        self.settings, self.name = settings, name
        device, card = advertised_card(settings.device, settings.vram)
        names = ([m.strip() for m in settings.models.split(",") if m.strip()] if settings.models
                 else default_models(card, settings.cache_dir))
        self.checks = redis.Redis.from_url(settings.broker_url, socket_timeout=settings.storage_timeout_seconds)
        # Weights before work: pulled, downloaded (or built) here, before subscribing, outside any job's time limit.
        served, unserved = prepare_models(names, card, self.fetch)
        for model, why in unserved.items():
            log.warning("not serving %s: %s", model, why)
        self.state = WorkerState(name, device, card, served, unserved)
        self.local: LocalRenderer | None = None  # made in the GPU process, on its first message
        # What the rendering process tells this one (a model it cannot load, a lost device): a pipe both inherit.
        self.news_in, self.news_out = multiprocessing.Pipe(duplex=False)
        self.chooser = ModelChooser(served, self.waiting, self.news)
        # Reports ride out a broker's hiccup (a restart, a dropped connection) for a few seconds, as Celery's
        # publishing did; past that, the writer thread hears, and the jobs are taken back and rendered again.
        reporting = redis.Redis.from_url(settings.broker_url, socket_timeout=settings.storage_timeout_seconds,
                                         retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), REPORT_SEND_RETRIES),
                                         retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        self.outbox = Outbox(lambda reports: send_reports(reporting, reports))
        self.app = self._app(settings.broker_url)

    def _app(self, broker_url: str) -> Celery:
        """The Celery app: the render task, this process's signals, and the affinity step."""
        app = make_app(broker_url, self.settings.job_time_limit_seconds)
        app.steps["consumer"].add(_affinity_step(self.chooser))

        @signals.worker_process_init.connect(weak=False)
        def start_child(**_: Any) -> None:  # the GPU child: it renders, so it reports
            threading.Thread(target=self.heartbeat_forever, name="kiln-heartbeat", daemon=True).start()

        @app.task(name=RENDER_TASK, bind=True, acks_late=True, max_retries=2)
        def render(task: Any, payload: dict[str, Any]) -> None:
            self.render(payload)

        @signals.worker_process_shutdown.connect(weak=False)
        def store_the_last(**_: Any) -> None:
            self.store_the_last()

        return app

    def fetch(self, spec: ModelSpec) -> None:
        """The model's weights here: already, or from the fleet's bucket when it was pushed there, or from the hub."""
        if weights_location(spec, self.settings.cache_dir):
            return
        try:
            sheet = self.checks.get(model_sheet_key(spec.name))
        except redis.RedisError as exc:
            log.warning("cannot ask the broker whether %s was pushed to the bucket (%s)", spec.name, exc)
            sheet = None
        try:
            pushed = ModelSheet.model_validate_json(sheet) if sheet else None
        except ValidationError:
            log.warning("the broker's sheet of %s is not one the dispatcher wrote; downloading instead", spec.name)
            pushed = None
        if pushed:
            pull_model(pushed, self.settings.cache_dir)
            return
        weights_folder(spec, self.settings.cache_dir)

    def news(self) -> list[dict[str, Any]]:
        """What the rendering process said since last asked."""
        heard = []
        while self.news_in.poll():
            heard.append(self.news_in.recv())
        return heard

    def waiting(self, queues: list[str]) -> list[int] | None:
        """Jobs waiting per queue: the dispatcher's count (published or not), else the queue's length."""
        try:
            pipe = self.checks.pipeline(transaction=False)
            for queue in queues:
                pipe.get(waiting_key(queue))
                pipe.llen(queue)
            found = pipe.execute()
        except redis.RedisError:
            return None
        return [int(count) if count is not None else int(length) for count, length in zip(found[::2], found[1::2],
                                                                                            strict=True)]

    def wanted(self, message: RenderTask) -> bool:
        """Whether the dispatcher still wants this message rendered; if Redis cannot say, it is (the database's
        compare-and-set and the create-once upload keep a late one harmless)."""
        try:
            return not self.checks.exists(unwanted_key(message.job.job_id, message.token))
        except redis.RedisError:
            return True

    def heartbeat_forever(self) -> None:
        """Say what this worker does every KILN_HEARTBEAT_SECONDS, through broker outages."""
        while True:
            with self.state.lock:
                beat = self.state.beat
            try:
                send_heartbeat(self.checks, beat)
            except redis.RedisError as exc:  # the broker is away: keep trying
                log.warning("heartbeat not sent: %s", type(exc).__name__)
            time.sleep(self.settings.heartbeat_seconds)

    def render(self, payload: Any) -> None:
        """The render task: check the message, drop the jobs no longer wanted, report the rest started, and
        render them. Returns once the images are rendered: the message is acknowledged and the next one rendered
        while these upload. A worker that dies before the uploads and reports has its jobs taken back and rendered
        again."""
        mismatch = protocol_problem(on_the_wire(payload), "the dispatcher") if isinstance(payload, dict) else None
        if mismatch:  # dropped: the dispatcher publishes it again later, for a worker that reads it
            log.error("refused a render message: %s", mismatch)
            return
        try:
            message = RenderMessage.model_validate(payload)  # anything else is dropped, never executed
        except ValidationError as exc:
            log.error("refused a malformed render message: %s", exc.errors()[0]["msg"])
            return
        tasks = []
        for one in message.tasks:
            if self.wanted(one):
                tasks.append(one)
            else:
                log.info("job %s attempt %d was withdrawn (its batch cancelled or paused): not rendered",
                         one.job.job_id, one.job.attempt)
        if not tasks:
            return
        model = tasks[0].job.params.model
        if self.local is not None and self.local.refuses(model):
            # Taken in the second before this worker stopped consuming the model's queues: back to the queue
            # untouched, for a worker that can render it (no attempt is started, so none is counted).
            raise Reject(f"this worker no longer serves {model}", requeue=True)
        self.state.update(rendering=[one.job.job_id for one in tasks], step=0, steps=tasks[0].job.params.steps)
        self.outbox.started([Report(kind="started", job_id=one.job.job_id, attempt=one.job.attempt,
                                    worker=self.name) for one in tasks])
        if self.local is None:
            self.local = LocalRenderer(self.settings, self.name, card=self.state.card)
        local = self.local
        stopped: list[str] = []

        def finished(results: list[RenderResult]) -> None:  # once their images are stored: on the writer thread
            if any(r.error_kind == "worker" for r in results) and not stopped:  # it cannot serve the model: stop
                stopped.append(model)
                self._stop_taking(model, next(r for r in results if r.error_kind == "worker"), local)
            self.outbox.finished([Report(kind="finished", job_id=r.job_id, attempt=r.attempt, worker=self.name,
                                         result=r) for r in results])

        self._render(tasks, local, finished)

    def _stop_taking(self, model: str, result: RenderResult, local: LocalRenderer) -> None:
        """Tell the heartbeats and the main process that this worker no longer takes `model` (or any work)."""
        state = self.state
        if local.broken:
            state.update(problem=local.broken, queues=[], models=[])
            self.news_out.send({"problem": local.broken})
            return
        why = local.unserved.get(model) or result.error or "it failed to load"
        with state.lock:
            beat = state.beat
        state.update(unserved={**beat.unserved, model: why}, models=[m for m in beat.models if m != model],
                     queues=[q for q in beat.queues if queue_model_key(q) != model_key(model)])
        self.news_out.send({"unserved": {model: why}})

    def _render(self, tasks: list[RenderTask], local: LocalRenderer,
                finished: Callable[[list[RenderResult]], None]) -> None:
        """Render a message's jobs (one shape) together; `finished` hears their results once their images are stored
        (on the writer thread)."""
        started = time.perf_counter()
        jobs: list[JobSpec] = []
        unfetched: list[RenderResult] = []
        for task in tasks:
            try:
                jobs.append(_with_files(task, self.settings))
            except RenderError as exc:  # this job's files cannot be had: it fails alone
                job = task.job
                unfetched.append(RenderResult(job_id=job.job_id, attempt=job.attempt, ok=False, worker=self.name,
                                              seconds=0.0, error=str(exc), error_kind=exc.kind))
        if unfetched:
            finished(unfetched)
        if not jobs:
            self.state.update(rendering=[], step=None, steps=None)
            return

        def then(results: list[RenderResult]) -> None:
            try:
                finished(results)
            finally:
                self.state.stored([job.job_id for job in jobs])

        loading = local.loading_seconds
        future = local.start(jobs, lambda step, steps: self.state.update(step=step, steps=steps),
                             WantedUploads(tasks, self.settings, self.wanted), then)
        failed = future.done() and not any(r.ok for r in future.result())  # never rendered: its time says nothing
        # from one message's start to the next's (storing overlaps), a model load left out: reported on its own
        seconds = (time.perf_counter() - started - (local.loading_seconds - loading)) / len(jobs)
        self.state.handed_over([job.job_id for job in jobs], rendering=[], step=None, steps=None,
                               loaded_model=local.loaded_model, warm_shape=local.warm_shape, plan=local.loaded_plan,
                               seconds_per_image=self.state.beat.seconds_per_image if failed else round(seconds, 3),
                               model_loads=dict(local.loads), load_seconds=dict(local.load_seconds))

    def store_the_last(self) -> None:
        """The GPU process stops: what it rendered is stored and reported first."""
        budget = self.settings.upload_retry_seconds + self.settings.storage_timeout_seconds
        if self.local is not None and not self.local.writer.drain(budget):
            log.warning("stopped before the last image was stored: its job will be rendered again")
        self.outbox.send_waiting()


def _affinity_step(chooser: ModelChooser) -> type[bootsteps.StartStopStep]:
    """A step of Celery's consumer that runs `chooser` on the event loop, where changing queues is safe."""

    class Affinity(bootsteps.StartStopStep):
        requires = {"celery.worker.consumer.tasks:Tasks"}

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.timer: Any = None

        def start(self, c: Any) -> None:
            chooser.attach(c)
            self.timer = c.timer.call_repeatedly(AFFINITY_SECONDS, chooser.tick, priority=10)

        def stop(self, c: Any) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    return Affinity


def _with_files(task: RenderTask, settings: KilnSettings) -> JobSpec:
    """The task's job with the submitter's reference images and LoRAs fetched from the bucket (by content, so a
    message's jobs sharing them fetch them once). Raises RenderError."""
    job, files, loras = task.job, task.job.params.reference_files, task.job.params.loras
    if not (task.reference_urls and files or task.lora_urls and loras):
        return job
    needed = [(url, f, "the reference image") for url, f in zip(task.reference_urls, files, strict=True)]
    needed += [(url, lora, f"the LoRA {Path(lora.path).name}") for url, lora in zip(task.lora_urls, loras, strict=True)]
    here = [str(fetch_reference(url, f.sha256, Path(f.path).suffix, settings.cache_dir / "references",
                                settings.storage_timeout_seconds, settings.upload_retry_seconds, what=what))
            for url, f, what in needed]
    return job.model_copy(update={"params": job.params.with_files(here[:len(files)], here[len(files):])})


class WantedUploads:
    """A message's signed uploads, one per job's output key; each made only if its job is still wanted when its
    image is ready."""

    def __init__(self, tasks: list[RenderTask], settings: KilnSettings, wanted: Callable[[RenderTask], bool]) -> None:
        self.tasks = {task.job.output_key: task for task in tasks}
        self.uploads = {task.job.output_key: SignedUpload(task.upload, settings.storage_timeout_seconds,
                                                          settings.upload_retry_seconds) for task in tasks}
        self.wanted = wanted

    def uri(self, key: str) -> str:
        """The object's s3:// URI."""
        return self.uploads[key].uri(key)

    def check(self) -> None:
        """Nothing to check before the PUTs."""

    def put(self, key: str, data: bytes, job_id: str) -> str:
        """Upload, unless the job was withdrawn while it rendered (WithdrawnError)."""
        if not self.wanted(self.tasks[key]):
            raise WithdrawnError(job_id)
        return self.uploads[key].put(key, data, job_id)


def run(settings: KilnSettings, name: str) -> None:
    """Get the weights of the models this worker serves, then render for the fleet until stopped."""
    worker = FleetWorker(settings, name)
    state, chooser = worker.state, worker.chooser
    beat = state.beat
    click.echo(f"worker {name}: {beat.device}, {state.card}, models {', '.join(beat.models) or 'none'}", err=True)
    if not beat.models:
        if state.card.kind == "cpu" and settings.vram is None:
            raise ConfigError("this worker has no GPU: a CPU worker takes work only when --vram GB (or KILN_VRAM) "
                              "says how much of this machine's memory it may use")
        if state.card.gib < TIER_FLOOR_GIB[8]:
            raise ConfigError(f"{state.card} fits no job Kiln schedules (the smallest class is an 8 GB card, "
                              f"{TIER_FLOOR_GIB[8]} GiB usable)")
        raise ConfigError("this worker serves no model: " + ("; ".join(
            f"{model}: {why}" for model, why in beat.unserved.items()) or "none was named (--models)"))
    worker.app.worker_main(["worker", "--pool", "prefork", "--concurrency", "1", "-Q", ",".join(chooser.first()),
                     "-n", f"{name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"])
