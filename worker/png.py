"""PNG encoding with the generation parameters embedded where Stable Diffusion image readers look."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from schemas.job import JobSpec

SAMPLER = "Euler (flow matching)"
# zlib level 1, not Pillow's 6: about a third of the time for a 1024x1024 render, about 15% more bytes on a
# studio-like image and the same on noise (benchmarks/png.py; figures in the README). Encoding runs between renders.
PNG_LEVEL = 1


def parameters_text(job: JobSpec) -> str:
    """The A1111-style `parameters` text: the prompt, then one line of settings."""
    return (f"{job.prompt}\nSteps: {job.steps}, Sampler: {SAMPLER}, CFG scale: {job.guidance:g}, "
            f"Seed: {job.seed}, Size: {job.width}x{job.height}, Model: {job.model}, Version: kiln")


def kiln_text(job: JobSpec, plan: str) -> str:
    """The `kiln` chunk: where the image came from and how the model was loaded for it, as JSON."""
    return json.dumps({"job_id": job.job_id, "batch_id": job.batch_id, "manifest": job.manifest,
                       "manifest_row": job.manifest_row, "row_id": job.row_id, "attempt": job.attempt,
                       "plan": plan}, ensure_ascii=False)


def encode_png(pixels: np.ndarray, job: JobSpec, plan: str) -> bytes:
    """Encode an HxWx3 float image in [0, 1] as PNG bytes with Kiln's metadata chunks."""
    image = Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8), mode="RGB")
    info = PngInfo()
    info.add_text("parameters", parameters_text(job))  # iTXt where the prompt is not Latin-1
    info.add_text("kiln", kiln_text(job, plan))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=PNG_LEVEL)
    return buffer.getvalue()
