"""Benchmark: how fast the real Flux2KleinPipeline renders with the tiny model on this machine.

Prints load time and seconds per image at 512x512 and 1024x1024, batch 1 and 4, through Kiln's own renderer
(PNG encoding and the local-folder write included). Run: .venv/bin/python benchmarks/tiny_render.py
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time

from schemas.job import JobSpec
from schemas.settings import load_settings
from worker.render import LocalRenderer


def jobs(size: int, n: int, round_: int) -> list[JobSpec]:
    return [JobSpec.of(job_id=f"{size}-{round_}-{i}", attempt=1, batch_id="bench", manifest="bench", manifest_row=i,
                    row_id=str(i), model="tiny", prompt=f"studio photo of product {i}", width=size, height=size,
                    steps=4, guidance=1.0, seed=i, output_key=f"bench/{size}-{round_}-{i}.png") for i in range(n)]


def main() -> None:
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as cache:
        renderer = LocalRenderer(load_settings(storage_url=out, cache_dir=cache), "bench")
        started = time.perf_counter()
        renderer.load(jobs(512, 1, -2))  # build into an empty cache, then load with from_pretrained
        print(f"device {renderer.device_name}; tiny build + load {time.perf_counter() - started:.2f} s")
        for size in (512, 1024):
            for batch in (1, 4):
                renderer.render(jobs(size, batch, -1))  # warm-up
                per_image = []
                for r in range(5):
                    t = time.perf_counter()
                    results = renderer.render(jobs(size, batch, r))
                    assert all(x.ok for x in results)
                    per_image.append((time.perf_counter() - t) / batch)
                print(f"{size}x{size} batch {batch}: median {statistics.median(per_image):.3f} s/image "
                      f"(min {min(per_image):.3f}, 5 runs)")
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
