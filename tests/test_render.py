"""The worker with the real Flux2KleinPipeline at tiny size: images, metadata, seeds and failures."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.job import JobSpec
from schemas.params import Reference
from schemas.settings import load_settings
from worker.checkpoints import TEXT_ENCODER_LAYERS, load_text_encoder
from worker.encode import parameters_text, read_parameters
from worker.render import LocalRenderer
from worker.tiny import build_tiny_pipeline


def spec(**changes: object) -> JobSpec:
    base = dict(job_id="j1", attempt=1, batch_id="b1", manifest="catalog.csv", manifest_row=3, row_id="shoe",
                model="tiny", prompt="a red shoe, studio light", width=512, height=384, steps=4, guidance=1.0,
                seed=1234, output_key="cat/shoe.png")
    return JobSpec.of(**{**base, **changes})


@pytest.fixture(scope="module")
def renderer(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LocalRenderer:
    out = tmp_path_factory.mktemp("renders")
    return LocalRenderer(load_settings(cache_dir=cache_dir, storage_url=str(out), device="cpu"), "test:1")


def pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(uri.removeprefix("file://")))


def test_renders_a_png_of_the_asked_size_with_readable_parameters(renderer: LocalRenderer) -> None:
    [result] = renderer.render([spec()])
    assert result.ok, result.error
    data = Path(result.uri.removeprefix("file://")).read_bytes()  # type: ignore[union-attr]
    assert result.sha256 == hashlib.sha256(data).hexdigest() and result.bytes == len(data)
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size, image.mode) == ("PNG", (512, 384), "RGB")
    assert image.info["parameters"] == ("a red shoe, studio light\nSteps: 4, Sampler: Euler (flow matching), "
                                        "CFG scale: 1, Seed: 1234, Size: 512x384, Model: tiny, Version: kiln")
    assert json.loads(image.info["kiln"]) == {"job_id": "j1", "batch_id": "b1", "manifest": "catalog.csv",
                                              "manifest_row": 3, "row_id": "shoe", "attempt": 1,
                                              "plan": "bf16-resident", "params": {
                                                  "model": "tiny", "prompt": "a red shoe, studio light",
                                                  "width": 512, "height": 384, "steps": 4, "guidance": 1.0,
                                                  "seed": 1234, "reference_sha256": None, "more_references": [],
                                                  "format": "png", "quality": None, "loras": [], "decoder": "full"}}
    assert result.plan == "bf16-resident"  # a CPU renders from system memory: everything resident
    assert np.asarray(image).std() > 1  # an image, not a flat fill


def test_unicode_prompts_are_kept_in_the_png(renderer: LocalRenderer) -> None:
    [result] = renderer.render([spec(prompt="Чайник — 茶壶 ☕", output_key="cat/teapot.png")])
    assert Image.open(result.uri.removeprefix("file://")).info["parameters"].startswith("Чайник — 茶壶 ☕\n")  # type: ignore[union-attr]


@pytest.mark.parametrize("image_format", ["webp", "jpeg"])
def test_webp_and_jpeg_carry_the_parameters_where_image_readers_look(renderer: LocalRenderer,
                                                                     image_format: str) -> None:
    job = spec(prompt="Чайник, studio light", format=image_format, quality=85, output_key=f"cat/t.{image_format}")
    [result] = renderer.render([job])
    assert result.ok, result.error
    data = Path(result.uri.removeprefix("file://")).read_bytes()  # type: ignore[union-attr]
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.size) == (image_format.upper(), (512, 384))
        assert np.asarray(image).std() > 1
    found = read_parameters(data)  # EXIF UserComment, and Kiln's record in XMP
    assert found["parameters"] == parameters_text(job) and found["parameters"].startswith("Чайник, studio light\n")
    assert json.loads(found["kiln"])["params"]["format"] == image_format
    assert json.loads(found["kiln"])["params"]["quality"] == 85


def test_the_seed_alone_decides_the_image_batched_or_not(renderer: LocalRenderer) -> None:
    a, b = spec(job_id="a", seed=7, output_key="s/a.png"), spec(job_id="b", seed=8, output_key="s/b.png")
    alone = renderer.render([a])[0]
    batched = renderer.render([spec(job_id="a2", seed=7, output_key="s/a2.png"), b])
    assert all(r.ok for r in batched)
    np.testing.assert_allclose(pixels(alone.uri).astype(int), pixels(batched[0].uri).astype(int), atol=2)  # type: ignore[arg-type]
    assert np.abs(pixels(batched[0].uri).astype(int) - pixels(batched[1].uri).astype(int)).mean() > 5  # type: ignore[arg-type]


def test_nan_output_is_a_failed_job_and_nothing_is_stored(renderer: LocalRenderer) -> None:
    pipe = renderer.load([spec()]).pipe
    original = pipe.vae.decoder.conv_out.bias.data.clone()
    pipe.vae.decoder.conv_out.bias.data.fill_(float("nan"))
    try:
        [result] = renderer.render([spec(output_key="cat/nan.png")])
    finally:
        pipe.vae.decoder.conv_out.bias.data.copy_(original)
    assert (result.ok, result.error_kind, result.uri) == (False, "nan", None)
    assert "NaN" in (result.error or "")
    assert not (Path(renderer.storage_uri.removeprefix("file://")) / "cat" / "nan.png").exists()


def test_a_bad_reference_image_fails_its_job_with_the_reason(renderer: LocalRenderer, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    [result] = renderer.render([spec(reference=str(bad), output_key="cat/ref.png")])
    assert (result.ok, result.error_kind) == (False, "bad_input")
    assert "broken.png cannot be read" in (result.error or "")


def test_each_reference_image_conditions_the_render(renderer: LocalRenderer, tmp_path: Path) -> None:
    front, side = tmp_path / "front.png", tmp_path / "side.jpg"
    Image.fromarray(np.full((256, 256, 3), 200, dtype=np.uint8)).save(front)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (320, 240, 3), dtype=np.uint8)).save(side)
    second = Reference(path=str(side), sha256="0" * 64)
    results = renderer.render([spec(job_id="none", output_key="cat/no-ref.png")]) + renderer.render(
        [spec(job_id="one", reference=str(front), output_key="cat/one-ref.png")]) + renderer.render(
        [spec(job_id="two", reference=str(front), more_references=(second,), output_key="cat/two-refs.png")])
    assert all(r.ok for r in results), [r.error for r in results]
    none, one, two = (pixels(r.uri).astype(int) for r in results)  # type: ignore[arg-type]
    # the same seed and prompt: the references alone make the difference, the second one too (small with the tiny
    # model's random weights, where reference tokens weigh little in attention; never nothing)
    assert np.abs(one - none).max() > 0 and np.abs(two - one).max() > 0


def test_the_text_encoder_loads_27_layers_without_head_and_keeps_the_hidden_states_the_pipeline_reads(
        tmp_path: Path) -> None:
    full = build_tiny_pipeline(text_layers=36).text_encoder
    full.save_pretrained(tmp_path)
    cut = load_text_encoder(tmp_path, None, torch.float32)
    assert cut.config.num_hidden_layers == TEXT_ENCODER_LAYERS == 27
    assert not hasattr(cut, "lm_head")
    ids = torch.randint(0, 250, (1, 32))
    with torch.no_grad():
        want = full(input_ids=ids, output_hidden_states=True).hidden_states
        got = cut(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in (9, 18, 27):
        assert torch.equal(want[layer], got[layer])


def test_tiny_keeps_the_real_geometry(renderer: LocalRenderer) -> None:
    model = renderer.load([spec()])
    pipe = model.pipe
    assert pipe.vae_scale_factor == 8
    assert model.transformer.acquire().config.in_channels == 128 and pipe.vae.config.latent_channels == 32
    assert pipe.config.is_distilled is True


def test_a_reference_that_declares_gigapixels_fails_its_job_as_bad_input(renderer: LocalRenderer,
                                                                         tmp_path: Path) -> None:
    from tests.test_expand import png_header

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(200000, 200000))  # edited after it was submitted, say
    [result] = renderer.render([spec(reference=str(bomb), output_key="cat/bomb.png")])
    assert (result.ok, result.error_kind) == (False, "bad_input")
    assert "bomb.png cannot be read" in (result.error or "")


def test_an_unforeseen_error_fails_the_jobs_in_hand_and_the_next_job_renders(renderer: LocalRenderer) -> None:
    transformer = renderer.load([spec()]).transformer.acquire()

    def broken(_module: object, _args: object) -> None:
        raise ValueError("something no one planned for\nwith a second line")

    handle = transformer.register_forward_pre_hook(broken)
    try:
        results = renderer.render([spec(job_id="x1", output_key="u/1.png"), spec(job_id="x2", output_key="u/2.png")])
    finally:
        handle.remove()
    assert [(r.ok, r.error_kind, r.error) for r in results] == [
        (False, "error", "ValueError: something no one planned for")] * 2
    [after] = renderer.render([spec(job_id="x3", output_key="u/3.png")])
    assert after.ok, after.error


def test_a_lost_device_is_the_workers_fault_and_it_renders_nothing_more(cache_dir: Path,
                                                                         tmp_path: Path) -> None:
    renderer = LocalRenderer(load_settings(cache_dir=cache_dir, storage_url=str(tmp_path), device="cpu"), "test:2")
    transformer = renderer.load([spec()]).transformer.acquire()

    def lost(_module: object, _args: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    transformer.register_forward_pre_hook(lost)
    [result] = renderer.render([spec(job_id="x1", output_key="u/1.png")])
    assert (result.ok, result.error_kind) == (False, "worker") and "restart this worker" in (result.error or "")
    [after] = renderer.render([spec(job_id="x2", output_key="u/2.png")])  # not tried: the job goes elsewhere
    assert (after.ok, after.error_kind, after.error) == (False, "worker", result.error)
    assert renderer.loads == {"tiny": 1}
