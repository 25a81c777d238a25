"""Model files as people have them, read from their safetensors headers alone (no torch, nothing loaded).

A klein model arrives as a diffusers folder (the hub's layout), as one transformer file (Black Forest Labs' single
files, bf16 or fp8, in BFL's own tensor names, or a diffusers-named file), or as a ComfyUI models folder
(`diffusion_models/`, `text_encoders/`, `vae/`). Which klein a transformer is, is read from its width, never from
its name: the single-file loaders of diffusers take every FLUX.2 file for the 32B FLUX.2-dev. The same widths tell
whether a LoRA was trained for the model a row names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import ModelError

# The transformer's inner width (heads x head size) of each size, and the hidden size of its Qwen3 text encoder.
TRANSFORMER_WIDTH = {"4b": 3072, "9b": 4096, "tiny": 32}
ENCODER_WIDTH = {"4b": 2560, "9b": 4096, "tiny": 16}
VAE_LATENT_CHANNELS = 32  # FLUX.2's VAE; FLUX.1's has 16
PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI's and BFL's wrappers around the tensor names
SUFFIXES = (".safetensors", ".sft")
COMFY_FOLDERS = {"transformer": ("diffusion_models", "unet"), "text_encoder": ("text_encoders", "clip"),
                 "vae": ("vae",)}
FP8_SCALES = ("weight_scale", "scale_weight")  # the two spellings of a per-tensor fp8 scale in the wild


@dataclass(frozen=True)
class Tensor:
    dtype: str  # as safetensors names it: BF16, F32, F8_E4M3, ...
    shape: tuple[int, ...]


@functools.lru_cache(maxsize=256)
def _header(path: Path, _version: tuple[int, int]) -> dict[str, Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as tensors:
            names = list(tensors.keys())  # noqa: SIM118 (not a dict)
            slices = {n: tensors.get_slice(n) for n in names}
            return {_bare(n): Tensor(s.get_dtype(), tuple(s.get_shape())) for n, s in slices.items()}
    except Exception as exc:  # safetensors raises its own error types for a broken header
        raise ModelError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:200]})"
                         ) from None


def header(path: Path) -> dict[str, Tensor]:
    """Every tensor a safetensors file holds, by name (ComfyUI's wrapper prefix taken off), read once per version."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from None
    return _header(path, (stat.st_mtime_ns, stat.st_size))


def _bare(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def is_fp8(tensors: dict[str, Tensor]) -> bool:
    """True when weights are stored in 8-bit floats (BFL's fp8 files, diffusers-format fp8 repacks)."""
    return any(t.dtype.startswith("F8") for t in tensors.values())


def transformer_size(tensors: dict[str, Tensor], where: str) -> str:
    """Which klein a transformer's tensors make ("4b", "9b", or "tiny"), or ModelError saying what it is instead."""
    embed = tensors.get("x_embedder.weight") or tensors.get("img_in.weight")  # diffusers' name, BFL's name
    if embed is None or not any(n.startswith(("single_stream_modulation.", "single_transformer_blocks."))
                                for n in tensors):
        raise ModelError(f"{where} holds no FLUX.2 transformer (no x_embedder/img_in and single-stream tensors): "
                         "name a klein transformer file, a ComfyUI models folder or a diffusers folder")
    for size, width in TRANSFORMER_WIDTH.items():
        if embed.shape[0] == width:
            return size
    raise ModelError(f"{where} is a FLUX.2 transformer {embed.shape[0]} wide, not klein (klein 4B is "
                     f"{TRANSFORMER_WIDTH['4b']} wide, 9B {TRANSFORMER_WIDTH['9b']}): Kiln renders FLUX.2 [klein] only")


def bfl_names(tensors: dict[str, Tensor]) -> bool:
    """True when a transformer's tensors carry Black Forest Labs' names (img_in, double_blocks) not diffusers'."""
    return "img_in.weight" in tensors


def encoder_size(tensors: dict[str, Tensor]) -> str | None:
    """Which klein a Qwen3 text encoder file serves, by its hidden size; None when it is not one."""
    embed = tensors.get("model.embed_tokens.weight") or tensors.get("embed_tokens.weight")
    if embed is None or len(embed.shape) != 2 or not any(".self_attn.q_norm." in n for n in tensors):
        return None  # Qwen3 has q_norm, Qwen2.5 and T5 do not
    return next((size for size, width in ENCODER_WIDTH.items() if embed.shape[1] == width), None)


def is_flux2_vae(tensors: dict[str, Tensor]) -> bool:
    """True when a file is a FLUX.2 VAE with its full decoder, in diffusers' names or the original ones."""
    conv = tensors.get("decoder.conv_in.weight")
    up = "decoder.up_blocks.0.resnets.0.conv1.weight" in tensors or "decoder.up.0.block.0.conv1.weight" in tensors
    return conv is not None and len(conv.shape) == 4 and conv.shape[1] == VAE_LATENT_CHANNELS and up


def lora_width(tensors: dict[str, Tensor]) -> int | None:
    """The transformer width a LoRA was trained for, read from its attention projections' down matrices (both
    diffusers' and BFL's names); None when the file names none of them."""
    for name, tensor in tensors.items():
        down = ".lora_A." in name or ".lora_down." in name
        attention = any(p in name for p in (".to_q.", ".to_k.", ".to_v.", ".qkv.", ".linear1.", ".to_qkv_mlp_proj."))
        if down and attention and len(tensor.shape) == 2:
            return tensor.shape[1]
    return None


@dataclass(frozen=True)
class Parts:
    """Where the files of a model that is not one diffusers folder are: its transformer always, its text encoder
    and VAE when the user has them; the rest (configs, tokenizer, scheduler, and a part not given) comes from
    `base`, the registered model of the same size and kind."""

    transformer: str
    text_encoder: str | None
    vae: str | None
    base: str
    fp8: bool  # the transformer file stores fp8 weights (dequantized with their scales at load)


def checkpoint_parts(path: Path) -> tuple[Parts, str]:
    """The parts of the model a user named by a transformer file or a ComfyUI models folder, and its size
    ("4b", "9b", "tiny"). A transformer file inside a ComfyUI folder (`.../diffusion_models/x.safetensors`) finds
    its text encoder and VAE beside it; a lone file takes them from the hub's model of its size."""
    root: Path | None
    if path.is_dir():
        root, transformer = path, _only_transformer(path)
    else:
        if path.suffix.lower() not in SUFFIXES:
            raise ModelError(f"{path} is not a .safetensors file: Kiln loads klein from safetensors files, a "
                             "ComfyUI models folder or a diffusers folder (never pickled .ckpt/.pt/.bin files)")
        root, transformer = (path.parent.parent if path.parent.name in COMFY_FOLDERS["transformer"] else None), path
    tensors = header(transformer)
    size = transformer_size(tensors, str(transformer))
    base_model = "base-" in transformer.name.lower() or "-base" in transformer.name.lower()
    base = "tiny" if size == "tiny" else ("klein-base-" if base_model else "klein-") + size
    encoder = _part(root, "text_encoder", lambda t: encoder_size(t) == size) if root else None
    vae = _part(root, "vae", is_flux2_vae) if root else None
    return Parts(str(transformer.resolve()), encoder, vae, base, is_fp8(tensors)), size


def _files(root: Path, part: str) -> list[Path]:
    return sorted(f for folder in COMFY_FOLDERS[part] if (root / folder).is_dir()
                  for f in (root / folder).iterdir() if f.suffix.lower() in SUFFIXES and f.is_file())


def _only_transformer(root: Path) -> Path:
    candidates = _files(root, "transformer")
    if not candidates:
        raise ModelError(f"{root} is neither a diffusers folder (no model_index.json) nor a ComfyUI models folder "
                         "with a klein transformer in diffusion_models/")
    klein = []
    for candidate in candidates:
        try:
            transformer_size(header(candidate), str(candidate))
            klein.append(candidate)
        except ModelError:
            continue
    if len(klein) != 1:
        found = ", ".join(str(f.relative_to(root)) for f in klein) or "none"
        raise ModelError(f"{root} holds {len(klein)} klein transformers in diffusion_models/ ({found}): name the "
                         "file itself as the model, e.g. " + str(root / "diffusion_models" / "NAME.safetensors"))
    return klein[0]


def _part(root: Path, part: str, fits: Callable[[dict[str, Tensor]], bool]) -> str | None:
    # the small decoder shares the VAE's tensors' names: the full one is taken when both are there
    for candidate in sorted(_files(root, part), key=lambda f: "small" in f.name.lower()):
        try:
            if fits(header(candidate)):
                return str(candidate.resolve())
        except ModelError:
            continue
    return None
