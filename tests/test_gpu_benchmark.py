"""The GPU benchmark's own command line at small configs, on this machine's CPU, so it cannot rot between the
sessions that have a GPU: every model and cap gets a record, with the plan Kiln chose and measured figures, and
every model its whole-card throughput against the plain loop, and the first model its speed-ups (attention kernels
timed, compiled against eager)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.klein import MODELS

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_at_small_configs_and_writes_its_figures(tmp_path: Path, cache_dir: Path) -> None:
    caps = ("8", "12", "24")
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--small", "--out", str(tmp_path / "out"),
                          "--work", str(cache_dir), "--caps", *caps, "--images", "2", "--size", "256"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "gpu.json").read_text())
    records = {(r["model"], r["cap_gib"]): r for r in data["records"]}
    assert set(records) == {(m, int(c)) for m in MODELS for c in caps}
    for record in records.values():
        assert record["plain_seconds_per_image"] > 0 and record["plain_error"] is None
        assert record["offload_error"] == "model offload needs a GPU"  # on this machine
        assert (record["strategy"] is None) == ("seconds_per_image" not in record)
    fp8 = records[("klein-4b", 8)]
    assert fp8["strategy"].startswith("fp8-staged") and fp8["error"] is None and fp8["seconds_per_image"] > 0
    assert fp8["encoder_on_card_while_denoising"] is False
    assert 0 < fp8["fp8_latent_rel_error"] < 0.05  # measured against the bf16 plan's latents, same seed
    assert records[("klein-4b", 24)]["strategy"] == "bf16-resident"
    assert records[("klein-4b", 24)]["encoder_on_card_while_denoising"] is True
    assert records[("klein-9b", 8)]["strategy"] is None  # 9B has no plan on an 8 GB card
    assert records[("klein-9b", 24)]["strategy"].startswith("bf16-staged")
    table = (tmp_path / "out" / "gpu.md").read_text()
    assert "| klein-9b | 8 GiB | no plan fits |" in table and "python -m benchmarks.gpu --small" in table
    speed = {r["model"]: r for r in data["throughput"]}  # the whole card: Kiln's worker path against the loop
    assert set(speed) == set(MODELS)
    for r in speed.values():
        assert r["loop_images_per_second"] > 0 and r["kiln_over_loop"] > 0
        assert all(r[f"kiln_batch{b}_images_per_second"] > 0 for b in (1, 4, 8)), r
    assert "Kiln, batches of 8" in table
    [speedups] = data["speedups"]  # the first model's: kernels timed at its attention shape, compile off and on
    assert speedups["model"] == MODELS[0] and speedups["attention_tokens"] == 512 + 256
    assert "native" in speedups["attention_ms"] and "_native_cudnn" not in speedups["attention_ms"]  # no CPU cuDNN
    assert speedups["compile_off_plan"] == "bf16-resident" and speedups["compile_on_plan"] == "bf16-resident; compiled"
    for compile in ("off", "on"):
        assert speedups[f"compile_{compile}_seconds_per_image"] > 0 and f"compile_{compile}_error" not in speedups
    assert "compile_error" not in speedups
    assert speedups["compile_on_first_call_seconds"] > speedups["compile_off_first_call_seconds"]  # the warm-up
    assert speedups["compile_speedup"] > 0 and "| speed-up | pays after |" in table
