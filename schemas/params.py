"""The render parameters: everything that decides one image, in one object.

The job id, the shape that decides which jobs may share a pipeline call, the database columns and the
renderer's call are all derived from `RenderParams`, so a parameter is added in one place (with its manifest
column, its expansion and its use in the renderer) and cannot be left out of the id or the shape by mistake
(tests/test_params.py changes each field in turn and checks both).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

ImageFormat = Literal["png", "webp", "jpeg"]
Decoder = Literal["full", "small"]
EXTENSIONS: dict[str, str] = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}  # what a format's keys end in
FORMAT_OF_SUFFIX: dict[str, ImageFormat] = {".png": "png", ".webp": "webp", ".jpg": "jpeg", ".jpeg": "jpeg"}
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
MAX_LORAS = 4  # Kiln's cap on LoRAs per job
MAX_REFERENCES = 4  # Kiln's cap: each reference adds up to 4,096 image tokens to every step of every image
DEFAULT_QUALITY = 90  # webp and jpeg when the manifest names none: a studio shot without visible artefacts


def format_name(value: Any) -> Any:
    """A format as people write it (any case, jpg for jpeg) as Kiln names it; anything else passes unchanged, for
    validation to refuse."""
    if isinstance(value, str):
        value = value.strip().lower()
        return "jpeg" if value == "jpg" else value
    return value


def named_format(key: str) -> ImageFormat | None:
    """The image format a key's extension names (`.png`, `.webp`, `.jpg`, `.jpeg`, any case), or None."""
    name = key.rsplit("/", 1)[-1]
    return FORMAT_OF_SUFFIX.get(name[name.rfind("."):].lower()) if "." in name else None


def content_type(key: str) -> str:
    """The Content-Type of an output at `key`, from its extension (PNG where it names no image format)."""
    return CONTENT_TYPES[named_format(key) or "png"]


class Reference(BaseModel):
    """A file a job refers to (a reference image; a LoRA is one too): where it is on the machine that renders,
    and its content."""

    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str


class Lora(Reference):
    """One LoRA: its safetensors file on the machine that renders, its content, and how strongly it applies."""

    scale: float = 1.0


class RenderParams(BaseModel):
    """What decides one image. Fields with a default are optional to the renderer; a field at its default adds
    nothing to the job id or the shape, so a parameter added later leaves every earlier job's id as it was."""

    model_config = ConfigDict(frozen=True)

    model: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    reference: str | None = None  # a path on the machine that renders
    reference_sha256: str | None = None  # its content: the id counts it, and workers fetch it by it
    more_references: tuple[Reference, ...] = ()  # the second and later reference images, in order
    format: ImageFormat = "png"
    quality: int | None = None  # webp and jpeg: 1-100
    loras: tuple[Lora, ...] = ()  # applied to the transformer, in order
    decoder: Decoder = "full"  # small: FLUX.2-small-decoder, about 1.4x faster decoding, slightly softer detail

    # The parameters that differ image by image within one pipeline call; every other field is the shape.
    PER_IMAGE: ClassVar[frozenset[str]] = frozenset({"prompt", "seed"})
    # The first release's parameters: each has a column of its own in the jobs table, and they enter ids in this
    # order. Later parameters travel in the table's `params` JSON column and enter ids by name.
    COLUMNS: ClassVar[tuple[str, ...]] = ("model", "prompt", "width", "height", "steps", "guidance", "seed",
                                          "reference", "reference_sha256")

    def later(self) -> dict[str, Any]:
        """The parameters added after the first release that are not at their default, by name, as JSON values."""
        names = {name for name, info in type(self).model_fields.items()
                 if name not in self.COLUMNS and getattr(self, name) != info.default}
        return self.model_dump(mode="json", include=names) if names else {}

    def job_id(self, output_key: str) -> str:
        """The id of the job that makes this image at `output_key`. The reference counts by path and content, so
        an image edited in place is a new job."""
        reference = (f"{self.reference}#{self.reference_sha256}" if self.reference or self.reference_sha256
                     else None)
        parts: list[Any] = [self.model, self.prompt, self.width, self.height, self.steps, self.guidance, self.seed,
                            output_key, reference]
        later = self.later()
        return _hash(parts + [later] if later else parts)

    @property
    def shape(self) -> str:
        """Jobs with equal shapes can share one pipeline call: every field but the per-image ones, hashed."""
        parts: list[Any] = [getattr(self, name) for name in self.COLUMNS if name not in self.PER_IMAGE]
        later = {k: v for k, v in self.later().items() if k not in self.PER_IMAGE}
        return _hash(parts + [later] if later else parts)

    @property
    def reference_files(self) -> list[Reference]:
        """Every reference image, the first included, in the order the manifest gave them."""
        first = [Reference(path=self.reference, sha256=self.reference_sha256 or "")] if self.reference else []
        return first + list(self.more_references)

    @property
    def references(self) -> int:
        """How many reference images the call conditions on (what the memory plan counts)."""
        return len(self.reference_files)

    def with_files(self, references: list[str], loras: list[str]) -> RenderParams:
        """The same parameters with the reference images and LoRAs found at these paths (on this machine)."""
        files = self.reference_files
        assert len(references) == len(files) and len(loras) == len(self.loras), "one path per file"
        return self.model_copy(update={
            "reference": references[0] if references else None,
            "more_references": tuple(Reference(path=p, sha256=f.sha256)
                                     for p, f in zip(references[1:], files[1:], strict=True)),
            "loras": tuple(lora.model_copy(update={"path": p}) for p, lora in zip(loras, self.loras, strict=True))})

    def flat(self) -> dict[str, Any]:
        """One plain value per parameter, as a manifest writes them (for exports): the references as one
        `|`-separated column of paths and one of their SHA-256s."""
        files = self.reference_files
        return {**self.model_dump(exclude={"reference", "reference_sha256", "more_references", "loras"}),
                "reference": "|".join(f.path for f in files) or None,
                "reference_sha256": "|".join(f.sha256 for f in files) or None,
                "lora": "|".join(lora.path for lora in self.loras) or None,
                "lora_scale": "|".join(f"{lora.scale:g}" for lora in self.loras) or None}

    def columns(self) -> dict[str, Any]:
        """The jobs table's values for these parameters (schemas.tables.Job)."""
        return {**{name: getattr(self, name) for name in self.COLUMNS}, "params": self.later() or None,
                "shape": self.shape}

    @classmethod
    def of_row(cls, row: Any) -> RenderParams:
        """The parameters of a jobs-table row (the inverse of `columns`)."""
        return cls(**{name: getattr(row, name) for name in cls.COLUMNS}, **(row.params or {}))


def _hash(parts: list[Any]) -> str:
    blob = json.dumps(parts, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
