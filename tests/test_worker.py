"""The worker's own rules: what it measures, and never the same shape on the same card after an OOM."""

from __future__ import annotations

from schemas.job import JobSpec
from worker.fleet import WorkerState, measure_vram_gb


def job(model: str, width: int, height: int) -> JobSpec:
    return JobSpec(job_id="j", attempt=1, batch_id="b", manifest="m", manifest_row=1, row_id="r", model=model,
                   prompt="p", width=width, height=height, steps=4, guidance=1.0, seed=1, output_key="k.png")


def test_after_an_oom_the_worker_refuses_that_model_at_that_size_and_larger() -> None:
    state = WorkerState("w", "cuda:RTX 3060", 12, ["kiln.render.vram12"])
    assert not state.too_big(job("klein-4b", 1024, 1024))
    state.ceilings["klein-4b"] = 1024 * 768 / 1e6  # what _render records after an OOM at 1024x1024
    assert state.too_big(job("klein-4b", 1024, 1024))
    assert state.too_big(job("klein-base-4b", 1024, 1024)) is False  # another profile: untouched
    assert not state.too_big(job("klein-4b", 768, 1024))


def test_the_worker_measures_its_device_without_touching_cuda() -> None:
    import sys

    device, gb = measure_vram_gb("auto")  # NVML where there is an NVIDIA driver, else system memory
    assert (device == "cpu" or device.startswith("cuda:")) and gb > 1
    assert "torch" not in sys.modules or not __import__("torch").cuda.is_initialized()
