"""LoRAs: a real tiny LoRA (made with peft on the tiny model's transformer) changes the image, comes off again
leaving the base weights exactly as they were, and a LoRA that is not one, or not for this model, is refused with
the reason: at validation where the file says so, at the job otherwise."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from dispatcher.expand import Options, expand
from dispatcher.reader import parse_manifest
from schemas.errors import ManifestError
from schemas.job import JobSpec
from schemas.params import Lora, RenderParams
from schemas.plan import Card
from schemas.settings import load_settings
from worker.render import LocalRenderer
from worker.tiny import build_tiny_pipeline


def make_lora(folder: Path, seed: int = 0, rank: int = 4) -> Path:
    """A LoRA for the tiny klein transformer, as a trainer would save it (diffusers' format, safetensors), with
    random (not zero) up-projections so that it changes the image."""
    torch.manual_seed(seed)
    transformer = build_tiny_pipeline().transformer
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"]),
                            adapter_name="house")
    state = {k: v * 3 for k, v in get_peft_model_state_dict(transformer, adapter_name="house").items()}
    Flux2KleinPipeline.save_lora_weights(folder, transformer_lora_layers=state)
    return folder / "pytorch_lora_weights.safetensors"


def job(n: int, loras: tuple[Lora, ...] = (), **changes: Any) -> JobSpec:
    fields: dict[str, Any] = dict(job_id=f"j{n}", attempt=1, batch_id="b", manifest="m.csv", manifest_row=n,
                                  row_id=str(n), model="tiny", prompt="a ceramic mug, studio light", width=256,
                                  height=256, steps=4, guidance=1.0, seed=7, output_key=f"l/{n}.png", loras=loras)
    return JobSpec.of(**{**fields, **changes})


def pixels(uri: str | None) -> np.ndarray:
    assert uri is not None
    return np.asarray(Image.open(uri.removeprefix("file://"))).astype(int)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(tmp_path_factory.mktemp("lora"))


@pytest.mark.parametrize(("model", "card", "plan", "compile"), [
    ("tiny", None, "bf16-resident", "off"), ("tiny:klein-4b", Card("cpu", 8.0), "fp8-staged", "off"),
    ("tiny", None, "bf16-resident; compiled", "on")])  # peft's layers inside compiled blocks: traced again
def test_a_lora_changes_the_image_and_comes_off_leaving_the_base_weights_exactly(
        cache_dir: Path, tmp_path: Path, lora_file: Path, model: str, card: Card | None, plan: str,
        compile: str) -> None:
    settings = load_settings(cache_dir=cache_dir, storage_url=str(tmp_path / "out"), device="cpu", compile=compile)
    r = LocalRenderer(settings, "test:1", card=card)
    house = Lora(path=str(lora_file), sha256="a" * 64, scale=1.0)
    results = [*r.render([job(0, model=model)]), *r.render([job(1, (house,), model=model)]),
               *r.render([job(2, (house.model_copy(update={"scale": 0.5}),), model=model)]),
               *r.render([job(3, model=model)])]
    assert all(x.ok for x in results), [x.error for x in results]
    assert all(x.plan == plan or (x.plan or "").startswith(plan + " (") for x in results), [x.plan for x in results]
    bare, styled, half, bare_again = (pixels(x.uri) for x in results)
    assert np.abs(styled - bare).mean() > 1, "the LoRA made no visible difference"
    assert np.abs(half - styled).mean() > 0.1 and np.abs(half - bare).mean() > 0.1  # the scale counts
    np.testing.assert_array_equal(bare_again, bare)  # unloaded: the image the base model makes, exactly
    loaded = r._loaded
    assert loaded is not None
    transformer = loaded.transformer.acquire()
    assert not any("lora" in name for name, _ in transformer.named_parameters())


def test_a_lora_for_another_model_fails_its_job_as_bad_input_and_the_next_job_renders(
        cache_dir: Path, tmp_path: Path, lora_file: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(lora_file)
    wrong = {k: torch.randn(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v for k, v in state.items()}
    save_file(wrong, tmp_path / "nine-b.safetensors")  # the shape a LoRA of a wider model has
    settings = load_settings(cache_dir=cache_dir, storage_url=str(tmp_path / "out"), device="cpu")
    r = LocalRenderer(settings, "test:1")
    [failed] = r.render([job(0, (Lora(path=str(tmp_path / "nine-b.safetensors"), sha256="b" * 64),))])
    assert (failed.ok, failed.error_kind) == (False, "bad_input")
    assert "the LoRA nine-b.safetensors does not fit tiny" in (failed.error or "")
    [fine] = r.render([job(1)])
    assert fine.ok, fine.error


def test_what_is_not_a_lora_is_refused_before_anything_starts(tmp_path: Path, lora_file: Path) -> None:
    (tmp_path / "house.safetensors").write_bytes(lora_file.read_bytes())
    save_file({"transformer.x_embedder.weight": torch.zeros(4, 4)}, tmp_path / "whole.safetensors")
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04pickle")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    opts = Options(batch="b", base_dir=tmp_path)

    def problem(cell: str) -> str:
        with pytest.raises(ManifestError) as caught:
            expand(parse_manifest(f"prompt,lora,lora_scale\nx,{cell}\n".encode(), "m.csv"), opts)
        return str(caught.value)

    assert "is not a .safetensors file (Kiln never loads pickled" in problem("old.ckpt")
    assert "'gone.safetensors' does not exist" in problem("house.safetensors|gone.safetensors")
    assert "holds no LoRA weights" in problem("whole.safetensors")
    assert "is not a readable safetensors file" in problem("junk.safetensors")
    [one] = expand(parse_manifest(b"prompt,lora,lora_scale,model\nx,house.safetensors,0.8,tiny\n", "m.csv"), opts).jobs
    [bare] = expand(parse_manifest(b"prompt,model\nx,tiny\n", "m.csv"), opts).jobs
    assert [(Path(lo.path).name, lo.scale) for lo in one.params.loras] == [("house.safetensors", 0.8)]
    assert one.job_id != bare.job_id and one.params.shape != bare.params.shape
    (tmp_path / "other.safetensors").write_bytes(make_lora(tmp_path / "o", seed=1).read_bytes())
    row = b"prompt,lora,lora_scale,model\nx,house.safetensors|other.safetensors,0.8|-0.5,tiny\n"
    [two] = expand(parse_manifest(row, "m.csv"), opts).jobs  # one scale per LoRA, as `kiln export` writes them
    assert [lo.scale for lo in two.params.loras] == [0.8, -0.5] and two.params.flat()["lora_scale"] == "0.8|-0.5"
    assert "2 values for 1 LoRAs: give one for all of them, or one per LoRA" in problem("house.safetensors,0.8|0.5")
    assert 'column "lora_scale": must be a number from -4 to 4' in problem("house.safetensors,5")


def test_kiln_render_keeps_a_loras_jobs_together(cache_dir: Path, tmp_path: Path, lora_file: Path) -> None:
    # Rows interleave two house styles (a products x styles matrix); rendering them in manifest order would unload
    # and load a LoRA at every job. The loaded shape's jobs are claimed first.
    from datetime import datetime

    from sqlalchemy import select

    from dispatcher import store, usecases
    from schemas.tables import Attempt, Job

    other = make_lora(tmp_path / "other", seed=1)
    manifest = tmp_path / "styles.csv"
    manifest.write_text("id,prompt,model,width,height,lora\n" + "".join(
        f"p{i}{s},mug {i},tiny,256,256,{path}\n" for i in range(3) for s, path in (("a", lora_file), ("b", other))))
    settings = load_settings(cache_dir=cache_dir, storage_url=str(tmp_path / "out"), device="cpu", batch_size=1,
                             database_url=f"sqlite:///{tmp_path / 'kiln.db'}")
    done = usecases.render_here(usecases.Request(manifest), settings, lambda: datetime.now(UTC))
    assert done.failed == 0
    with store.open_database(settings.database_url).begin() as s:
        order = [Path(RenderParams.of_row(job).loras[0].path).parent for job in
                 s.scalars(select(Job).join(Attempt, Attempt.job_id == Job.id).order_by(Attempt.id))]
    assert order == [order[0]] * 3 + [order[3]] * 3 and order[0] != order[3], order  # one switch, not five
