"""Each loading strategy, applied for real to the tiny model (with klein's memory profiles) on the CPU, checked
from outside: weight dtypes, which component runs while which other is loaded (global forward hooks), the
prompt cache, and a real torch.OutOfMemoryError raised inside the transformer or while loading."""

from __future__ import annotations

import gc
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen3Model

from schemas.job import JobSpec
from schemas.models import tiny_path
from schemas.plan import Card
from schemas.settings import load_settings
from worker.checkpoints import TEXT_ENCODER_OUT_LAYERS
from worker.placement import fp8_weights
from worker.render import LocalRenderer

EIGHT_GB_CPU = Card("cpu", 8.0)  # a CPU told to keep within 8 GB: klein-4b's plan is fp8-staged, encoder released


def job(n: int = 0, **changes: Any) -> JobSpec:
    base = dict(job_id=f"j{n}", attempt=1, batch_id="b", manifest="m.csv", manifest_row=n, row_id=str(n),
                model="tiny:klein-4b", prompt=f"product {n} on white", width=256, height=256, steps=4, guidance=1.0,
                seed=100 + n, output_key=f"s/{n}.png")
    return JobSpec.of(**{**base, **changes})


def renderer(cache_dir: Path, tmp_path: Path, card: Card | None = None) -> LocalRenderer:
    settings = load_settings(cache_dir=cache_dir, storage_url=str(tmp_path / "out"), device="cpu")
    return LocalRenderer(settings, "test:1", card=card)


class Forwards:
    """Every forward of the text encoder and the transformer, with what was loaded at that moment."""

    def __init__(self, r: LocalRenderer) -> None:
        self.renderer = r
        self.calls: list[tuple[str, bool, bool]] = []  # (which, encoder loaded, transformer loaded)
        self.encoders: list[weakref.ref[Any]] = []

    def __call__(self, module: Any, args: tuple[Any, ...]) -> None:
        if not isinstance(module, Qwen3Model | Flux2Transformer2DModel):
            return
        model = self.renderer._loaded
        assert model is not None
        which = "encoder" if isinstance(module, Qwen3Model) else "transformer"
        self.calls.append((which, model.encoder.on_device, model.transformer.on_device))
        if which == "encoder":
            self.encoders.append(weakref.ref(module))

    def count(self, which: str) -> int:
        return sum(1 for c in self.calls if c[0] == which)


@pytest.fixture
def forwards() -> Iterator[Any]:
    made: list[Forwards] = []

    def watch(r: LocalRenderer) -> Forwards:
        made.append(Forwards(r))
        return made[-1]

    def hook(module: Any, args: Any) -> None:
        for forwards in made:
            forwards(module, args)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    yield watch
    handle.remove()


