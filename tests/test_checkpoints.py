"""Checkpoints as people have them: the tiny model written out as Black Forest Labs' single-file transformer, as a
diffusers-format fp8 repack, and as a ComfyUI models folder (fp8 transformer with scales, a whole Qwen3 causal-LM
text encoder, a VAE), each loaded with the config of its size and rendering what the diffusers folder renders."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image
from safetensors.torch import save_file

from dispatcher.expand import Options, expand
from dispatcher.reader import parse_manifest
from schemas.checkpoints import TRANSFORMER_WIDTH
from schemas.errors import ManifestError, ModelError
from schemas.job import JobSpec
from schemas.models import resolve_model
from schemas.settings import load_settings
from tests.test_lora import make_lora
from worker.render import LocalRenderer
from worker.tiny import ensure_tiny


def bfl_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' Flux2 transformer tensors under Black Forest Labs' names (the inverse of diffusers' converter:
    fused qkv, (shift, scale) order in the final norm), as BFL's single files hold them."""
    out: dict[str, torch.Tensor] = {}
    renames = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
               "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
               "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
               "single_stream_modulation.linear": "single_stream_modulation.lin"}
    double = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
              "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
              "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
              "attn.to_add_out": "txt_attn.proj", "ff_context.linear_in": "txt_mlp.0",
              "ff_context.linear_out": "txt_mlp.2"}
    single = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
              "attn.norm_k": "norm.key_norm"}
    for name, tensor in state.items():
        if name.startswith("norm_out.linear."):
            scale, shift = tensor.chunk(2, dim=0)
            out[name.replace("norm_out.linear", "final_layer.adaLN_modulation.1")] = torch.cat([shift, scale])
            continue
        if name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            kind, block, rest = name.split(".", 2)
            inner, leaf = rest.rsplit(".", 1)
            leaf = "scale" if "norm" in inner else leaf
            if kind == "transformer_blocks":
                for q, stream in (("attn.to_q", "img"), ("attn.add_q_proj", "txt")):
                    if inner == q:
                        k, v = (f"{kind}.{block}.{q.replace('q', x)}.{leaf}" for x in ("k", "v"))
                        out[f"double_blocks.{block}.{stream}_attn.qkv.{leaf}"] = torch.cat(
                            [tensor, state[k], state[v]])
                if inner in double:
                    out[f"double_blocks.{block}.{double[inner]}.{leaf}"] = tensor
            else:
                out[f"single_blocks.{block}.{single[inner]}.{leaf}"] = tensor
            continue
        for old, new in renames.items():
            if name.startswith(old + "."):
                name = new + name[len(old):]
        out[name] = tensor
    return out


