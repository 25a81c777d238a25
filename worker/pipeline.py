"""Loading FLUX.2 [klein] pipelines: where the weights are, which device, which dtype, what fits.

The only worker module that knows about the Hugging Face hub.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import Flux2KleinPipeline
from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from transformers import AutoConfig, Qwen3ForCausalLM

from schemas.errors import ModelError
from schemas.models import ModelSpec, weights_location
from worker.tiny import ensure_tiny

log = logging.getLogger("kiln.worker")

# The pipeline stacks the text encoder's hidden states 9, 18 and 27; hidden state 27 is the input of layer 27,
# so layers 28 and up (and the LM head) never matter. Loading 28 of the 36 layers saves about a quarter.
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)
TEXT_ENCODER_LAYERS = max(TEXT_ENCODER_OUT_LAYERS) + 1


def quiet_libraries() -> None:
    """Kiln draws its own progress; keep diffusers' and transformers' loading bars and chatter off the terminal."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def pick_device(preference: str) -> torch.device:
    """CUDA when present, then Apple MPS, else the CPU; or exactly what KILN_DEVICE names."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelError("KILN_DEVICE=cuda but torch sees no CUDA GPU: install the CUDA build of torch "
                         "(README, 'Real models on a GPU') or use KILN_DEVICE=auto")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise ModelError("KILN_DEVICE=mps but this torch has no Apple MPS support: use KILN_DEVICE=auto")
    return torch.device(preference)


def weights_folder(spec: ModelSpec, cache_dir: Path) -> Path:
    """The local folder holding `spec`'s weights: built (tiny) or downloaded from the hub when missing."""
    if spec.is_tiny:
        return ensure_tiny(cache_dir)
    local = weights_location(spec, cache_dir)
    if local:
        return local
    if not spec.is_hub:
        raise ModelError(f"{spec.source} holds no diffusers model (no model_index.json)")
    try:
        log.info("downloading %s from the Hugging Face hub (once; about %s)", spec.source,
                 "16 GB" if "4b" in spec.profile else "35 GB")
        return Path(snapshot_download(spec.source))
    except GatedRepoError:
        raise ModelError(f"{spec.source} is gated: accept its licence at https://huggingface.co/{spec.source} "
                         "while logged in, then run `hf auth login` here (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{spec.source} was not found on the hub: check the name, or log in with "
                         "`hf auth login` if it is gated") from None
    except (LocalEntryNotFoundError, OSError) as exc:
        raise ModelError(_missing(spec, f"could not be downloaded ({type(exc).__name__})")) from None


def _missing(spec: ModelSpec, what: str) -> str:
    return (f"the weights of {spec.name} ({spec.source}) {what}: connect to the internet and run "
            f"`hf download {spec.source}` (gated models need `hf auth login` and the licence accepted on "
            "huggingface.co), or set --model to a local diffusers folder, or try --model tiny")


def load_pipeline(spec: ModelSpec, cache_dir: Path, device: torch.device) -> Any:
    """Load `spec` once onto `device`; on a CUDA card too small to hold it all, offload idle components."""
    folder = weights_folder(spec, cache_dir)
    dtype = torch.float32 if spec.is_tiny else torch.bfloat16
    if device.type == "cpu" and not spec.is_tiny:
        log.warning("rendering %s on the CPU: expect minutes per image; a CUDA GPU takes about a second", spec.name)
    try:
        text_encoder = load_text_encoder(folder / "text_encoder", dtype)
        pipe = Flux2KleinPipeline.from_pretrained(folder, text_encoder=text_encoder, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {spec.name} from {folder}: {exc}") from None
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda" and _weights_bytes(pipe) * 1.2 > torch.cuda.get_device_properties(device).total_memory:
        log.info("%s does not fit this GPU whole: components move to it one at a time", spec.name)
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def load_text_encoder(folder: Path, dtype: torch.dtype) -> Any:
    """The Qwen3 text encoder with only the layers whose hidden states the pipeline reads."""
    config = AutoConfig.from_pretrained(folder)
    if config.num_hidden_layers > TEXT_ENCODER_LAYERS:
        config.num_hidden_layers = TEXT_ENCODER_LAYERS
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:TEXT_ENCODER_LAYERS]
    return Qwen3ForCausalLM.from_pretrained(folder, config=config, dtype=dtype)


def _weights_bytes(pipe: Any) -> int:
    return sum(p.numel() * p.element_size() for m in (pipe.transformer, pipe.text_encoder, pipe.vae)
               for p in m.parameters())
