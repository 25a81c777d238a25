"""Benchmark: PNG compression level, size against time, for a 1024x1024 render; then the web formats (WebP and
JPEG at Kiln's default quality) against Kiln's PNG, encoded as the worker encodes them (worker.encode, metadata
included). Encoding runs between two renders on the worker's writer thread, so every 100 ms it costs is CPU the
next render may want (a klein-4b image takes about 1 s on an RTX 4090). Two images: a studio-like shot (a soft
backdrop, a shaded object, a little sensor-like grain, as product renders look) and pure noise (the tiny model's
output: the worst case for every encoder).

    .venv/bin/python -m benchmarks.png
"""

from __future__ import annotations

import io
import statistics
import time

import numpy as np
from PIL import Image

from schemas.job import JobSpec
from schemas.params import DEFAULT_QUALITY
from worker.encode import encode

SIZE = 1024


def studio(rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    backdrop = 0.92 - 0.25 * y[..., None] * np.array([1.0, 0.97, 0.9])
    r = np.hypot(x - 0.5, (y - 0.55) * 1.3)
    shade = np.clip(1.2 - 2.2 * np.hypot(x - 0.42, y - 0.45), 0, 1)[..., None] * np.array([0.8, 0.25, 0.2])
    image = np.where((r < 0.28)[..., None], 0.15 + shade, backdrop)
    return np.clip(image + rng.normal(0, 0.012, image.shape), 0, 1)


def main() -> None:
    rng = np.random.default_rng(0)
    images = {"studio": studio(rng), "noise": rng.random((SIZE, SIZE, 3))}
    print(f"{SIZE}x{SIZE} RGB, median of 5 encodes")
    print("level  " + "  ".join(f"{name:>22}" for name in images))
    for level in (0, 1, 2, 3, 4, 6, 9):
        cells = []
        for pixels in images.values():
            image = Image.fromarray((pixels * 255).round().astype(np.uint8), mode="RGB")
            seconds = []
            for _ in range(5):
                buffer = io.BytesIO()
                started = time.perf_counter()
                image.save(buffer, format="PNG", compress_level=level)
                seconds.append(time.perf_counter() - started)
            cells.append(f"{statistics.median(seconds) * 1000:6.0f} ms {buffer.tell() / 1e6:6.2f} MB")
        print(f"{level:5}  " + "  ".join(f"{c:>22}" for c in cells))
    print(f"\nformat (worker.encode, quality {DEFAULT_QUALITY})  " + "  ".join(f"{name:>22}" for name in images))
    for image_format in ("png", "webp", "jpeg"):
        job = JobSpec.of(job_id="j", attempt=1, batch_id="b", manifest="m.csv", manifest_row=1, row_id="r",
                         output_key="k", model="klein-4b", prompt="studio photo of a red mug", width=SIZE,
                         height=SIZE, steps=4, guidance=1.0, seed=1, format=image_format,
                         quality=None if image_format == "png" else DEFAULT_QUALITY)
        cells = []
        for pixels in images.values():
            seconds = []
            for _ in range(5):
                started = time.perf_counter()
                data = encode(pixels, job, "bf16-resident")
                seconds.append(time.perf_counter() - started)
            cells.append(f"{statistics.median(seconds) * 1000:6.0f} ms {len(data) / 1e6:6.2f} MB")
        print(f"{image_format:30}  " + "  ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