def ldm_vae_names(state: dict[str, torch.Tensor], up_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers VAE's tensors under the original (LDM) names ComfyUI's VAE files use: encoder.down.N.block.M,
    decoder.up numbered from the bottom, norm_out, nin_shortcut."""
    out = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[1] == "down_blocks":
            tail = ".".join(parts[3:]).replace("resnets.", "block.").replace("downsamplers.0", "downsample")
            name = f"{parts[0]}.down.{parts[2]}.{tail}"
        elif parts[1] == "up_blocks":
            tail = ".".join(parts[3:]).replace("resnets.", "block.").replace("upsamplers.0", "upsample")
            name = f"{parts[0]}.up.{up_blocks - 1 - int(parts[2])}.{tail}"
        elif parts[1] == "mid_block":
            name = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        name = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        out[name] = tensor
    return out


def fp8(state: dict[str, torch.Tensor], spelling: str) -> dict[str, torch.Tensor]:
    """Every 2-D weight stored as float8 with a per-tensor scale (`weight_scale` or ComfyUI's `scale_weight`)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(".weight") and tensor.dim() == 2:
            scale = tensor.abs().max().clamp(min=1e-8) / 448
            out[name] = (tensor / scale).to(torch.float8_e4m3fn)
            out[name.removesuffix("weight") + spelling] = scale.reshape(())
        else:
            out[name] = tensor
    return out


@pytest.fixture(scope="module")
def layouts(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = ensure_tiny(cache_dir)
    pipe = Flux2KleinPipeline.from_pretrained(folder)
    transformer = {k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}
    root = tmp_path_factory.mktemp("checkpoints")
    single = root / "flux-2-klein-tiny.safetensors"  # BFL's layout: their names, one file
    save_file(bfl_names(transformer), single)
    repack = root / "klein-tiny-fp8-diffusers"  # a diffusers folder whose transformer holds fp8 weights and scales
    shutil.copytree(folder, repack)
    for old in (repack / "transformer").glob("*.safetensors"):
        old.unlink()
    save_file(fp8(transformer, "weight_scale"), repack / "transformer" / "diffusion_pytorch_model.safetensors")
    comfy = root / "ComfyUI" / "models"  # ComfyUI: fp8 transformer under its wrapper prefix, causal LM, VAE
    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        (comfy / sub).mkdir(parents=True)
    save_file({f"model.diffusion_model.{k}": v for k, v in fp8(bfl_names(transformer), "scale_weight").items()},
              comfy / "diffusion_models" / "flux-2-klein-tiny-fp8.safetensors")
    save_file({k: v.contiguous().clone() for k, v in pipe.text_encoder.state_dict().items()},
              comfy / "text_encoders" / "qwen_3_tiny.safetensors")
    vae = {k: v.contiguous() for k, v in pipe.vae.state_dict().items()}
    save_file(ldm_vae_names(vae, len(pipe.vae.config.up_block_types)), comfy / "vae" / "flux2-vae.safetensors")
    return {"single": single, "repack": repack, "comfy": comfy,
            "comfy_file": comfy / "diffusion_models" / "flux-2-klein-tiny-fp8.safetensors"}


def render(cache_dir: Path, out: Path, model: str, seed: int = 7, **changes: Any) -> np.ndarray:
    settings = load_settings(cache_dir=cache_dir, storage_url=str(out), device="cpu")
    job = JobSpec.of(job_id=f"c{seed}", attempt=1, batch_id="b", manifest="m.csv", manifest_row=1, row_id="1",
                     model=model, prompt="a teapot, studio light", width=256, height=256, steps=4, guidance=1.0,
                     seed=seed, output_key=f"c/{seed}.png", **changes)
    [result] = LocalRenderer(settings, "test:1").render([job])
    assert result.ok, result.error
    assert result.uri is not None
    return np.asarray(Image.open(result.uri.removeprefix("file://"))).astype(int)


def test_each_layout_resolves_to_the_tiny_profile_with_the_parts_it_has(layouts: dict[str, Path]) -> None:
    single = resolve_model(str(layouts["single"]))
    assert single.profile == "tiny" and single.parts is not None and not single.parts.fp8
    assert single.parts.text_encoder is None and single.parts.vae is None  # from the base folder
    for named in (layouts["comfy"], layouts["comfy_file"]):  # the folder, or the file inside it
        comfy = resolve_model(str(named))
        assert comfy.parts is not None and comfy.parts.fp8
        assert comfy.parts.transformer == str(layouts["comfy_file"])
        assert comfy.parts.text_encoder and comfy.parts.text_encoder.endswith("qwen_3_tiny.safetensors")
        assert comfy.parts.vae and comfy.parts.vae.endswith("flux2-vae.safetensors")
    assert resolve_model(str(layouts["repack"])).parts is None  # a diffusers folder stays one


def test_every_layout_renders_what_the_diffusers_folder_renders(
        cache_dir: Path, tmp_path: Path, layouts: dict[str, Path]) -> None:
    reference = render(cache_dir, tmp_path / "ref", "tiny")
    other_seed = render(cache_dir, tmp_path / "seed", "tiny", seed=8)
    # BFL's names converted back: the very same weights, so the same image but for a rare last-bit rounding
    # (the split qkv weights sit elsewhere in memory, and the CPU's kernels sum in another order there)
    single = np.abs(render(cache_dir, tmp_path / "single", str(layouts["single"])) - reference)
    assert single.max() <= 1 and single.mean() < 0.01, (single.max(), single.mean())
    # fp8 with scales: dequantized, close to the original (a scale ignored would render noise: far from it)
    seed_gap = np.abs(other_seed - reference).mean()
    for name in ("repack", "comfy"):
        image = render(cache_dir, tmp_path / name, str(layouts[name]))
        gap = np.abs(image - reference).mean()
        assert gap < 0.25 * seed_gap, f"{name}: fp8 image {gap:.2f} grey levels off, other seed {seed_gap:.2f}"


def header_only(path: Path, width: int) -> Path:
    save_file({"x_embedder.weight": torch.zeros(width, 1), "single_stream_modulation.linear.weight": torch.zeros(1)},
              path)
    return path


def test_the_size_comes_from_the_tensors_not_the_name(tmp_path: Path) -> None:
    nine = resolve_model(str(header_only(tmp_path / "klein-4b-renamed.safetensors", TRANSFORMER_WIDTH["9b"])))
    assert nine.profile == "klein-9b" and not nine.commercial  # a renamed 9B keeps the 9B licence
    base = resolve_model(str(header_only(tmp_path / "flux-2-klein-base-4b.safetensors", TRANSFORMER_WIDTH["4b"])))
    assert base.profile == "klein-base-4b" and base.default_steps == 50
    with pytest.raises(ModelError, match="6144 wide, not klein"):
        resolve_model(str(header_only(tmp_path / "flux2-dev.safetensors", 6144)))
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(ModelError, match="never pickled"):
        resolve_model(str(tmp_path / "model.ckpt"))
    comfy = tmp_path / "models" / "diffusion_models"
    comfy.mkdir(parents=True)
    for name in ("a.safetensors", "b.safetensors"):
        header_only(comfy / name, TRANSFORMER_WIDTH["4b"])
    with pytest.raises(ModelError, match=r"2 klein transformers .*a\.safetensors, .*b\.safetensors.*name the file"):
        resolve_model(str(tmp_path / "models"))


def manifest(text: str) -> Any:
    return parse_manifest(text.encode(), "m.csv")


def test_a_lora_for_another_size_is_refused_at_validation(tmp_path: Path, layouts: dict[str, Path]) -> None:
    lora = make_lora(tmp_path)  # trained on the tiny transformer
    fine = manifest(f"prompt,output,lora,model\nmug,a.png,{lora},tiny\nmug,b.png,{lora},"
                              f"{layouts['single']}\n")
    assert len(list(expand(fine, Options(batch="b", base_dir=tmp_path)).jobs)) == 2
    wrong = manifest(f"prompt,output,lora\nmug,a.png,{lora}\n")  # klein-4b by default
    with pytest.raises(ManifestError, match=r"trained for a transformer 32 wide .*klein-4b is 3072 wide"):
        list(expand(wrong, Options(batch="b", base_dir=tmp_path)).jobs)


def test_the_small_decoder_is_a_render_parameter(cache_dir: Path, tmp_path: Path) -> None:
    full = render(cache_dir, tmp_path / "full", "tiny")
    small = render(cache_dir, tmp_path / "small", "tiny", decoder="small")
    assert small.shape == full.shape and np.abs(small - full).mean() > 1  # another decoder, another image
    [job] = expand(manifest("prompt,model,decoder\nmug,tiny,small\n"), Options(batch="b", base_dir=tmp_path)).jobs
    assert job.params.decoder == "small"
    [job] = expand(manifest("prompt,model\nmug,tiny\n"), Options(batch="b", base_dir=tmp_path, decoder="small")).jobs
    assert job.params.decoder == "small"
    with pytest.raises(ManifestError, match='"decoder"'):
        expand(manifest("prompt,model,decoder\nmug,tiny,tiny\n"), Options(batch="b", base_dir=tmp_path))


def test_a_vae_in_the_original_names_loads_exactly(cache_dir: Path, layouts: dict[str, Path]) -> None:
    from diffusers import AutoencoderKLFlux2

    from worker.checkpoints import load_vae

    folder = ensure_tiny(cache_dir) / "vae"
    original = AutoencoderKLFlux2.from_pretrained(folder).state_dict()
    loaded = load_vae(folder, str(layouts["comfy"] / "vae" / "flux2-vae.safetensors"), torch.float32).state_dict()
    assert set(loaded) == set(original)
    assert all(torch.equal(loaded[k], original[k]) for k in original)
