"""What a manifest may say: the fields of a row, the JSON document shape, and the bounds on both.

The published JSON Schema (`manifest.schema.json` beside this file) is generated from these models, and a
test keeps the two in step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, WithJsonSchema

from schemas.params import DEFAULT_QUALITY, Decoder, ImageFormat, format_name

# FLUX.2 [klein] pads prompts to 512 tokens; 2,000 characters of prose stays inside that window.
MAX_PROMPT_CHARS = 2000
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 256, 2048, 16
# Above 4,300 image tokens (16x16 px each) the pipeline switches to a very different sigma schedule,
# which Kiln has not validated; so the cap is just over one megapixel (1024x1072 fits, 1088x1088 does not).
MAX_IMAGE_TOKENS = 4300
MAX_PIXELS = MAX_IMAGE_TOKENS * SIDE_MULTIPLE * SIDE_MULTIPLE
MAX_STEPS, MAX_GUIDANCE, MAX_SEED, MAX_COUNT = 100, 30.0, 2**32 - 1, 64
MAX_JOBS = 100_000
MAX_ROWS = 100_000  # one 5,000-product catalog is 5,000 rows; a bigger one is split into batches
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_ID_CHARS = 200
DEFAULT_SIDE = 1024

Scalar = str | int | float | bool | None
LORA_SCALE = "a number from -4 to 4: how strongly the row's LoRAs apply; or one per LoRA, separated by | [1]"


def _scales(value: Any) -> Any:
    """lora_scale as people write it: one number, or one per LoRA separated by `|` ("0.8|0.5")."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split("|"))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (value,)
    return value


# Row fields, in the order `kiln export` writes them. Every other column is a template variable.
FIELDS = ("id", "prompt", "model", "width", "height", "steps", "guidance", "seed", "count", "output", "reference",
          "format", "lora", "lora_scale", "quality", "decoder")


class RowFields(BaseModel):
    """The fields of one manifest row (or of a document's `defaults`); any other key is a variable."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)
    __pydantic_extra__: dict[str, Scalar] = Field(init=False)

    id: Annotated[str | None, Field(max_length=MAX_ID_CHARS,
                                    description=f"row id, unique in the manifest: text of at most "
                                                f"{MAX_ID_CHARS} characters")] = None
    prompt: Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS,
                                        description=f"prompt or prompt template of at most "
                                                    f"{MAX_PROMPT_CHARS} characters")] = None
    model: Annotated[str | None, Field(description="a registered model name or a local diffusers folder")] = None
    width: Annotated[int | None, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE,
                                       description=f"a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to "
                                                   f"{MAX_SIDE}")] = None
    height: Annotated[int | None, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE,
                                        description=f"a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to "
                                                    f"{MAX_SIDE}")] = None
    steps: Annotated[int | None, Field(ge=1, le=MAX_STEPS,
                                       description=f"a whole number from 1 to {MAX_STEPS}")] = None
    guidance: Annotated[float | None, Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                            description=f"a number from 0 to {MAX_GUIDANCE:g}")] = None
    seed: Annotated[int | None, Field(ge=0, le=MAX_SEED,
                                      description=f"a whole number from 0 to {MAX_SEED}")] = None
    count: Annotated[int | None, Field(ge=1, le=MAX_COUNT,
                                       description=f"a whole number from 1 to {MAX_COUNT}")] = None
    output: Annotated[str | None, Field(description="output key template, relative to the storage prefix, "
                                                    "e.g. '{Vendor}/{id}.png'")] = None
    reference: Annotated[str | None, Field(description="reference image path, relative to the manifest; several "
                                                       "separated by |")] = None
    format: Annotated[ImageFormat | None, BeforeValidator(format_name),
                      Field(description="png, webp or jpeg (jpg): the output's format; the output key's extension "
                                        "follows it")] = None
    lora: Annotated[str | None, Field(description="a LoRA .safetensors file, relative to the manifest; several "
                                                  "separated by |")] = None
    lora_scale: Annotated[tuple[Annotated[float, Field(ge=-4.0, le=4.0, allow_inf_nan=False)], ...] | None,
                          BeforeValidator(_scales), Field(description=LORA_SCALE),
                          WithJsonSchema({"anyOf": [{"type": "number", "minimum": -4, "maximum": 4},
                                                    {"type": "string", "pattern": r"^[^|]+(\|[^|]+)*$"},
                                                    {"type": "null"}], "description": LORA_SCALE})] = None
    quality: Annotated[int | None, Field(ge=1, le=100, description=f"a whole number from 1 to 100: webp and jpeg "
                                                                    f"quality [{DEFAULT_QUALITY}]")] = None
    decoder: Annotated[Decoder | None, Field(description="full, or small: the FLUX.2 small decoder, about 1.4x "
                                                         "faster decoding [full]")] = None


class ManifestDocument(BaseModel):
    """A JSON manifest's object form: items, shared defaults, a prompt template and a matrix."""

    model_config = ConfigDict(extra="forbid")

    items: list[RowFields] = Field(description="the rows; each becomes one job per matrix combination and count")
    defaults: RowFields | None = Field(None, description="field and variable values for every item")
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="prompt template for every item")
    matrix: dict[str, list[Scalar]] | None = Field(
        None, description="variable name -> values; every item is rendered for every combination")


MANIFEST_ADAPTER: TypeAdapter[list[RowFields] | ManifestDocument] = TypeAdapter(list[RowFields] | ManifestDocument)
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of a JSON manifest (a list of rows, or a document), as published in schemas/."""
    schema = MANIFEST_ADAPTER.json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "Kiln manifest", **schema}


def describe(field: str) -> str:
    """The human description of a row field's legal values, for error messages."""
    info = RowFields.model_fields.get(field)
    return info.description or "" if info else ""


if __name__ == "__main__":  # regenerate the published schema: python -m schemas.manifest
    SCHEMA_PATH.write_text(json.dumps(manifest_json_schema(), indent=2) + "\n", encoding="utf-8")
