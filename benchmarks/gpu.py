"""Benchmark: Kiln's loading plans on one GPU under memory caps of 8, 12, 16 and 24 GiB, against the loop a user
would otherwise write: (a) a plain diffusers loop with everything on the GPU, (b) the same with
`enable_model_cpu_offload`. All three render the same distinct catalog prompts, one image per pipeline call, at
1024x1024 and 4 steps; Kiln encodes the prompts of 4 jobs in hand in one encoder stage, as `kiln render
--batch-size 4` does when only one image fits per call.

    python -m benchmarks.gpu --out DIR           full-size klein-4b and klein-9b (random weights built from the
                                                 published configs into --work, about 51 GB of disk), on CUDA
    python -m benchmarks.gpu --small --out DIR   the tiny model with klein's memory profiles, on any device

A cap is Kiln's `--vram`: the process is limited to the cap less the 0.5 GiB reserve, and the baselines get the
same limit. Writes DIR/gpu.json (one record per model and cap) and DIR/gpu.md after every record, so a run cut
short still leaves what it measured. Also reports, per model, the relative error of the fp8 plan's latents
against the bf16 plan's for one fixed prompt and seed (random weights: a check of the arithmetic, not of looks).

Then, on the whole card, throughput: Kiln's worker path (LocalRenderer: the plan for the full card, jobs of one
shape handed over in batches of 1, 4 and 8, PNGs encoded and stored on the writer thread while the next batch
renders) against the plain loop (everything on the GPU, one call per image, each PNG saved before the next call),
in images per second, with the loop's own PNG saving in its time as a user's loop has it. Goal: Kiln >= 1.3x the
loop; klein-4b within 2x of the physical floor in ../shared/KLEIN.md (H100 only). Written as "throughput" in
gpu.json and as a second table in gpu.md.

Last, the speed-ups, for the first model only (time): each exact attention kernel's time for one attention call of
the model's shape on this card (what KILN_ATTENTION=auto measures and picks from), and regional torch.compile:
the model loaded once as Kiln's plan says, rendering eagerly, then with its transformer blocks compiled in place,
one image a call, giving the first call's seconds (the compile's warm-up), seconds per image after it, and the
images after which the compile has paid for itself. Written as
"speedups" in gpu.json and a third table in gpu.md. `--sections` runs a subset (e.g. only `speedups`).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks.klein import MODELS, write_folder
from schemas.errors import first_line
from schemas.job import JobSpec
from schemas.models import ModelSpec, resolve_model
from schemas.plan import Card, Shape, plan_for
from schemas.settings import KilnSettings
from worker.device import GIB, cap_memory, free_cached, local_card
from worker.pipeline import compute_dtype, load_model, quiet_libraries, weights_folder
from worker.prompts import PromptCache
from worker.render import LocalRenderer
from worker.speedups import (
    AUTO_CANDIDATES,
    TRIAL_CALLS,
    attention_tokens,
    compile_reason,
    time_attention,
)
from worker.storage import LocalStorage

SECTIONS = ("caps", "throughput", "speedups")
CAPS = (8, 12, 16, 24)
BATCHES = (1, 4, 8)
FLOOR_H100 = {"klein-4b": 0.19, "klein-9b": 0.40}  # seconds per 1024x1024 4-step image, ../shared/KLEIN.md
JOBS_IN_HAND = 4
PRODUCTS = ("leather weekender bag", "ceramic pour-over kettle", "walnut desk organizer", "linen throw pillow",
            "steel chef's knife", "wool beanie in rust", "glass terrarium", "canvas sneakers", "brass table lamp",
            "bamboo cutting board", "silk scarf with print", "enamel camping mug")
QUALITY = ("studio photo of a red ceramic teapot on white, soft shadow", 20261127)


def prompts(n: int, offset: int = 0) -> list[str]:
    """n distinct catalog prompts: a catalog rarely repeats one, so no plan gets the cache for free."""
    return [f"Studio product photo of a {PRODUCTS[(offset + i) % len(PRODUCTS)]}, item {offset + i}, on seamless "
            "white, soft light" for i in range(n)]


class Meter:
    """Wall time and peak memory of one run on one device, from a clean allocator."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self, card: Card) -> None:
        """Free what earlier runs left, cap the process at `card`, and zero the peaks."""
        gc.collect()
        free_cached(self.device)
        cap_memory(self.device, card)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def sync(self) -> float:
        """Wait for the device; the time now."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def peaks(self) -> dict[str, float | None]:
        """Peak allocated and reserved GiB since reset (None off CUDA: there is no separate pool to measure)."""
        if self.device.type != "cuda":
            return {"peak_allocated_gib": None, "peak_reserved_gib": None}
        return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(self.device) / GIB, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(self.device) / GIB, 2)}


@contextmanager
def transformer_watch(on_forward: Callable[[], None]) -> Iterator[None]:
    """Call `on_forward` before every forward of any Flux2 transformer."""
    from diffusers import Flux2Transformer2DModel

    def hook(module: Any, _args: Any) -> None:
        if isinstance(module, Flux2Transformer2DModel):
            on_forward()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_kiln(spec: ModelSpec, cache_dir: Path, card: Card, meter: Meter, n: int, size: int,
             steps: int) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Kiln's worker path: load as the plan says, encode the jobs in hand in one stage, one image per call."""
    plan = plan_for(spec.profile, card, Shape.of(size, size))
    assert plan is not None
    meter.reset(card)
    encoder_on_card: set[bool] = set()
    failure = None
    model = None
    try:
        started = meter.sync()
        # compiled or not, memory is the point here; the compile's own figures are the speed-ups section's
        model = load_model(spec, cache_dir, plan, meter.device, PromptCache(512 * 2**20), compile="off")
        loaded = meter.sync()
        call: dict[str, Any] = dict(width=size, height=size, steps=steps, guidance=1.0)
        model.generate(prompts(1, offset=1000), seeds=[0], **call)  # warm-up: kernels, allocator, first stage
        with transformer_watch(lambda: encoder_on_card.add(model.encoder.on_device)):
            begin = meter.sync()
            for i in range(0, n, JOBS_IN_HAND):
                hand = prompts(min(JOBS_IN_HAND, n - i), offset=i)
                embeddings = model.encode(hand)
                for j, prompt in enumerate(hand):
                    model.generate([prompt], seeds=[i + j], embeddings=embeddings, **call)
            end = meter.sync()
        latents = model.generate([QUALITY[0]], seeds=[QUALITY[1]], output_type="latent", **call).float().cpu()
        figures = {"seconds_per_image": round((end - begin) / n, 3), "load_seconds": round(loaded - started, 1),
                   **meter.peaks(), "encoder_on_card_while_denoising": sorted(encoder_on_card) == [True],
                   "error": None}
    except torch.OutOfMemoryError:
        failure = "out of memory"
    except Exception as exc:  # one broken run must not cost the rest of the benchmark
        failure = f"{type(exc).__name__}: {first_line(exc)}"
    finally:
        if model is not None:
            model.unload()
    if failure:  # out of the except block: the failed call's tensors are gone
        return {**meter.peaks(), "seconds_per_image": None, "error": failure}, None
    return figures, latents


