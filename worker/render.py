"""Rendering: JobSpecs in, stored PNGs and RenderResults out. One pipeline per model, loaded once and reused."""

from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from schemas.errors import KilnError, RenderError
from schemas.job import JobSpec, RenderResult
from schemas.models import ModelSpec, resolve_model
from schemas.renderer import StepCallback, Storage
from schemas.settings import KilnSettings
from worker.pipeline import TEXT_ENCODER_OUT_LAYERS, load_pipeline, pick_device, quiet_libraries, weights_folder
from worker.png import encode_png
from worker.storage import open_storage

log = logging.getLogger("kiln.worker")



class LocalRenderer:
    """Renders on this machine's best device and writes to KILN_STORAGE_URL."""

    def __init__(self, settings: KilnSettings, worker: str, storage: Storage | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.storage = storage or open_storage(settings.storage_url)
        self.device = pick_device(settings.device)
        quiet_libraries()
        self._loaded: tuple[str, Any] | None = None

    @property
    def storage_uri(self) -> str:
        """Where the images go."""
        return self.storage.uri("")

    @property
    def device_name(self) -> str:
        """What renders, in words: 'cuda:NVIDIA GeForce RTX 4070', 'mps', 'cpu'."""
        if self.device.type == "cuda":
            return f"cuda:{torch.cuda.get_device_name(self.device)}"
        return self.device.type

    @property
    def vram_mb(self) -> int | None:
        """Total memory of the CUDA device in MiB, when there is one."""
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.get_device_properties(self.device).total_memory // 2**20)

    @property
    def loaded_model(self) -> str | None:
        """The model whose pipeline is in memory."""
        return self._loaded[0] if self._loaded else None

    def prepare(self, models: Sequence[ModelSpec]) -> None:
        """Make sure every model's weights are on this machine (download or build them) before any work starts."""
        for spec in models:
            weights_folder(spec, self.settings.cache_dir)

    def render(self, jobs: Sequence[JobSpec], on_step: StepCallback | None = None,
               storage: Storage | None = None) -> list[RenderResult]:
        """Render jobs of one shape in one pipeline call and store them (in `storage`, else the configured one);
        a failure is reported per job, never raised."""
        started = time.perf_counter()
        try:
            images = self._generate(jobs, on_step)
        except RenderError as exc:
            if len(jobs) > 1 and exc.kind == "oom":  # find out which ones fit alone
                return [r for job in jobs for r in self.render([job], on_step, storage)]
            return [self._failed(job, exc, time.perf_counter() - started) for job in jobs]
        seconds = (time.perf_counter() - started) / len(jobs)
        target = storage or self.storage
        return [self._store(job, image, seconds, target) for job, image in zip(jobs, images, strict=True)]

    def _pipeline(self, name: str) -> Any:
        if self._loaded and self._loaded[0] == name:
            return self._loaded[1]
        self._loaded = None  # free the old pipeline before loading the next
        self._free()
        pipe = load_pipeline(resolve_model(name), self.settings.cache_dir, self.device)
        self._loaded = (name, pipe)
        return pipe

    def _generate(self, jobs: Sequence[JobSpec], on_step: StepCallback | None) -> np.ndarray:
        lead = jobs[0]
        try:
            pipe = self._pipeline(lead.model)
        except KilnError as exc:
            raise RenderError(str(exc), "error") from None
        image = _reference(lead.reference) if lead.reference else None

        def step_end(_pipe: Any, step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step:
                on_step(step + 1, lead.steps)
            return tensors

        try:
            result = pipe(
                prompt=[j.prompt for j in jobs], image=image, width=lead.width, height=lead.height,
                num_inference_steps=lead.steps, guidance_scale=lead.guidance,
                # one CPU generator per image: each job's seed alone decides its noise, batched or not,
                # on whatever device renders it
                generator=[torch.Generator("cpu").manual_seed(j.seed) for j in jobs],
                text_encoder_out_layers=TEXT_ENCODER_OUT_LAYERS, output_type="np",
                callback_on_step_end=step_end)
        except torch.OutOfMemoryError:
            self._free()
            raise RenderError(f"out of memory at {lead.width}x{lead.height} x{len(jobs)} on {self.device_name}",
                              "oom") from None
        return np.asarray(result.images)

    def _store(self, job: JobSpec, pixels: np.ndarray, seconds: float, storage: Storage) -> RenderResult:
        if not np.isfinite(pixels).all():
            return self._failed(job, RenderError("the model produced NaN or infinite pixels", "nan"), seconds)
        try:
            data = encode_png(pixels, job)
            uri = storage.put(job.output_key, data)
        except KilnError as exc:
            return self._failed(job, RenderError(str(exc), "error"), seconds)
        return RenderResult(job_id=job.job_id, attempt=job.attempt, ok=True, worker=self.worker, seconds=seconds,
                            uri=uri, sha256=hashlib.sha256(data).hexdigest(), md5=hashlib.md5(data).hexdigest(),
                            bytes=len(data))

    def _failed(self, job: JobSpec, exc: RenderError, seconds: float) -> RenderResult:
        log.warning("job %s (row %s) failed: %s", job.job_id, job.row_id, exc)
        return RenderResult(job_id=job.job_id, attempt=job.attempt, ok=False, worker=self.worker, seconds=seconds,
                            error=str(exc), error_kind=exc.kind)

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _reference(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise RenderError(f"reference image {path} cannot be read: {exc}", "bad_input") from None