def test_kilns_path_renders_what_the_plain_pipeline_renders(cache_dir: Path, tmp_path: Path) -> None:
    r = renderer(cache_dir, tmp_path)
    spec = job(model="tiny")
    kiln = r.load([spec]).generate([spec.params.prompt], width=256, height=256, steps=4, guidance=1.0,
                                   seeds=[spec.params.seed])
    plain = Flux2KleinPipeline.from_pretrained(tiny_path(cache_dir), dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    want = plain(prompt=spec.params.prompt, width=256, height=256, num_inference_steps=4, guidance_scale=1.0,
                 generator=[torch.Generator("cpu").manual_seed(spec.params.seed)],
                 text_encoder_out_layers=TEXT_ENCODER_OUT_LAYERS, output_type="np").images
    np.testing.assert_allclose(kiln, want, atol=1e-5)


def test_a_resident_plan_keeps_the_encoder_loaded_while_denoising(cache_dir: Path, tmp_path: Path,
                                                                   forwards: Any) -> None:
    r = renderer(cache_dir, tmp_path, Card("cpu", 32.0))
    seen = forwards(r)
    [result] = r.render([job()])
    assert result.ok and result.plan == "bf16-resident"
    assert ("transformer", True, True) in seen.calls


def test_a_staged_plan_never_has_encoder_and_transformer_loaded_at_once(cache_dir: Path, tmp_path: Path,
                                                                         forwards: Any) -> None:
    r = renderer(cache_dir, tmp_path, EIGHT_GB_CPU)
    seen = forwards(r)
    results = r.render([job(0), job(1)])
    assert all(x.ok for x in results), results
    assert results[0].plan == "fp8-staged (fp8 storage, bf16 compute, encoder released between stages)"
    assert seen.count("encoder") == 1  # both jobs' prompts in one encoder stage
    assert seen.count("transformer") == 4  # 4 steps, both images in one call: the plan fits two at once
    assert {c[1:] for c in seen.calls if c[0] == "encoder"} == {(True, False)}
    assert {c[1:] for c in seen.calls if c[0] == "transformer"} == {(False, True)}
    gc.collect()
    assert all(ref() is None for ref in seen.encoders)  # released, not just moved: its memory went back


def test_an_fp8_plan_stores_the_transformer_in_float8_close_to_full_precision(cache_dir: Path,
                                                                              tmp_path: Path) -> None:
    spec = job()
    full = renderer(cache_dir, tmp_path, Card("cpu", 32.0)).load([spec])
    fp8 = renderer(cache_dir, tmp_path, EIGHT_GB_CPU).load([spec])
    transformer = fp8.transformer.acquire()
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    linears = [m for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    # diffusers keeps the output projection and norms in compute precision
    assert fp8_weights(transformer) >= len(linears) and transformer.proj_out.weight.dtype == torch.float32
    kwargs: dict[str, Any] = dict(width=256, height=256, steps=4, guidance=1.0, seeds=[7], output_type="latent")
    a = full.generate([spec.params.prompt], **kwargs)
    b = fp8.generate([spec.params.prompt], **kwargs)
    error = float((a - b).norm() / a.norm())
    assert 0 < error < 0.05, error


def test_on_cards_with_fp8_math_the_transformer_is_quantized_by_torchao(cache_dir: Path, tmp_path: Path) -> None:
    from torchao.quantization import Float8Tensor

    r = renderer(cache_dir, tmp_path, Card("cpu", 8.0, fp8_math=True))
    [result] = r.render([job()])
    assert result.ok, result.error
    assert result.plan == "fp8-staged (fp8 torchao, encoder released between stages)"
    transformer = r.load([job()]).transformer.acquire()
    assert isinstance(transformer.transformer_blocks[0].attn.to_q.weight, Float8Tensor)
    assert fp8_weights(transformer) > 0


def test_repeated_prompts_skip_the_encoder_and_keep_the_transformer(cache_dir: Path, tmp_path: Path,
                                                                   forwards: Any) -> None:
    r = renderer(cache_dir, tmp_path, EIGHT_GB_CPU)
    seen = forwards(r)
    r.render([job(0)])
    transformer = r._loaded.transformer.module  # type: ignore[union-attr]
    r.render([job(1, prompt=job(0).params.prompt, seed=5)])  # another seed of the same product
    assert seen.count("encoder") == 1 and r.prompts.hits >= 1
    assert r._loaded.transformer.module is transformer  # type: ignore[union-attr]  # no stage change, no reload


def test_out_of_memory_in_the_transformer_frees_the_call_and_lowers_the_ceiling(cache_dir: Path, tmp_path: Path,
                                                                               forwards: Any) -> None:
    r = renderer(cache_dir, tmp_path, EIGHT_GB_CPU)
    seen = forwards(r)
    big = job(0, width=512, height=512)
    plan, _ = r.plan([big])
    model = r.load([big])
    model.encode([big.params.prompt])  # cached: the render below goes straight to this transformer
    inputs: list[weakref.ref[torch.Tensor]] = []

    def no_room(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        inputs.append(weakref.ref(kwargs["hidden_states"]))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)")

    model.transformer.acquire().register_forward_pre_hook(no_room, with_kwargs=True)
    [result] = r.render([big])
    assert (result.ok, result.error_kind) == (False, "oom")
    assert "out of memory at 512x512 x1 on cpu while denoising" in (result.error or "")
    assert result.plan == plan.describe()
    gc.collect()
    assert len(inputs) == 1 and inputs[0]() is None  # no tensor of the failed call outlived it
    assert r._loaded is model and not model.encoder.on_device and not model.transformer.on_device  # as planned
    assert r.ceilings == {("klein-4b", "denoise"): plan.denoise_gib}
    before = seen.count("transformer")
    [again] = r.render([job(1, width=512, height=512)])  # the same shape: refused without trying
    assert again.error_kind == "oom" and "ran out of memory" in (again.error or "")
    assert seen.count("transformer") == before
    [smaller] = r.render([job(2, width=256, height=256)])  # a smaller plan is below the ceiling
    assert smaller.ok, smaller.error


def test_out_of_memory_while_loading_counts_as_out_of_memory(cache_dir: Path, tmp_path: Path) -> None:
    r = renderer(cache_dir, tmp_path, Card("cpu", 32.0))  # resident: everything loads before the first stage

    def no_room(module: Any, name: str, param: Any) -> None:
        if isinstance(module, torch.nn.Linear):
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test while loading)")

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(no_room)
    try:
        [result] = r.render([job(0, width=512, height=512)])
    finally:
        handle.remove()
    assert (result.ok, result.error_kind) == (False, "oom")
    assert "out of memory loading tiny:klein-4b" in (result.error or "")
    assert r._loaded is None  # nothing half-loaded is kept
    [smaller] = r.render([job(1, width=256, height=256)])
    assert smaller.ok, smaller.error


def test_a_component_that_fails_to_load_at_its_stage_is_the_workers_fault_with_the_reason(cache_dir: Path,
                                                                                          tmp_path: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_path(cache_dir), broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    r = renderer(cache_dir, tmp_path, EIGHT_GB_CPU)  # staged and released: the transformer loads after encoding
    [result] = r.render([job(model=str(broken))])
    assert (result.ok, result.error_kind) == (False, "worker")  # back to the queue uncharged, for another worker
    assert f"cannot load {broken} from {broken}" in (result.error or "")
    [again] = r.render([job(model=str(broken))])  # not loaded again here
    assert (again.error_kind, again.error) == ("worker", result.error) and r.unserved == {str(broken): result.error}


def test_a_job_no_plan_fits_is_refused_as_out_of_memory_so_the_fleet_moves_it_up(cache_dir: Path,
                                                                                 tmp_path: Path) -> None:
    [result] = renderer(cache_dir, tmp_path, EIGHT_GB_CPU).render([job(model="tiny:klein-9b")])
    assert (result.ok, result.error_kind) == (False, "oom")
    assert result.error == "tiny:klein-9b at 256x256 needs a 16 GB card; this one (cpu 8.0 GiB) has no plan for it"
