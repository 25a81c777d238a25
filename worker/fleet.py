"""`kiln worker`: a GPU machine's place in the fleet. It needs only the broker URL: jobs arrive with signed
uploads, and results and heartbeats go back as messages the dispatcher records."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import click
from celery import Celery, signals
from pydantic import ValidationError

from schemas.broker import make_app
from schemas.capacity import worker_queues
from schemas.errors import ConfigError
from schemas.job import JobSpec, RenderResult
from schemas.messages import (
    HEARTBEAT_TASK,
    RENDER_TASK,
    REPORT_TASK,
    REPORTS_QUEUE,
    Heartbeat,
    RenderTask,
    Report,
)
from schemas.models import resolve_model
from schemas.settings import KilnSettings, load_settings

# Imported here, before Celery forks the GPU process, so a replacement process (after a crash or a time limit)
# starts rendering in a second instead of importing torch and diffusers again. CUDA is first touched in the child.
from worker.render import LocalRenderer
from worker.upload import SignedUpload

log = logging.getLogger("kiln.worker")


def measure_vram_gb(device: str) -> tuple[str, float]:
    """(device name, memory in GB) without initializing CUDA in this process, so the GPU child can."""
    if device in ("auto", "cuda"):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
                                                                 or 0))
            name = pynvml.nvmlDeviceGetName(handle)
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            return f"cuda:{name if isinstance(name, str) else name.decode()}", total / 1e9
        except Exception as exc:  # no NVIDIA driver, no GPU, no pynvml: say so if CUDA was asked for
            if device == "cuda":
                raise ConfigError(f"KILN_DEVICE=cuda but NVML sees no GPU ({type(exc).__name__}): "
                                  "install the NVIDIA driver, or pass --vram GB") from None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return "cpu", total / 1e9  # a CPU (or Apple unified memory) can hold any model, slowly


class WorkerState:
    """What this worker is doing, for its heartbeats; shared by the task and the heartbeat thread."""

    def __init__(self, name: str, device: str, vram_gb: float, queues: list[str]) -> None:
        self.beat = Heartbeat(worker=name, device=device, vram_gb=vram_gb, queues=queues)
        self.ceilings: dict[str, float] = {}  # model profile -> largest megapixels known to fit after an OOM
        self.lock = threading.Lock()

    def update(self, **values: Any) -> None:
        """Change what the next heartbeat says."""
        with self.lock:
            self.beat = self.beat.model_copy(update=values)

    def too_big(self, job: JobSpec) -> bool:
        """True when this card already ran out of memory on this model at this size or smaller."""
        ceiling = self.ceilings.get(resolve_model(job.model).profile)
        return ceiling is not None and job.width * job.height / 1e6 > ceiling


def build(settings: KilnSettings, name: str, vram_gb: float | None) -> tuple[Celery, WorkerState]:
    """The Celery app with the render task bound to this worker."""
    if not settings.broker_url:
        raise ConfigError("KILN_BROKER_URL is not set: a worker needs the fleet's Redis, e.g. redis://host:6379/0")
    device, measured = measure_vram_gb(settings.device)
    vram = vram_gb if vram_gb is not None else measured
    state = WorkerState(name, device, vram, worker_queues(vram))
    app = make_app(settings.broker_url, settings.job_time_limit_seconds)
    renderer: dict[str, Any] = {}

    def send(task: str, payload: dict[str, Any], expires: float | None = None) -> None:
        app.send_task(task, args=[payload], queue=REPORTS_QUEUE, expires=expires,
                      argsrepr=f"{payload.get('kind', 'heartbeat')} from {name}")

    def heartbeat_forever() -> None:
        while True:
            with state.lock:
                payload = state.beat.model_dump(mode="json")
            try:
                send(HEARTBEAT_TASK, payload, expires=3 * settings.heartbeat_seconds)
            except Exception as exc:  # the broker is away: keep trying, Celery reconnects
                log.warning("heartbeat not sent: %s", type(exc).__name__)
            time.sleep(settings.heartbeat_seconds)

    @signals.worker_process_init.connect(weak=False)
    def start_child(**_: Any) -> None:  # the GPU child: it renders, so it reports
        threading.Thread(target=heartbeat_forever, name="kiln-heartbeat", daemon=True).start()

    @app.task(name=RENDER_TASK, bind=True, acks_late=True, max_retries=2)
    def render(task: Any, payload: dict[str, Any]) -> None:
        try:
            message = RenderTask.model_validate(payload)  # anything else is dropped, never executed
        except ValidationError as exc:
            log.error("refused a malformed render message: %s", exc.errors()[0]["msg"])
            return
        job = message.job
        send(REPORT_TASK, Report(kind="started", job_id=job.job_id, attempt=job.attempt, worker=name)
             .model_dump(mode="json"))
        result = _render(job, message, settings, name, state, renderer)
        send(REPORT_TASK, Report(kind="finished", job_id=job.job_id, attempt=job.attempt, worker=name,
                                 result=result).model_dump(mode="json"))

    return app, state


def _render(job: JobSpec, message: RenderTask, settings: KilnSettings, name: str, state: WorkerState,
            renderer: dict[str, Any]) -> RenderResult:
    if state.too_big(job):
        return RenderResult(job_id=job.job_id, attempt=job.attempt, ok=False, worker=name, seconds=0.0,
                            error_kind="oom", error=f"{name} ran out of memory on this model at this size before")
    if "local" not in renderer:
        renderer["local"] = LocalRenderer(settings, name)
    local: LocalRenderer = renderer["local"]
    state.update(current_job=job.job_id, step=0, steps=job.steps)
    started = time.perf_counter()
    upload = SignedUpload(message.upload, settings.storage_timeout_seconds, settings.upload_retry_seconds)
    [result] = local.render([job], lambda step, steps: state.update(step=step, steps=steps), upload)
    if result.error_kind == "oom":
        state.ceilings[resolve_model(job.model).profile] = job.width * job.height / 1e6 - 1e-6
    seconds = round(time.perf_counter() - started, 3) if result.ok else state.beat.seconds_per_image
    state.update(current_job=None, step=None, steps=None, loaded_model=local.loaded_model, seconds_per_image=seconds)
    return result


@click.command("worker")
@click.option("--name", help="Worker name [default: host name].")
@click.option("--vram", type=float, help="GB of GPU memory to use (default: measured); leave room for a game.")
@click.option("--device", type=click.Choice(["auto", "cuda", "mps", "cpu"]), help="[env KILN_DEVICE; auto]")
@click.option("--broker-url", help="[env KILN_BROKER_URL] The fleet's Redis.")
@click.option("--cache-dir", type=click.Path(), help="[env KILN_CACHE_DIR; ~/.cache/kiln]")
def command(name: str | None, vram: float | None, **options: Any) -> None:
    """Render for the fleet: take the jobs that fit this card from the broker until stopped.

    Needs only KILN_BROKER_URL: uploads go through signed URLs, results back through the broker.
    """
    settings = load_settings(**options)
    logging.getLogger("kiln").setLevel(logging.INFO)  # a service tells its log what it does
    name = name or socket.gethostname()
    app, state = build(settings, name, vram)
    beat = state.beat
    click.echo(f"worker {name}: {beat.device}, {beat.vram_gb:.1f} GB, queues {', '.join(beat.queues) or 'none'}",
               err=True)
    if not beat.queues:
        raise ConfigError(f"{beat.vram_gb:.1f} GB fits no job Kiln schedules (the smallest needs 8 GB)")
    app.worker_main(["worker", "--pool", "prefork", "--concurrency", "1", "-Q", ",".join(beat.queues),
                     "-n", f"{name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"])
