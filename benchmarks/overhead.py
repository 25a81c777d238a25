"""Benchmark: what Kiln costs over the loop a user would otherwise write, on this machine (no GPU: the tiny model
at real geometry). Three ways to render the same N jobs at 512x512, in rounds, alternating:

  loop   a plain diffusers loop: load Flux2KleinPipeline once, render each job with its own seed, save a PNG
  render `kiln render MANIFEST --model tiny` (SQLite, a local folder)
  fleet  `kiln submit` to a fleet: `kiln dispatcher` (already running), one `kiln worker`, a private Redis,
         PostgreSQL and moto's S3 server on loopback (no fault proxy between); timed from starting the worker
         process (as the loop's process starts) and running `kiln submit` beside it, to the last image recorded

Each is a process of its own, timed whole (start, load, render, write). Prints wall seconds, the ratio to the
loop (goals: render <= 1.05x, fleet <= 1.15x) and milliseconds of overhead per job, and for the fleet where its
time goes (time inside the worker per image, from the database, against the wall).

    .venv/bin/python -m benchmarks.overhead --jobs 200 --rounds 2
    .venv/bin/python -m benchmarks.overhead --jobs 200 --rounds 2 --batch-size 4   # Kiln batching, the loop not

Needs PostgreSQL (KILN_TEST_POSTGRES_URL, as the tests) and redis-server for the fleet; --no-fleet skips it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.cpu import cpu_by_process

SIZE = 512


def manifest(folder: Path, jobs: int) -> Path:
    path = folder / "bench.csv"
    path.write_text("id,prompt,width,height,seed\n" + "".join(
        f"p{i},studio photo of product {i} on a white table,{SIZE},{SIZE},{1000 + i}\n" for i in range(jobs)))
    return path


def loop(manifest_path: str, out: str, cache: str) -> None:
    """The baseline, as a user writes it (run in a process of its own: `--loop MANIFEST OUT CACHE`)."""
    import csv

    import torch
    from diffusers import Flux2KleinPipeline

    from schemas.models import resolve_model
    from worker.tiny import ensure_tiny

    spec = resolve_model("tiny")
    pipe = Flux2KleinPipeline.from_pretrained(str(ensure_tiny(Path(cache))), dtype=torch.float32)  # as Kiln on a CPU
    pipe.set_progress_bar_config(disable=True)
    with open(manifest_path, newline="") as fh:
        for row in csv.DictReader(fh):
            image = pipe(prompt=row["prompt"], width=int(row["width"]), height=int(row["height"]),
                         num_inference_steps=spec.default_steps, guidance_scale=spec.default_guidance,
                         generator=torch.Generator("cpu").manual_seed(int(row["seed"]))).images[0]
            image.save(Path(out) / f"{row['id']}.png")


def timed(args: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(args, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-fleet", action="store_true", help="only the loop and kiln render")
    parser.add_argument("--fleet-only", action="store_true", help="only the fleet (no ratio to the loop)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="KILN_BATCH_SIZE for kiln render and the fleet's dispatcher (the loop renders one by one)")
    parser.add_argument("--loop", nargs=3, metavar=("MANIFEST", "OUT", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        loop(*args.loop)
        return
    kiln = str(Path(sys.executable).with_name("kiln"))
    times: dict[str, list[float]] = {"loop": [], "render": [], "fleet": []}
    fleet_inside: list[float] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = tmp / "cache"
        from worker.tiny import ensure_tiny

        ensure_tiny(cache)
        # PYTHONDONTWRITEBYTECODE (set on some CI machines) makes every process compile again the modules pip left
        # uncompiled: a user's Python caches them, so both sides run with caches here
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_") and k != "PYTHONDONTWRITEBYTECODE"}
        env |= {"KILN_CACHE_DIR": str(cache), "KILN_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
        kiln_env = env | {"KILN_BATCH_SIZE": str(args.batch_size)}
        source = manifest(tmp, args.jobs)
        for r in range(args.rounds):
            work = tmp / f"round{r}"
            (work / "loop").mkdir(parents=True)
            if not args.fleet_only:
                times["loop"].append(timed([sys.executable, "-m", "benchmarks.overhead", "--loop", str(source),
                                            str(work / "loop"), str(cache)], env, Path.cwd()))
                times["render"].append(timed([kiln, "render", str(source), "--model", "tiny", "--json"], kiln_env,
                                             work))
            if not args.no_fleet:
                wall, inside = fleet_run(work, source, cache, args.batch_size)
                times["fleet"].append(wall)
                fleet_inside.append(inside)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items() if v), flush=True)
    if args.fleet_only:
        print(f"fleet: {statistics.median(times['fleet']):.1f} s, "
              f"{1000 * statistics.median(fleet_inside) / args.jobs:.0f} ms per job in the pipeline")
        return
    base = statistics.median(times["loop"])
    print(f"\n{args.jobs} jobs at {SIZE}x{SIZE}, tiny model, {os.cpu_count()} CPUs, median of {args.rounds} rounds, "
          f"KILN_BATCH_SIZE {args.batch_size}:")
    print(f"  loop    {base:7.1f} s  ({1000 * base / args.jobs:.0f} ms per job)")
    for name, goal in (("render", 1.05), ("fleet", 1.15)):
        if not times[name]:
            continue
        wall = statistics.median(times[name])
        print(f"  {name:7} {wall:7.1f} s  {wall / base:.2f}x the loop (goal <= {goal}x: "
              f"{'met' if wall / base <= goal else 'missed'}), {1000 * (wall - base) / args.jobs:+.0f} ms per job")
    if fleet_inside:
        inside = statistics.median(fleet_inside)
        wall = statistics.median(times["fleet"])
        print(f"  fleet: {1000 * inside / args.jobs:.0f} ms per job in the pipeline (the attempts' seconds), "
              f"{1000 * (wall - inside) / args.jobs:.0f} ms per job around it (load, encode, upload, queues, reports)")


def fleet_run(work: Path, source: Path, cache: Path, batch_size: int = 1) -> tuple[float, float]:
    """(wall seconds from the worker's start to the last image recorded, seconds its attempts spent in the
    pipeline)."""
    import sqlalchemy
    from sqlalchemy import func, select

    from schemas.settings import KilnSettings
    from schemas.tables import Attempt, Job
    from tests.conftest import POSTGRES_URL
    from tests.fleet_harness import running_fleet

    schema = f"kiln_bench_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        with running_fleet(work, f"{POSTGRES_URL}?options=-csearch_path%3D{schema}", cache) as fleet:
            # Straight to moto, past the tests' fault proxy (a Python process relaying every upload and check on
            # these same two cores, which no fleet has); the worker beats at its default pace, not the tests' 1 s.
            fleet.dispatcher(KILN_BATCH_SIZE=str(batch_size), KILN_S3_ENDPOINT_URL=str(fleet.s3.meta.endpoint_url))
            jobs = len(source.read_text().splitlines()) - 1
            before = cpu_by_process()
            started = time.perf_counter()  # the worker starts as the loop does: a new process, nothing loaded
            fleet.worker("w1", 16, models="tiny", KILN_HEARTBEAT_SECONDS=str(KilnSettings.model_fields[
                "heartbeat_seconds"].default))
            fleet.kiln("submit", str(source), "--model", "tiny")
            fleet.wait_until(lambda: fleet.count(Job.status == "succeeded") == jobs, 3600, "the batch to finish")
            wall = time.perf_counter() - started
            used = {name: seconds - before.get(name, 0.0) for name, seconds in cpu_by_process().items()}
            print("  CPU per job over the run: " + ", ".join(
                f"{name} {1000 * seconds / jobs:.1f} ms" for name, seconds in sorted(used.items(), key=lambda x: -x[1])
                if seconds > 0.05), flush=True)
            with fleet.engine.connect() as conn:
                inside = conn.scalar(select(func.sum(Attempt.seconds))) or 0.0
                first = conn.scalar(select(func.min(Attempt.started_at)))
                last = conn.scalar(select(func.max(Attempt.finished_at)))
            assert first is not None and last is not None, "the batch finished, so its attempts are recorded"
            print(f"  fleet run: {wall:.1f} s, of which {wall - (last - first).total_seconds():.1f} s before the first "
                  "job started (worker start, submit)", flush=True)
            return wall, float(inside)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