def run_baseline(pipe: Any, card: Card, meter: Meter, offload: bool, n: int, size: int,
                 steps: int) -> dict[str, Any]:
    """The loop a user writes: the pipeline (loaded once, on the CPU) all on the GPU or under model offload,
    one call per image. The pipeline goes back to the CPU afterwards."""
    if offload and meter.device.type != "cuda":
        return {"seconds_per_image": None, "error": "model offload needs a GPU"}
    meter.reset(card)
    failure = None
    try:
        started = meter.sync()
        if offload:
            pipe.enable_model_cpu_offload(device=meter.device)
        else:
            pipe.to(meter.device)
        moved = meter.sync()

        def one(prompt: str, seed: int) -> None:
            pipe(prompt=prompt, width=size, height=size, num_inference_steps=steps, guidance_scale=1.0,
                 generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np")

        one(prompts(1, offset=1000)[0], 0)  # warm-up
        begin = meter.sync()
        for i, prompt in enumerate(prompts(n)):
            one(prompt, i)
        end = meter.sync()
        figures = {"seconds_per_image": round((end - begin) / n, 3), "load_seconds": round(moved - started, 1),
                   **meter.peaks(), "error": None}
    except torch.OutOfMemoryError:
        failure = "out of memory"
    except Exception as exc:
        failure = f"{type(exc).__name__}: {first_line(exc)}"
    peaks = meter.peaks()
    pipe.remove_all_hooks()
    pipe.to("cpu")
    if failure:
        return {**peaks, "seconds_per_image": None, "error": failure}
    return figures


def job(spec: ModelSpec, i: int, prompt: str, size: int, steps: int) -> JobSpec:
    """A job as a worker gets it, one per catalog prompt."""
    return JobSpec.of(job_id=f"bench-{i}", attempt=1, batch_id="bench", manifest="bench.csv", manifest_row=i + 1,
                   row_id=str(i), model=spec.name, prompt=prompt, width=size, height=size, steps=steps,
                   guidance=1.0, seed=i, output_key=f"bench/{i}.png")


def run_throughput(spec: ModelSpec, work: Path, pipe: Any, device: torch.device, n: int, size: int,
                   steps: int, compile: str = "auto") -> dict[str, Any]:
    """Images per second on the whole card: the plain loop, then Kiln's worker path in batches of 1, 4 and 8."""
    from PIL import Image

    card = local_card(device, None)
    figures: dict[str, Any] = {"model": spec.name.split(":")[-1], "card_gib": round(card.gib, 1)}
    plan = plan_for(spec.profile, card, Shape.of(size, size))
    figures["strategy"] = plan.describe() if plan else None
    n = max(n, max(BATCHES))
    with tempfile.TemporaryDirectory() as out_name:
        out = Path(out_name)
        meter = Meter(device)
        meter.reset(card)
        try:
            pipe.to(device)

            def one(prompt: str, seed: int, path: Path) -> None:
                image = pipe(prompt=prompt, width=size, height=size, num_inference_steps=steps, guidance_scale=1.0,
                             generator=[torch.Generator("cpu").manual_seed(seed)]).images[0]
                image.save(path)  # Pillow's PNG defaults, as a user's loop saves

            one(prompts(1, offset=1000)[0], 0, out / "warm.png")
            begin = meter.sync()
            for i, prompt in enumerate(prompts(n)):
                one(prompt, i, out / f"loop-{i}.png")
            figures["loop_images_per_second"] = round(n / (meter.sync() - begin), 3)
            assert Image.open(out / f"loop-{n - 1}.png").size == (size, size)
        except torch.OutOfMemoryError:
            figures["loop_images_per_second"] = None
        pipe.to("cpu")
        if plan is None:
            return figures
        meter.reset(card)
        renderer = LocalRenderer(KilnSettings(cache_dir=work, device=device.type, compile=compile), "bench",
                                 LocalStorage(out), card=card)
        try:
            for i in range(2 * TRIAL_CALLS + 2):  # load, warm up, and let KILN_COMPILE=auto's trial decide, untimed
                renderer.render([job(spec, 10**6 + i, prompts(1, offset=1000 + i)[0], size, steps)])
            figures["kiln_strategy"] = renderer.loaded_plan
            for batch in BATCHES:
                jobs = [job(spec, 1000 * batch + i, prompt, size, steps) for i, prompt in enumerate(prompts(n))]
                if batch > 1:  # a compiled transformer builds its kernels for a new batch size once, untimed
                    renderer.render([job(spec, 10**7 + batch + i, prompts(1, offset=2000 + i)[0], size, steps)
                                     for i in range(batch)])
                begin = meter.sync()
                futures = [renderer.start(jobs[i:i + batch]) for i in range(0, n, batch)]
                results = [r for future in futures for r in future.result()]
                seconds = meter.sync() - begin
                failed = [r.error for r in results if not r.ok]
                figures[f"kiln_batch{batch}_images_per_second"] = None if failed else round(n / seconds, 3)
                if failed:
                    figures[f"kiln_batch{batch}_error"] = failed[0]
            figures |= meter.peaks()
        finally:
            renderer._unload()
    best = max((figures.get(f"kiln_batch{b}_images_per_second") or 0 for b in BATCHES), default=0)
    loop = figures.get("loop_images_per_second")
    figures["kiln_over_loop"] = round(best / loop, 2) if best and loop else None
    floor = FLOOR_H100.get(figures["model"])
    if best and floor and device.type == "cuda" and "H100" in torch.cuda.get_device_name(device):
        figures["kiln_over_floor"] = round((1 / best) / floor, 2)
    return figures


def run_speedups(spec: ModelSpec, work: Path, device: torch.device, n: int, size: int,
                 steps: int) -> dict[str, Any]:
    """The attention kernels' times at this model's shape, and the loaded model eager against compiled (Kiln's
    auto attention in both), one image a call with its own prompt."""
    from diffusers import Flux2Transformer2DModel

    figures: dict[str, Any] = {"model": spec.name.split(":")[-1]}
    config = Flux2Transformer2DModel.load_config(weights_folder(spec, work) / "transformer")
    tokens = attention_tokens(size, size)
    timings = time_attention(device, compute_dtype(spec), config["num_attention_heads"],
                             config["attention_head_dim"], tokens, AUTO_CANDIDATES)
    figures["attention_tokens"] = tokens
    figures["attention_ms"] = {name: round(seconds * 1e3, 3) for name, seconds in timings.items()}
    card = local_card(device, None)
    plan = plan_for(spec.profile, card, Shape.of(size, size))
    if plan is None:
        return figures | {"compile_off_error": "no plan fits this card", "compile_on_error": "no plan fits this card"}
    meter = Meter(device)
    meter.reset(card)
    model = None
    try:  # one load: eager first, then the same transformer compiled in place (loading is not the compile's)
        model = load_model(spec, work, plan, device, PromptCache(512 * 2**20), compile="off")
        call: dict[str, Any] = dict(width=size, height=size, steps=steps, guidance=1.0)
        for compile in ("off", "on"):
            if compile == "on":
                if compile_reason("on", device, plan):
                    figures["compile_on_error"] = f"not compiled: {compile_reason('on', device, plan)}"
                    break
                model.compile_transformer()
            begin = meter.sync()
            model.generate(prompts(1, offset=1000 + len(compile)), seeds=[0], **call)
            figures[f"compile_{compile}_first_call_seconds"] = round(meter.sync() - begin, 2)
            begin = meter.sync()
            for i, prompt in enumerate(prompts(n, offset=100 * len(compile))):
                model.generate([prompt], seeds=[i], **call)
            figures[f"compile_{compile}_seconds_per_image"] = round((meter.sync() - begin) / n, 3)
            figures[f"compile_{compile}_plan"] = model.describe()
    except Exception as exc:  # out of memory, or a compile that failed outright: the figures say so, the run goes on
        figures["compile_error"] = f"{type(exc).__name__}: {first_line(exc)}"
    finally:
        if model is not None:
            model.unload()
    off, on = figures.get("compile_off_seconds_per_image"), figures.get("compile_on_seconds_per_image")
    if off and on:
        figures["compile_speedup"] = round(off / on, 3)
        warm_up = figures["compile_on_first_call_seconds"] - figures["compile_off_first_call_seconds"]
        figures["compile_pays_after_images"] = round(warm_up / (off - on)) if off > on else None
    return figures


def _compiled_cell(r: dict[str, Any], compile: str) -> str:
    spi = r.get(f"compile_{compile}_seconds_per_image")
    if spi is None:
        return r.get(f"compile_{compile}_error") or r.get("compile_error") or "-"
    return f"{r[f'compile_{compile}_first_call_seconds']:.1f} s, {spi:.3f} s"


def speedups_markdown(rows: list[dict[str, Any]]) -> str:
    """The speed-ups' records as a table."""
    lines = ["", "Speed-ups, one image a call (attention: one call at the model's shape, ms; lower is better):", "",
             "| model | attention kernels, ms | compile off: first call, s/image | compile on: first call, s/image "
             "| speed-up | pays after |", "|---|---|---|---|---|---|"]
    for r in rows:
        kernels = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["attention_ms"].items(), key=lambda kv: kv[1]))
        pays = r.get("compile_pays_after_images")
        lines.append(f"| {r['model']} | {kernels or '-'} | {_compiled_cell(r, 'off')} | {_compiled_cell(r, 'on')} | "
                     f"{r.get('compile_speedup') or '-'} | {'never' if pays is None else f'{pays} images'} |")
    return "\n".join(lines) + "\n"


