"""Rendering: JobSpecs in, stored PNGs and RenderResults out. One model at a time, loaded as the plan for this
card says and kept while its plan fits the jobs that come."""

from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from schemas.capacity import need_tier
from schemas.errors import KilnError, RenderError, first_line
from schemas.job import JobSpec, RenderResult
from schemas.models import ModelSpec, resolve_model
from schemas.plan import STAGES, Card, Plan, Shape, Stage, plan_for
from schemas.renderer import StepCallback, Storage
from schemas.settings import KilnSettings
from schemas.storage import open_storage
from worker.device import cap_memory, device_name, free_cached, local_card, pick_device
from worker.encode import encode
from worker.pipeline import LoadedModel, load_model, quiet_libraries, weights_folder
from worker.prompts import PromptCache
from worker.speedups import check_attention
from worker.writer import Writer

log = logging.getLogger("kiln.worker")
# What CUDA libraries say when an allocation fails outside torch's allocator (cuBLAS workspaces, cuDNN plans).
T = TypeVar("T")
Outcome = RenderResult | Callable[[], RenderResult]  # a job's result, or what stores its image and gives it
ALLOCATION_FAILURES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
# What torch says when the CUDA context is gone (a driver reset, a card dropping off the bus, a device-side
# assert): nothing more renders in this process.
DEVICE_LOST = ("CUDA error", "CUDA driver error", "cudaErrorDevicesUnavailable", "NVML_ERROR_GPU_IS_LOST")


