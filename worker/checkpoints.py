"""Loading each part of klein from the files people have: a diffusers folder, or single safetensors files (Black
Forest Labs' transformers, ComfyUI's text encoders and VAEs), bf16 or fp8 with or without per-tensor scales.

Every part is built from the klein config of its size (from the base folder; never guessed from the file) on the
meta device and filled strictly from the file: a tensor missing or left over fails the load and names it, where a
loose load would render noise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file
from transformers import AutoConfig, Qwen3Model

from schemas.checkpoints import FP8_SCALES, PREFIXES, bfl_names, header, is_fp8
from schemas.errors import ModelError

# The pipeline stacks the text encoder's hidden states 9, 18 and 27. Hidden state 27 is the output of layer 26,
# so only 27 of Qwen3's 36 layers matter, and the final norm (which transformers applies to the last hidden
# state it returns) must go. No LM head: the pipeline never reads logits.
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)
TEXT_ENCODER_LAYERS = max(TEXT_ENCODER_OUT_LAYERS)
DROPPED = ("input_scale", "scale_input", "comfy_quant")  # fp8 activation hints: no meaning once dequantized


def read_state(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of `files` under their bare names, in `dtype`; fp8 weights are multiplied by their scales
    (either spelling), the scales and activation hints dropped."""
    raw: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            for prefix in PREFIXES:
                name = name.removeprefix(prefix)
            raw[name] = tensor
    state = {}
    for name, tensor in raw.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in FP8_SCALES or leaf in DROPPED or name == "scaled_fp8":
            continue
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            owner = name.rsplit(".", 1)[0]
            scale = next((raw[f"{owner}.{s}"] for s in FP8_SCALES if f"{owner}.{s}" in raw), None)
            tensor = tensor.to(torch.float32) * (scale.to(torch.float32) if scale is not None else 1.0)
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def build(make: Callable[[], Any], state: dict[str, torch.Tensor], where: str, what: str) -> Any:
    """`make()`'s module with its weights from `state`, every tensor accounted for."""
    with init_empty_weights():
        module = make()
    wanted = set(module.state_dict())
    missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or extra:
        said = "; ".join(f"{len(names)} {kind} (e.g. {names[0]})" for kind, names in
                         (("tensors missing", missing), ("tensors it does not know", extra)) if names)
        raise ModelError(f"{where} is not a whole klein {what} of this size: {said}")
    module.load_state_dict(state, strict=True, assign=True)
    return module


def load_transformer(folder: Path, file: str | None, dtype: torch.dtype) -> Any:
    """The transformer from `file` (BFL's or diffusers' names, bf16 or fp8) built from `folder`'s config, or from
    `folder` itself, which may be a diffusers-format fp8 repack."""
    files = [Path(file)] if file else sorted(folder.glob("*.safetensors"))
    if not file and not any(is_fp8(header(f)) for f in files):
        return Flux2Transformer2DModel.from_pretrained(folder, dtype=dtype)
    state = read_state(files, dtype)
    if bfl_names(header(files[0])):
        state = convert_flux2_transformer_checkpoint_to_diffusers(state)
    config = Flux2Transformer2DModel.load_config(folder)
    return build(lambda: Flux2Transformer2DModel.from_config(config), state, file or str(folder), "transformer")


def load_text_encoder(folder: Path, file: str | None, dtype: torch.dtype) -> Any:
    """The Qwen3 text encoder as klein reads it: 27 layers, no final norm, no LM head; from `file` (ComfyUI's
    text_encoders/, a Qwen3ForCausalLM state) or from `folder`."""
    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = min(config.num_hidden_layers, TEXT_ENCODER_LAYERS)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    if file is None:
        encoder = Qwen3Model.from_pretrained(folder, config=config, dtype=dtype)
        encoder.norm = torch.nn.Identity()  # type: ignore[assignment]
        return encoder.eval()
    state = {}
    for name, tensor in read_state([Path(file)], dtype).items():
        name = name.removeprefix("model.")
        layer = name.split(".")[1] if name.startswith("layers.") else None
        if name.startswith(("lm_head.", "norm.")) or (layer is not None and int(layer) >= config.num_hidden_layers):
            continue
        state[name] = tensor

    def make() -> Any:
        encoder = Qwen3Model(config)
        encoder.norm = torch.nn.Identity()  # type: ignore[assignment]
        return encoder
    return build(make, state, file, "Qwen3 text encoder").to(dtype).eval()


def load_vae(folder: Path, file: str, dtype: torch.dtype) -> Any:
    """The VAE from `file` (diffusers' names, or the original encoder.down.N.block names) with `folder`'s config."""
    config = AutoencoderKLFlux2.load_config(folder)
    state = read_state([Path(file)], dtype)
    if "decoder.up.0.block.0.conv1.weight" in state:
        kept = {k: v for k, v in state.items() if k.startswith("bn.")}  # FLUX.2's latent batch norm
        state = {**convert_ldm_vae_checkpoint(state, config), **kept}
    return build(lambda: AutoencoderKLFlux2.from_config(config), state, file, "FLUX.2 VAE").to(dtype)