def throughput_markdown(rows: list[dict[str, Any]]) -> str:
    """The throughput records as a table: images per second, higher is better."""
    def ips(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = ["", "Whole card, images per second (higher is better):", "",
             "| model | Kiln plan | plain loop | " + " | ".join(f"Kiln, batches of {b}" for b in BATCHES)
             + " | Kiln / loop | Kiln / floor |", "|---|---|---|" + "---|" * (len(BATCHES) + 2)]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('kiln_strategy') or r['strategy'] or 'no plan fits'} | "
                     f"{ips(r.get('loop_images_per_second'))} | "
                     + " | ".join(ips(r.get(f"kiln_batch{b}_images_per_second")) for b in BATCHES)
                     + f" | {r.get('kiln_over_loop') or '-'} | {r.get('kiln_over_floor') or '-'} |")
    return "\n".join(lines) + "\n"


def markdown(records: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The records as a README-ready table."""
    def cell(r: dict[str, Any], prefix: str) -> str:
        spi = r.get(f"{prefix}seconds_per_image")
        if spi is None:
            return r.get(f"{prefix}error") or "-"
        peak = r.get(f"{prefix}peak_reserved_gib")
        return f"{spi:.2f} s" + (f" ({peak:.1f} GiB)" if peak is not None else "")

    lines = [f"{header['device']}, {header['size']}x{header['size']}, {header['steps']} steps, {header['images']} "
             f"images per run, torch {header['torch']}, diffusers {header['diffusers']}, {header['date']}",
             f"`{header['command']}`"]
    if not records:  # the caps were not measured in this run
        return "\n".join(lines) + "\n"
    lines += ["", "| model | cap | Kiln plan | Kiln s/image (peak reserved) | plain loop | model offload "
             "| fp8 latent error |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        error = r.get("fp8_latent_rel_error")
        lines.append(f"| {r['model']} | {r['cap_gib']} GiB | {r['strategy'] or 'no plan fits'} | {cell(r, '')} | "
                     f"{cell(r, 'plain_')} | {cell(r, 'offload_')} | {'' if error is None else f'{error:.4f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where gpu.json and gpu.md go")
    parser.add_argument("--small", action="store_true", help="tiny weights with klein's memory profiles")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--caps", nargs="+", type=int, default=list(CAPS))
    parser.add_argument("--images", type=int, help="timed images per run [8 full size, 2 small]")
    parser.add_argument("--size", type=int, help="image side [1024 full size, 512 small]")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kiln-gpu"), help="model folders and caches")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="what to measure [all]: the memory caps, whole-card throughput, the speed-ups")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="KILN_COMPILE for the throughput section's Kiln path [auto]")
    args = parser.parse_args(argv)
    images = args.images or (2 if args.small else 8)
    size = args.size or (512 if args.small else 1024)
    quiet_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.small and device.type != "cuda":
        parser.error("full size needs a CUDA GPU; use --small on this machine")
    meter = Meter(device)
    fp8_math = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    import diffusers

    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "diffusers": diffusers.__version__, "size": size, "steps": args.steps,
              "images": images, "date": datetime.now(UTC).strftime("%Y-%m-%d"),
              "command": "python -m benchmarks.gpu" + (" --small" if args.small else "") + " --out DIR"}
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    speed: list[dict[str, Any]] = []
    speedups: list[dict[str, Any]] = []

    def write() -> str:
        table = (markdown(records, header) + (throughput_markdown(speed) if speed else "")
                 + (speedups_markdown(speedups) if speedups else ""))
        (args.out / "gpu.json").write_text(json.dumps({"header": header, "records": records, "throughput": speed,
                                                       "speedups": speedups}, indent=2))
        (args.out / "gpu.md").write_text(table)
        return table

    baselines = bool({"caps", "throughput"} & set(args.sections))  # the loops a user writes, to compare with
    for name in args.models if baselines else args.models[:1]:  # the speed-ups measure the first model only
        if args.small:
            spec = resolve_model(f"tiny:{name}")
            folder = weights_folder(spec, args.work)
        else:
            folder = write_folder(name, args.work / name, device)
            spec = resolve_model(str(folder))
        from diffusers import Flux2KleinPipeline

        baseline = Flux2KleinPipeline.from_pretrained(folder, dtype=compute_dtype(spec)) if baselines else None
        if baseline is not None:
            baseline.set_progress_bar_config(disable=True)
        latents: dict[str, torch.Tensor] = {}
        for cap in args.caps if "caps" in args.sections else ():
            card = Card(device.type if device.type == "cuda" else "cpu", float(cap), fp8_math)  # type: ignore[arg-type]
            plan = plan_for(spec.profile, card, Shape.of(size, size))
            record: dict[str, Any] = {"model": name, "cap_gib": cap, "device": header["device"],
                                      "strategy": plan.describe() if plan else None,
                                      "plan_need_gib": round(plan.need_gib, 2) if plan else None}
            if plan:
                figures, latent = run_kiln(spec, args.work, card, meter, images, size, args.steps)
                record |= figures
                if latent is not None:
                    latents.setdefault("fp8" if plan.strategy.fp8 else "bf16", latent)
            for prefix, offload in (("plain_", False), ("offload_", True)):
                figures = run_baseline(baseline, card, meter, offload, images, size, args.steps)
                record |= {prefix + k: v for k, v in figures.items()}
            records.append(record)
            print(json.dumps(record), flush=True)
            if "fp8" in latents and "bf16" in latents:
                error = float((latents["fp8"] - latents["bf16"]).norm() / latents["bf16"].norm())
                for r in records:
                    if r["model"] == name and (r["strategy"] or "").startswith("fp8"):
                        r["fp8_latent_rel_error"] = round(error, 5)
            write()
        if "throughput" in args.sections:
            speed.append(run_throughput(spec, args.work, baseline, device, images, size, args.steps, args.compile))
            print(json.dumps(speed[-1]), flush=True)
            write()
        baseline = None  # its memory, before the speed-ups load the model again
        if "speedups" in args.sections and not speedups:  # the first model only: a compile costs minutes
            speedups.append(run_speedups(spec, args.work, device, images, size, args.steps))
            print(json.dumps(speedups[-1]), flush=True)
            write()
        if not args.small:
            shutil.rmtree(folder, ignore_errors=True)  # the next model needs the disk
    print(write())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
