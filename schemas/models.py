"""The model registry: names users type, where the weights come from, call defaults and licences."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from schemas.checkpoints import TRANSFORMER_WIDTH, Parts, checkpoint_parts
from schemas.errors import ModelError

TINY_SOURCE = "kiln:tiny"
TINY_VERSION = 1  # bump when the tiny model's shape changes, so old caches are not reused
APACHE = "Apache-2.0"
FLUX_NC = "FLUX Non-Commercial"


@dataclass(frozen=True)
class ModelSpec:
    """One renderable model: what to load, how to call it, and who may use it."""

    name: str
    source: str  # a Hugging Face repo id, a local diffusers folder, or TINY_SOURCE
    distilled: bool
    licence: str
    commercial: bool
    profile: str  # whose memory profile the scheduler uses: a registered model name, or "tiny"
    description: str = ""
    parts: Parts | None = None  # a transformer file or ComfyUI folder: where each part is (source is its path)

    @property
    def default_steps(self) -> int:
        """Distilled klein models are made for 4 steps; base models for 50 (the pipeline's own default)."""
        return 4 if self.distilled else 50

    @property
    def default_guidance(self) -> float:
        """Distilled models ignore guidance (1.0); base models use real CFG at 4.0."""
        return 1.0 if self.distilled else 4.0

    @property
    def is_tiny(self) -> bool:
        """True when the weights are Kiln's small random test model."""
        return self.source == TINY_SOURCE

    @property
    def is_hub(self) -> bool:
        """True when the weights come from the Hugging Face hub."""
        return not self.is_tiny and not Path(self.source).is_absolute()


REGISTRY: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("klein-4b", "black-forest-labs/FLUX.2-klein-4B", True, APACHE, True, "klein-4b",
                  "4B, step- and guidance-distilled: the default for catalogs"),
        ModelSpec("klein-9b", "black-forest-labs/FLUX.2-klein-9B", True, FLUX_NC, False, "klein-9b",
                  "9B distilled; gated repo, non-commercial use only"),
        ModelSpec("klein-base-4b", "black-forest-labs/FLUX.2-klein-base-4B", False, APACHE, True,
                  "klein-base-4b", "4B base model with real CFG: 50 steps, slower, more varied"),
        ModelSpec("klein-base-9b", "black-forest-labs/FLUX.2-klein-base-9B", False, FLUX_NC, False,
                  "klein-base-9b", "9B base model; gated repo, non-commercial use only"),
        ModelSpec("tiny", TINY_SOURCE, True, "none (random weights)", True, "tiny",
                  "small random-weight klein built locally: noise images, for tests and trying Kiln out"),
    )
}
DEFAULT_MODEL = "klein-4b"
SMALL_DECODER = "black-forest-labs/FLUX.2-small-decoder"  # Apache-2.0; the VAE with a slimmer, faster decoder


def known_names() -> list[str]:
    """Every name `resolve_model` accepts without a path, for error messages and `kiln models list`."""
    return [*REGISTRY, *(f"tiny:{n}" for n in REGISTRY if n != "tiny")]


def looks_like_path(name: str) -> bool:
    """A model value naming a folder rather than a registry entry."""
    return name.startswith((".", "/", "~")) or "/" in name or "\\" in name


def resolve_model(name: str, base_dir: Path | None = None) -> ModelSpec:
    """Turn a model value from a manifest or option into a ModelSpec, or raise ModelError saying why not.

    `tiny:klein-9b` renders with the tiny weights but keeps klein-9b's licence, defaults and memory profile,
    so the scheduler and licence checks can be tested without real weights.
    """
    name = name.strip()
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("tiny:") and name[5:] in REGISTRY and name[5:] != "tiny":
        real = REGISTRY[name[5:]]
        return replace(real, name=name, source=TINY_SOURCE, description=f"tiny weights, {real.name}'s profile")
    if looks_like_path(name):
        return _local_model(name, base_dir)
    raise ModelError(f"unknown model {name!r}: use one of {', '.join(known_names())}, or a local diffusers folder")


