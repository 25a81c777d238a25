"""The speed-ups, applied for real to the tiny model on the CPU: regional torch.compile (inductor builds the
blocks' kernels, the image is eager's, the result says so; a compile that fails on a machine falls back to eager and
the job renders), and the attention kernel (a named one runs in every attention call of the transformer; auto's
timing leaves out kernels that cannot run here or that answer differently)."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from PIL import Image
from torch._dynamo.utils import counters

from dispatcher import runner, usecases
from schemas.errors import ConfigError
from schemas.job import JobSpec, RenderResult
from schemas.models import tiny_path
from schemas.plan import Card, Shape, plan_for
from schemas.settings import COMPILE_MIN_IMAGES, load_settings
from worker import pipeline
from worker.placement import Parked
from worker.render import LocalRenderer
from worker.speedups import (
    CompileTrial,
    check_attention,
    choose_attention,
    compile_reason,
    compiled_blocks,
    time_attention,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def job(n: int, **changes: Any) -> JobSpec:
    base = dict(job_id=f"j{n}", attempt=1, batch_id="b", manifest="m.csv", manifest_row=n, row_id=str(n),
                model="tiny", prompt=f"product {n} on white", width=256, height=256, steps=4, guidance=1.0,
                seed=100 + n, output_key=f"s/{n}.png")
    return JobSpec.of(**{**base, **changes})


def renderer(cache_dir: Path, out: Path, **settings: Any) -> LocalRenderer:
    return LocalRenderer(load_settings(cache_dir=cache_dir, storage_url=str(out), device="cpu", **settings), "test:1")


def pixels(result: RenderResult) -> np.ndarray:
    assert result.ok and result.uri, result.error
    with Image.open(result.uri.removeprefix("file://")) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def blocks(r: LocalRenderer) -> int:
    """How many repeated blocks the loaded transformer has (the modules regional compilation compiles)."""
    assert r._loaded is not None
    transformer = r._loaded.transformer.acquire()
    return sum(type(m).__name__ in transformer._repeated_blocks for m in transformer.modules())


def test_compile_on_builds_the_blocks_kernels_and_renders_eagers_image(cache_dir: Path, tmp_path: Path) -> None:
    [eager] = renderer(cache_dir, tmp_path / "eager", compile="off").render([job(0)])
    torch._dynamo.reset()
    counters.clear()
    compiled = renderer(cache_dir, tmp_path / "compiled", compile="on")
    [result] = compiled.render([job(0)])
    assert result.plan == "bf16-resident; compiled" and eager.plan == "bf16-resident"
    assert compiled._loaded is not None and compiled._loaded.compiled
    assert compiled_blocks(compiled._loaded.transformer.acquire()) == blocks(compiled) > 0
    assert counters["stats"]["unique_graphs"] >= 2  # a graph for each kind of block, shared by the blocks of a kind
    assert np.abs(pixels(result) - pixels(eager)).max() <= 2  # the same image, to rounding
    [second] = compiled.render([job(1)])  # the same shape: the kernels built are reused
    assert second.ok and second.plan == result.plan


def test_an_fp8_torchao_transformer_compiles_and_renders_eagers_image(cache_dir: Path, tmp_path: Path) -> None:
    card = Card("cpu", 8.0, fp8_math=True)  # an 8 GB card with fp8 math: klein-4b's plan stores torchao float8
    results = {}
    for compile in ("off", "on"):
        r = LocalRenderer(load_settings(cache_dir=cache_dir, storage_url=str(tmp_path / compile), device="cpu",
                                        compile=compile), "test:1", card=card)
        [results[compile]] = r.render([job(5, model="tiny:klein-4b")])
    assert results["on"].plan == f"{results['off'].plan}; compiled" and "fp8 torchao" in (results["on"].plan or "")
    assert np.abs(pixels(results["on"]) - pixels(results["off"])).max() <= 2


def test_a_staged_transformer_keeps_its_compiled_kernels_while_it_is_parked_between_jobs(
        cache_dir: Path, tmp_path: Path) -> None:
    # A 12 GB discrete card's plan for klein-4b: the transformer waits in host memory while the encoder runs
    card = Card("cuda", 12.0)
    eager = LocalRenderer(load_settings(cache_dir=cache_dir, storage_url=str(tmp_path / "eager"), device="cpu",
                                        compile="off"), "test:1", card=card)
    torch._dynamo.reset()
    counters.clear()
    compiled = LocalRenderer(load_settings(cache_dir=cache_dir, storage_url=str(tmp_path / "compiled"), device="cpu",
                                           compile="on"), "test:2", card=card)
    graphs = []
    for n in range(4):  # each job's new prompt parks the transformer for the encoder stage, then brings it back
        [a] = eager.render([job(n, model="tiny:klein-4b")])
        [b] = compiled.render([job(n, model="tiny:klein-4b")])
        assert b.plan == "bf16-staged (encoder staged); compiled" and a.plan == "bf16-staged (encoder staged)"
        assert np.abs(pixels(a) - pixels(b)).max() <= 2
        graphs.append(counters["stats"]["unique_graphs"])
    assert compiled._loaded is not None and isinstance(compiled._loaded.transformer, Parked)
    assert graphs[0] >= 2 and graphs == [graphs[0]] * 4  # traced once: parking changes no guard


def test_a_compile_that_fails_here_falls_back_to_eager_and_the_job_renders(
        cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def no_compiler(graph: Any, inputs: Any) -> Any:
        raise RuntimeError("no C compiler on this machine")

    # a real torch.compile failure: dynamo traces the block, then the backend that builds its kernels fails
    monkeypatch.setattr(pipeline, "compile_blocks",
                        lambda t: t.compile_repeated_blocks(fullgraph=True, backend=no_compiler))
    torch._dynamo.reset()
    r = renderer(cache_dir, tmp_path / "out", compile="on")
    with caplog.at_level(logging.WARNING, logger="kiln.worker"):
        [result] = r.render([job(2)])
    assert result.ok and result.plan == "bf16-resident", result.error
    assert r._loaded is not None and not r._loaded.compiled and compiled_blocks(r._loaded.transformer.acquire()) == 0
    assert "torch.compile failed on this machine (BackendCompilerFailed" in caplog.text
    assert "no C compiler on this machine" in caplog.text
    [eager] = renderer(cache_dir, tmp_path / "eager", compile="off").render([job(2)])
    assert np.array_equal(pixels(result), pixels(eager))


def test_a_compile_trial_times_eager_then_compiled_at_one_shape_and_keeps_the_faster() -> None:
    shape, other = (1024, 1024, 1, 4, 0), (768, 1024, 1, 4, 0)
    trial = CompileTrial()
    steps = [trial.record(shape, 1.0), trial.record(other, 0.1), trial.record(shape, 1.0), trial.record(shape, 1.1)]
    assert steps == [None, None, None, "compile"]  # a warm-up, another size (not counted), two timed eager calls
    assert [trial.record(shape, 30.0), trial.record(shape, 0.8), trial.record(shape, 0.97)] == [None, None, "keep"]
    assert str(trial) == "0.800 s an image compiled against 1.000 s eager"
    slow = CompileTrial()
    verdicts = [slow.record(shape, s) for s in (1.0, 1.0, 1.0, 30.0, 0.98, 0.99)]
    assert verdicts[-1] == "eager"  # 2% faster does not pay for compiling every new size again


class Scripted:
    """A clock whose every pipeline call (two readings) lasts the next of `durations` seconds."""

    def __init__(self, durations: list[float]) -> None:
        self.durations, self.now, self.reading = durations, 0.0, 0

    def __call__(self) -> float:
        if self.reading % 2:
            self.now += self.durations.pop(0)
        self.reading += 1
        return self.now


@pytest.mark.parametrize(("compiled_seconds", "kept"), [(0.5, True), (0.99, False)])
def test_kiln_compile_auto_keeps_the_compile_only_where_the_trial_finds_it_faster(
        compiled_seconds: float, kept: bool, cache_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "compile_reason", lambda setting, device, plan: None)  # as on a CUDA card
    r = renderer(cache_dir, tmp_path / "out", compile="auto")
    loaded = r.load([job(0)])
    loaded.clock = Scripted([1.0, 1.0, 1.0, 9.0, compiled_seconds, compiled_seconds])
    results = [x for n in range(6) for x in r.render([job(n)])]
    assert [x.plan for x in results] == ["bf16-resident"] * 3 + ["bf16-resident; compiled"] * 3  # eager, then tried
    assert loaded.compile_verdict is kept and r.compile_verdicts == {"tiny": kept}
    [after] = r.render([job(6)])
    assert after.plan == ("bf16-resident; compiled" if kept else "bf16-resident")
    assert loaded.trial is None and loaded.compiled is kept
    assert (compiled_blocks(loaded.transformer.acquire()) > 0) is kept
    r._unload()  # a reload here takes the verdict, with no trial again
    again = r.load([job(7)])
    assert again.trial is None and again.compiled is kept


def test_compile_is_left_out_where_it_cannot_work_or_would_not_pay() -> None:
    layerwise = plan_for("klein-4b", Card("cuda", 8.0, fp8_math=False), Shape.of(1024, 1024))
    torchao = plan_for("klein-4b", Card("cuda", 8.0, fp8_math=True), Shape.of(1024, 1024))
    resident = plan_for("klein-4b", Card("cuda", 24.0, fp8_math=True), Shape.of(1024, 1024))
    assert layerwise and layerwise.fp8 == "layerwise" and torchao and torchao.fp8 == "torchao" and resident
    assert "layerwise fp8" in (compile_reason("on", CUDA, layerwise) or "")  # hooks move weights inside forward
    assert compile_reason("on", CPU, resident) is None and compile_reason("on", CUDA, torchao) is None
    assert compile_reason("off", CUDA, resident) == "KILN_COMPILE=off"
    assert (compile_reason("auto", CPU, resident) or "").startswith("on cpu the warm-up does not pay")
    has_triton = importlib.util.find_spec("triton") is not None
    assert compile_reason("auto", CUDA, resident) == (None if has_triton else "Triton is not installed")


def test_kiln_render_compiles_under_auto_only_batches_big_enough_to_pay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def load_renderer(settings: Any, worker: str) -> Any:
        seen.append(settings.compile)
        raise ConfigError("stop here")

    monkeypatch.setattr(runner, "load_renderer", load_renderer)
    for rows in (COMPILE_MIN_IMAGES - 1, COMPILE_MIN_IMAGES):
        manifest = tmp_path / f"m{rows}.csv"
        manifest.write_text("id,prompt\n" + "".join(f"r{i},product {i}\n" for i in range(rows)))
        for setting in ("auto", "on"):
            with pytest.raises(ConfigError, match="stop here"):
                usecases.render_here(usecases.Request(manifest, model="tiny"),
                                     load_settings(storage_url=str(tmp_path / "out"), compile=setting),
                                     lambda: None)  # type: ignore[arg-type,return-value]
    assert seen == ["off", "on", "auto", "on"]


def test_a_named_attention_backend_runs_in_every_attention_call(
        cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    math = AttentionBackendName("_native_math")
    calls = []
    kernel = _AttentionBackendRegistry._backends[math]

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["query"].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, math, counted)
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    r = renderer(cache_dir, tmp_path / "out", attention="_native_math")
    [result] = r.render([job(3)])
    assert result.ok and result.plan == "bf16-resident; attention _native_math"
    assert r._loaded is not None
    transformer = r._loaded.transformer.acquire()
    processors = [m.processor for m in transformer.modules() if hasattr(m, "processor")]
    assert processors and all(p._attention_backend == math for p in processors)
    # every block's attention, every step: 256x256 is 256 image tokens after the 512 text tokens
    assert len(calls) == len(processors) * 4 and {s[1] for s in calls} == {512 + 256}


def test_auto_attention_times_the_kernels_that_run_here_and_match(monkeypatch: pytest.MonkeyPatch) -> None:
    candidates = ("native", "_native_math", "_native_cudnn", "flash")  # cuDNN has no CPU kernel; flash-attn absent
    timings = time_attention(CPU, torch.float32, heads=4, head_dim=64, tokens=600, candidates=candidates)
    assert set(timings) == {"native", "_native_math"} and all(t > 0 for t in timings.values())

    math = AttentionBackendName("_native_math")
    kernel = _AttentionBackendRegistry._backends[math]
    monkeypatch.setitem(_AttentionBackendRegistry._backends, math, lambda **kw: kernel(**kw) * 0.5)  # a wrong one
    assert set(time_attention(CPU, torch.float32, 4, 64, 600, candidates)) == {"native"}
    # off CUDA, auto leaves the choice to SDPA and measures nothing; a named backend is taken as named
    assert choose_attention("auto", None, CPU, torch.float32, 600) == (None, {})
    assert choose_attention("_native_math", None, CPU, torch.float32, 600) == ("_native_math", {})


def test_auto_attention_keeps_the_fastest_kernel_at_the_models_own_shape(
        cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel.from_pretrained(tiny_path(cache_dir) / "transformer")
    shapes = []
    kernel = _AttentionBackendRegistry._backends[AttentionBackendName("_native_flash")]

    def seen(**kw: Any) -> Any:
        shapes.append(tuple(kw["query"].shape))
        return kernel(**kw)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName("_native_flash"), seen)
    chosen, timings = choose_attention("auto", transformer, CPU, torch.float32, 700, measure=True)
    assert chosen == min(timings, key=timings.__getitem__) and "_native_flash" in timings
    config = transformer.config
    assert set(shapes) == {(1, 700, config.num_attention_heads, config.attention_head_dim)}


@pytest.mark.parametrize(("name", "says"), [
    ("fastest", "not one diffusers knows; use auto or one of _flash_3"),
    ("flash", "cannot run here: Flash Attention backend 'flash' is not usable because of missing package"),
])
def test_an_attention_backend_that_cannot_run_here_fails_before_any_work(
        name: str, says: str, cache_dir: Path, tmp_path: Path) -> None:
    if name == "flash" and importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match=f"attention backend '{name}' \\(KILN_ATTENTION, --attention\\)") as caught:
        renderer(cache_dir, tmp_path / "out", attention=name)
    assert says in str(caught.value)
    check_attention("auto")
    check_attention("_native_math")


def test_kiln_worker_and_kiln_render_refuse_a_misnamed_attention_backend_at_start(
        tmp_path: Path, kiln_env: dict[str, str]) -> None:
    kiln = str(Path(sys.executable).with_name("kiln"))
    (tmp_path / "m.csv").write_text("id,prompt\na,product\n")
    for args in (["worker", "--broker-url", "redis://127.0.0.1:1/0"], ["render", "m.csv", "--model", "tiny"]):
        run = subprocess.run([kiln, *args, "--attention", "fastest"], cwd=tmp_path, env=kiln_env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr
        assert "error: attention backend 'fastest' (KILN_ATTENTION, --attention): not one diffusers knows" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]  # nothing written: no database, no images
