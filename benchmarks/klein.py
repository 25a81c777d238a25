"""FLUX.2 [klein] built from the published configs in `benchmarks/klein-configs/`, with random weights: speed and
memory do not depend on weight values, and no hub is needed. Used by the GPU benchmark (full size, written to a
diffusers folder Kiln loads like any other) and by the tests (on the meta device, to check schemas/plan.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

CONFIGS = Path(__file__).resolve().parent / "klein-configs"
MODELS = ("klein-4b", "klein-9b")


def config(model: str, component: str) -> dict[str, Any]:
    """A published config: component is transformer, text_encoder, vae or model_index."""
    data: dict[str, Any] = json.loads((CONFIGS / f"{model}-{component}.json").read_text(encoding="utf-8"))
    return data


def components(model: str, device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
               text_layers: int | None = None) -> tuple[Any, Any, Any]:
    """(transformer, text encoder, VAE) of `model` on `device` with random weights; the text encoder as published
    (Qwen3ForCausalLM, every layer and the LM head) unless `text_layers` cuts it."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    text = Qwen3Config(**config(model, "text_encoder"))
    if text_layers is not None:
        text.num_hidden_layers, text.layer_types = text_layers, (text.layer_types or [])[:text_layers]
    vae = {k: v for k, v in config(model, "vae").items() if k != "force_upcast"}  # not an AutoencoderKLFlux2 arg
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialize in the storage dtype: a 9B model in float32 would not fit
    try:
        with torch.device(device), torch.no_grad():
            return (Flux2Transformer2DModel.from_config(config(model, "transformer")), Qwen3ForCausalLM(text),
                    AutoencoderKLFlux2.from_config(vae))
    finally:
        torch.set_default_dtype(previous)


def write_folder(model: str, folder: Path, device: str | torch.device) -> Path:
    """A diffusers folder of `model` with random weights, as `hf download` would leave the real one (the
    tokenizer is Kiln's small byte-level one: prompts are padded to 512 tokens either way)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from worker.tiny import build_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    transformer, text_encoder, vae = components(model, device)
    for name, module in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)):
        module.save_pretrained(staging / name)
    del transformer, text_encoder, vae
    build_tokenizer().save_pretrained(staging / "tokenizer")
    FlowMatchEulerDiscreteScheduler.from_config(config("klein", "scheduler")).save_pretrained(staging / "scheduler")
    (staging / "model_index.json").write_text(json.dumps(config(model, "model_index"), indent=2), encoding="utf-8")
    staging.rename(folder)
    return folder