def _local_model(name: str, base_dir: Path | None) -> ModelSpec:
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    index = path / "model_index.json"
    if not path.exists():
        raise ModelError(f"the model {name!r} does not exist: name a diffusers folder, a klein transformer "
                         ".safetensors file or a ComfyUI models folder (paths are relative to the manifest)")
    if not index.is_file():
        return _checkpoint(path)
    try:
        config = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {index}: {exc}") from exc
    if config.get("_class_name") != "Flux2KleinPipeline":
        raise ModelError(f"{index} describes a {config.get('_class_name')!r}, not a Flux2KleinPipeline")
    distilled = bool(config.get("is_distilled", False))
    # A local copy of a 9B model keeps the 9B licence: tell the sizes apart by the transformer's width.
    try:
        heads = json.loads((path / "transformer" / "config.json").read_text(encoding="utf-8"))["num_attention_heads"]
    except (OSError, ValueError, KeyError):
        heads = 24
    family = REGISTRY[("klein-" if distilled else "klein-base-") + ("9b" if heads >= 32 else "4b")]
    # Named by its absolute path: a job must mean the same folder on every machine and from every working
    # directory, and two manifests' `./model` folders are two models.
    where = str(path.resolve())
    return replace(family, name=where, source=where, description=f"local folder ({family.name} shape)")


def _checkpoint(path: Path) -> ModelSpec:
    """A model named by a transformer file or a ComfyUI models folder, with the profile and licence of the
    registered model of its size: a 9B file stays under the 9B licence whatever it is called."""
    parts, size = checkpoint_parts(path)
    family = REGISTRY[parts.base]
    where = str(path.resolve())
    kind = "fp8 " if parts.fp8 else ""
    found = ", ".join(p for p, f in (("text encoder", parts.text_encoder), ("VAE", parts.vae)) if f)
    return replace(family, name=where, source=where, parts=parts,
                   description=f"{kind}{'tiny' if size == 'tiny' else family.name} checkpoint"
                               + (f" with its {found}" if found else ""))


def transformer_width(spec: ModelSpec) -> int | None:
    """How wide `spec`'s transformer is (what a LoRA must have been trained for), or None where a local folder
    does not say."""
    if spec.is_tiny or spec.profile == "tiny":
        return TRANSFORMER_WIDTH["tiny"]
    if spec.parts or spec.is_hub:
        return TRANSFORMER_WIDTH[spec.profile.rsplit("-", 1)[-1]]
    try:
        config = json.loads((Path(spec.source) / "transformer" / "config.json").read_text(encoding="utf-8"))
        return int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pulled_path(cache_dir: Path, name: str) -> Path:
    """Where a model pulled from the fleet's bucket (`kiln models push`) is kept."""
    from schemas.capacity import model_key

    return cache_dir / "models" / "pulled" / model_key(name)


def tiny_small_decoder_path(cache_dir: Path) -> Path:
    """Where the tiny model's small decoder is built once."""
    return cache_dir / "models" / f"tiny-small-decoder-v{TINY_VERSION}"


def tiny_path(cache_dir: Path) -> Path:
    """Where the tiny model is built once and then loaded from."""
    return cache_dir / "models" / f"tiny-klein-v{TINY_VERSION}"


def base_files(parts: Parts) -> list[str]:
    """What a checkpoint takes from its registered model's hub folder: the configs, tokenizer and scheduler (a
    few MB), and each part the user's files do not hold."""
    patterns = ["model_index.json", "scheduler/*", "tokenizer/*", "*/config.json", "text_encoder/*.json"]
    return patterns + [f"{part}/*" for part, have in (("text_encoder", parts.text_encoder), ("vae", parts.vae))
                       if not have]


def hub_source(spec: ModelSpec) -> tuple[str, list[str] | None] | None:
    """The hub repository `spec` takes files from, and which (None: all), or None when it needs nothing from the
    hub (the tiny model, a local folder, a checkpoint of the tiny model)."""
    if spec.parts:
        base = REGISTRY[spec.parts.base]
        return None if base.is_tiny else (base.source, base_files(spec.parts))
    return (spec.source, None) if spec.is_hub else None


def weights_location(spec: ModelSpec, cache_dir: Path) -> Path | None:
    """Where `spec`'s weights are on this machine (for a checkpoint: its base folder, with its own files there
    too), or None. Looks only; downloads and builds nothing."""
    if spec.parts and not Path(spec.parts.transformer).is_file():
        return None
    pulled = pulled_path(cache_dir, spec.name)
    if not spec.parts and (pulled / "model_index.json").is_file():
        return pulled
    hub = hub_source(spec)
    if spec.is_tiny or (spec.parts and not hub):
        path = tiny_path(cache_dir)
    elif hub:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(hub[0], allow_patterns=hub[1], local_files_only=True))
        except (LocalEntryNotFoundError, OSError):
            return None
        if spec.parts and any(not (path / p.rstrip("/*")).is_dir() for p in hub[1] or () if p.endswith("/*")):
            return None
    else:
        path = Path(spec.source)
    return path if (path / "model_index.json").is_file() else None
