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
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks.klein import MODELS, write_folder
from schemas.models import ModelSpec, resolve_model
from schemas.plan import Card, Shape, plan_for
from worker.device import GIB, cap_memory, free_cached
from worker.pipeline import compute_dtype, load_model, quiet_libraries, weights_folder
from worker.prompts import PromptCache
from worker.render import first_line

CAPS = (8, 12, 16, 24)
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
        model = load_model(spec, cache_dir, plan, meter.device, PromptCache(512 * 2**20))
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
             f"`{header['command']}`", "",
             "| model | cap | Kiln plan | Kiln s/image (peak reserved) | plain loop | model offload "
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
    for name in args.models:
        if args.small:
            spec = resolve_model(f"tiny:{name}")
            folder = weights_folder(spec, args.work)
        else:
            folder = write_folder(name, args.work / name, device)
            spec = resolve_model(str(folder))
        from diffusers import Flux2KleinPipeline

        baseline = Flux2KleinPipeline.from_pretrained(folder, dtype=compute_dtype(spec))
        baseline.set_progress_bar_config(disable=True)
        latents: dict[str, torch.Tensor] = {}
        for cap in args.caps:
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
            (args.out / "gpu.json").write_text(json.dumps({"header": header, "records": records}, indent=2))
            (args.out / "gpu.md").write_text(markdown(records, header))
        del baseline
        if not args.small:
            shutil.rmtree(folder, ignore_errors=True)  # the next model needs the disk
    print(markdown(records, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