class LocalRenderer:
    """Renders on this machine's best device, within its card's memory, and writes to KILN_STORAGE_URL."""

    def __init__(self, settings: KilnSettings, worker: str, storage: Storage | None = None,
                 card: Card | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self._storage = storage  # opened when first needed: a fleet worker writes only through signed uploads,
        # whatever KILN_STORAGE_URL its environment happens to hold
        check_attention(settings.attention)
        self.device = pick_device(settings.device)
        self.card = card or local_card(self.device, settings.vram)
        cap_memory(self.device, self.card)
        quiet_libraries()
        self.prompts = PromptCache(settings.prompt_cache_mb * 2**20)
        # (model profile, stage) -> the smallest planned need (GiB) of that stage that ran out of memory here;
        # plans that need as much in that stage are refused, smaller ones still run
        self.ceilings: dict[tuple[str, Stage], float] = {}
        self._loaded: LoadedModel | None = None
        self._warm_shape: str | None = None
        self.loads: Counter[str] = Counter()  # model -> how many times it was loaded here
        self.load_seconds: dict[str, float] = {}  # model -> how long its last load took
        self.loading_seconds = 0.0  # spent loading models here, in all (kept out of seconds per image)
        self.unserved: dict[str, str] = {}  # model -> why it cannot be loaded here (its jobs are not tried again)
        self.compile_verdicts: dict[str, bool] = {}  # model -> whether a compile paid here (KILN_COMPILE=auto)
        self.broken: str | None = None  # why this device can render nothing more (it was lost)
        self.writer = Writer()  # stores images while the next ones render

    @property
    def storage(self) -> Storage:
        """Where images go unless a render names other storage: KILN_STORAGE_URL."""
        if self._storage is None:
            self._storage = open_storage(self.settings)
        return self._storage

    @property
    def storage_uri(self) -> str:
        """Where the images go."""
        return self.storage.uri("")

    @property
    def device_name(self) -> str:
        """What renders, in words: 'cuda:NVIDIA GeForce RTX 4070', 'mps', 'cpu'."""
        return device_name(self.device)

    @property
    def vram_mb(self) -> int | None:
        """The memory Kiln may use on this card, in MiB."""
        return int(self.card.gib * 1024)

    @property
    def loaded_model(self) -> str | None:
        """The model whose pipeline is in memory."""
        return self._loaded.spec.name if self._loaded else None

    @property
    def warm_shape(self) -> str | None:
        """The shape of the jobs it rendered last (their LoRAs are still applied), while their model is loaded."""
        return self._warm_shape if self._loaded else None

    @property
    def loaded_plan(self) -> str | None:
        """How the model in memory is loaded and runs, in words."""
        return self._loaded.describe() if self._loaded else None

    def prepare(self, models: Sequence[ModelSpec]) -> None:
        """Make sure every model's weights are on this machine (download or build them) before any work starts."""
        for spec in models:
            weights_folder(spec, self.settings.cache_dir)

    def why_unfit(self, model: str, width: int, height: int, references: int) -> str | None:
        """Why this machine cannot render one such image (no plan fits its card), or None when it can."""
        spec = resolve_model(model)
        shape = Shape.of(width, height, 1, references)
        if plan_for(spec.profile, self.card, shape) is not None:
            return None
        tier = need_tier(spec.profile, shape)
        needs = f"a {tier} GB card" if tier else "more memory than any card Kiln knows"
        return f"{model} at {width}x{height} needs {needs}; this one ({self.card}) has no plan for it"

    def plan(self, jobs: Sequence[JobSpec]) -> tuple[Plan, int]:
        """The plan for rendering `jobs` (one shape) here, and how many go in one pipeline call: all of them when
        they fit at once, else as many as fit without a slower strategy than one alone would get. Raises
        RenderError (kind "oom") when not even one fits this card, or one ran out of memory here before."""
        lead = jobs[0].params
        spec = resolve_model(lead.model)
        references = lead.references
        keep = self._loaded.plan.strategy.name if self._loaded and self._loaded.spec.name == spec.name else None
        single = plan_for(spec.profile, self.card, Shape.of(lead.width, lead.height, 1, references), keep=keep)
        if single is None:
            raise RenderError(self.why_unfit(lead.model, lead.width, lead.height, references) or "", "oom")
        over = self._over_ceiling(single)
        if over:
            raise RenderError(f"{spec.name} at {lead.width}x{lead.height} {over}", "oom")
        for n in range(len(jobs), 1, -1):
            batched = plan_for(spec.profile, self.card, Shape.of(lead.width, lead.height, n, references),
                               keep=single.strategy.name)
            if batched and batched.strategy == single.strategy and not self._over_ceiling(batched):
                return batched, n
        return single, 1

    def _over_ceiling(self, plan: Plan) -> str | None:
        for stage in STAGES:
            need, ceiling = plan.stage_gib(stage), self.ceilings.get((plan.profile, stage))
            if ceiling is not None and need >= ceiling:
                return (f"needs {need:.1f} GiB to {stage} as planned, and this card ran out of memory at "
                        f"{ceiling:.1f} GiB there on this model before")
        return None

    def load(self, jobs: Sequence[JobSpec]) -> LoadedModel:
        """The model for `jobs`, loaded as their plan on this card says (reused while that plan fits)."""
        return self._model(resolve_model(jobs[0].params.model), self.plan(jobs)[0])

    def refuses(self, model: str) -> str | None:
        """Why this renderer takes no more jobs of `model` (it could not load it, or the device was lost)."""
        return self.broken or self.unserved.get(model)

    def render(self, jobs: Sequence[JobSpec], on_step: StepCallback | None = None,
               storage: Storage | None = None) -> list[RenderResult]:
        """Render jobs of one shape and store them (in `storage`, else the configured one); `start`, waited for."""
        return self.start(jobs, on_step, storage).result()

    def start(self, jobs: Sequence[JobSpec], on_step: StepCallback | None = None, storage: Storage | None = None,
              then: Callable[[list[RenderResult]], None] | None = None) -> Future[list[RenderResult]]:
        """Render jobs of one shape now: their prompts in one encoder stage, then as many images per pipeline call
        as the plan fits. Their images are encoded and stored (in `storage`, else the configured one) on the
        writer thread, while the caller goes on to the next jobs; the future holds the results once they are
        stored, and `then` hears them first (on that thread). A failure is reported per job, never raised: a bug
        or an unforeseen library error fails the jobs in hand, and the batch goes on. A model that cannot be
        loaded here, or a lost device, is the worker's fault (kind "worker"): remembered, and its jobs are not
        tried here again."""
        outcomes = self._attempt(jobs, on_step, storage)

        def finish() -> list[RenderResult]:
            results = []
            for job, outcome in zip(jobs, outcomes, strict=True):
                try:
                    results.append(outcome() if callable(outcome) else outcome)
                except Exception as exc:  # a bug while encoding or storing: the job fails, the worker goes on
                    log.debug("storing failed", exc_info=True)
                    results.append(self._failed(job, RenderError(f"{type(exc).__name__}: {first_line(exc)}",
                                                                 "error"), 0.0, None))
            if then is not None:
                then(results)
            return results

        if any(callable(o) for o in outcomes):
            return self.writer.submit(finish)
        done: Future[list[RenderResult]] = Future()
        done.set_result(finish())  # nothing to store: settled here
        return done

    def _attempt(self, jobs: Sequence[JobSpec], on_step: StepCallback | None,
                 storage: Storage | None) -> list[Outcome]:
        refused = self.refuses(jobs[0].params.model)
        if refused:
            return [self._failed(job, RenderError(refused, "worker"), 0.0, None) for job in jobs]
        try:
            return self._render(jobs, on_step, storage)
        except Exception as exc:
            log.debug("render failed", exc_info=True)  # the traceback, for --debug
            error = RenderError(f"{type(exc).__name__}: {first_line(exc)}", "error")
            if any(marker in str(exc) for marker in DEVICE_LOST):
                self.broken = f"the device failed ({error}): restart this worker"
                error = RenderError(self.broken, "worker")
        self._unload()  # whatever state the failure left the model in, the next job starts from a fresh load
        return [self._failed(job, error, 0.0, None) for job in jobs]

    def _render(self, jobs: Sequence[JobSpec], on_step: StepCallback | None,
                storage: Storage | None) -> list[Outcome]:
        """Each job's result, or for a rendered image, what stores it and gives its result."""
        started = time.perf_counter()
        plan: Plan | None = None
        try:
            plan, per_call = self.plan(jobs)
            images = self._generate(jobs, plan, per_call, on_step)
            self._warm_shape = jobs[0].params.shape
        except KilnError as exc:  # RenderError, or a ModelError from a component loading for its stage
            # A fresh error: the caught one's traceback holds the failed call's frames, and with them its tensors.
            error = RenderError(str(exc), getattr(exc, "kind", "error"))
            if error.kind == "worker":
                self.unserved[jobs[0].params.model] = str(error)
        else:
            seconds = (time.perf_counter() - started) / len(jobs)  # rendering only: storing is the writer's
            target = storage or self.storage

            def storing(job: JobSpec, image: np.ndarray, how: str) -> Callable[[], RenderResult]:
                return lambda: self._store(job, image, seconds, target, how)

            return [storing(job, image, how) for job, (image, how) in zip(jobs, images, strict=True)]
        if len(jobs) > 1 and error.kind == "oom":  # find out which ones fit alone
            return [r for job in jobs for r in self._render([job], on_step, storage)]
        how = plan.describe() if plan else None
        return [self._failed(job, error, time.perf_counter() - started, how) for job in jobs]

    def _model(self, spec: ModelSpec, plan: Plan) -> LoadedModel:
        loaded = self._loaded
        if loaded and loaded.spec.name == spec.name and loaded.plan.strategy == plan.strategy \
                and loaded.plan.fp8 == plan.fp8:
            return loaded
        self._unload()  # free the old model before loading the next
        started = time.perf_counter()
        try:
            loaded, oom = _unless_out_of_memory(
                lambda: load_model(spec, self.settings.cache_dir, plan, self.device, self.prompts,
                                   compile=self._compile_setting(spec.name), attention=self.settings.attention))
        except KilnError as exc:  # weights missing here: the worker's fault, not the job's
            raise RenderError(str(exc), "worker") from None
        except Exception as exc:  # weights that do not load (a broken download, a library mismatch): the same
            log.debug("loading %s failed", spec.name, exc_info=True)
            raise RenderError(f"cannot load {spec.name}: {type(exc).__name__}: {first_line(exc)}", "worker") from None
        seconds = time.perf_counter() - started
        self.loading_seconds += seconds
        if loaded is not None:
            self._loaded = loaded
            self.loads[spec.name] += 1
            self.load_seconds[spec.name] = round(seconds, 2)
            return loaded
        self._unload()  # the half-loaded model was referenced only by the failed call, gone now
        self._lower_ceiling(plan, *STAGES)
        raise RenderError(f"out of memory loading {spec.name} ({plan.describe()}) on {self.device_name}", "oom")

    def _compile_setting(self, model: str) -> str:
        """KILN_COMPILE for loading `model`; under auto, what an earlier trial of it here found, once one has."""
        verdict = self.compile_verdicts.get(model) if self.settings.compile == "auto" else None
        return self.settings.compile if verdict is None else ("on" if verdict else "off")

    def _generate(self, jobs: Sequence[JobSpec], plan: Plan, per_call: int,
                  on_step: StepCallback | None) -> list[tuple[np.ndarray, str]]:
        lead = jobs[0].params
        model = self._model(resolve_model(lead.model), plan)
        image = [_reference(f.path) for f in lead.reference_files] or None

        def denoise() -> list[tuple[np.ndarray, str]]:
            images: list[tuple[np.ndarray, str]] = []  # each image, and how the call that made it ran
            for i in range(0, len(jobs), per_call):
                chunk = jobs[i:i + per_call]
                made = model.generate(
                    [j.params.prompt for j in chunk], width=lead.width, height=lead.height, steps=lead.steps,
                    guidance=lead.guidance, seeds=[j.params.seed for j in chunk], image=image, on_step=on_step,
                    embeddings=embeddings, loras=lead.loras, decoder=lead.decoder)
                images.extend((pixels, model.describe()) for pixels in made)
                log.info("%d image%s of %s at %dx%d in one pipeline call", len(chunk), "s" * (len(chunk) > 1),
                         lead.model, lead.width, lead.height)
            return images

        embeddings, oom = _unless_out_of_memory(lambda: model.encode([j.params.prompt for j in jobs]))
        stage: Stage = "encode"
        if not oom:
            images, oom = _unless_out_of_memory(denoise)
            stage = "denoise"
            if model.compile_verdict is not None:  # a reload of this model here needs no trial
                self.compile_verdicts[model.spec.name] = model.compile_verdict
            if not oom:
                return images  # type: ignore[return-value]
        model.rest()
        self._lower_ceiling(plan, stage)
        raise RenderError(f"out of memory at {lead.width}x{lead.height} x{per_call} on {self.device_name} while "
                          f"{'encoding prompts' if stage == 'encode' else 'denoising'} ({plan.describe()}, planned "
                          f"{plan.stage_gib(stage):.1f} GiB)", "oom")

    def _lower_ceiling(self, plan: Plan, *stages: Stage) -> None:
        for stage in stages:
            need = plan.stage_gib(stage)
            self.ceilings[(plan.profile, stage)] = min(need, self.ceilings.get((plan.profile, stage), need))
        gc.collect()
        free_cached(self.device)

    def _store(self, job: JobSpec, pixels: np.ndarray, seconds: float, storage: Storage, how: str) -> RenderResult:
        """Encode and store one image; `how` it was made (the plan and speed-ups) goes into the file and result."""
        if not np.isfinite(pixels).all():
            return self._failed(job, RenderError("the model produced NaN or infinite pixels", "nan"), seconds, how)
        try:
            data = encode(pixels, job, how)
            uri = storage.put(job.output_key, data, job.job_id)
        except KilnError as exc:  # a kind for the scheduler: another job's image at the key is bad input, say
            return self._failed(job, RenderError(str(exc), getattr(exc, "kind", "error")), seconds, how)
        return RenderResult(job_id=job.job_id, attempt=job.attempt, ok=True, worker=self.worker, seconds=seconds,
                            uri=uri, sha256=hashlib.sha256(data).hexdigest(), md5=hashlib.md5(data).hexdigest(),
                            bytes=len(data), plan=how)

    def _failed(self, job: JobSpec, exc: RenderError, seconds: float, how: str | None) -> RenderResult:
        log.warning("job %s (row %s) failed: %s", job.job_id, job.row_id, exc)
        return RenderResult(job_id=job.job_id, attempt=job.attempt, ok=False, worker=self.worker, seconds=seconds,
                            error=str(exc), error_kind=exc.kind, plan=how)

    def _unload(self) -> None:
        if self._loaded is not None:
            self._loaded.unload()
            self._loaded = None
        gc.collect()
        free_cached(self.device)


def _unless_out_of_memory(work: Callable[[], T]) -> tuple[T | None, bool]:
    """(what `work` returns, False), or (None, True) when the device ran out of memory. When this returns, the
    caught error is gone, and with its traceback every frame and tensor of the failed call: nothing is retried,
    nor the card cleaned, while they are alive."""
    try:
        return work(), False
    except torch.OutOfMemoryError:
        pass
    except RuntimeError as exc:
        if not any(marker in str(exc) for marker in ALLOCATION_FAILURES):
            raise
    return None, True


def _reference(path: str) -> Any:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise RenderError(f"reference image {path} cannot be read: {exc}", "bad_input") from None
