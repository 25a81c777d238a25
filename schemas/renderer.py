"""What the dispatcher needs from a renderer it runs in its own process (the embedded default)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Protocol

from schemas.job import JobSpec, RenderResult
from schemas.models import ModelSpec
from schemas.storage import Storage

StepCallback = Callable[[int, int], None]  # (steps done, steps in all) of the call in progress
__all__ = ["Renderer", "StepCallback", "Storage"]


class Renderer(Protocol):
    """Turns jobs into stored images; `worker.render.LocalRenderer` is the one Kiln ships."""

    worker: str
    loading_seconds: float  # spent loading models so far, in all

    @property
    def storage_uri(self) -> str:
        """Where the images go, as a URI."""
        ...

    @property
    def device_name(self) -> str:
        """What renders, in words."""
        ...

    @property
    def vram_mb(self) -> int | None:
        """GPU memory in MiB, if any."""
        ...

    @property
    def loaded_model(self) -> str | None:
        """The model in memory, so the dispatcher can hand out more of the same."""
        ...

    @property
    def warm_shape(self) -> str | None:
        """The shape (RenderParams.shape) it rendered last, LoRAs loaded for it: more of it costs no switch."""
        ...

    def why_unfit(self, model: str, width: int, height: int, references: int) -> str | None:
        """Why this renderer's card cannot take one such image, or None when it can."""
        ...

    def prepare(self, models: Sequence[ModelSpec]) -> None:
        """Have every model's weights on this machine, or raise ModelError saying how to get them."""
        ...

    def start(self, jobs: Sequence[JobSpec], on_step: StepCallback | None = None,
              storage: Storage | None = None) -> Future[list[RenderResult]]:
        """Render jobs of one shape, returning once the images are rendered: they are stored in `storage` (else
        the renderer's own) in the background meanwhile (one hand-off deep), and the future holds the results;
        failures come back as results."""
        ...
