"""The model registry: names users type, where the weights come from, call defaults and licences."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

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
    if not index.is_file():
        raise ModelError(f"model folder {name!r} has no model_index.json: point at a diffusers folder "
                         "(one made by `hf download black-forest-labs/FLUX.2-klein-4B --local-dir DIR`)")
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


def tiny_path(cache_dir: Path) -> Path:
    """Where the tiny model is built once and then loaded from."""
    return cache_dir / "models" / f"tiny-klein-v{TINY_VERSION}"


def weights_location(spec: ModelSpec, cache_dir: Path) -> Path | None:
    """Where `spec`'s weights are on this machine, or None. Looks only; downloads and builds nothing."""
    if spec.is_tiny:
        path = tiny_path(cache_dir)
    elif spec.is_hub:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(spec.source, local_files_only=True))
        except (LocalEntryNotFoundError, OSError):
            return None
    else:
        path = Path(spec.source)
    return path if (path / "model_index.json").is_file() else None
