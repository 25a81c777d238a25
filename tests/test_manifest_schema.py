"""The published JSON Schema stays in step with the models and the parser."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from dispatcher.expand import Options, expand
from dispatcher.reader import parse_manifest
from schemas.errors import ManifestError
from schemas.manifest import FIELDS, SCHEMA_PATH, RowFields, manifest_json_schema

ROOT = Path(__file__).resolve().parent.parent


def test_published_schema_is_the_generated_one() -> None:
    published = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert published == manifest_json_schema(), "run `python -m schemas.manifest` to regenerate it"


def test_schema_fields_are_the_parsers_fields() -> None:
    assert tuple(RowFields.model_fields) == FIELDS
    row_schema = manifest_json_schema()["$defs"]["RowFields"]
    assert tuple(row_schema["properties"]) == FIELDS


def test_example_json_manifest_is_valid_under_the_schema() -> None:
    jsonschema.validate(json.loads((ROOT / "examples" / "lookbook.json").read_text()), manifest_json_schema())


# (document, accepted by both): the schema and the parser must agree on each.
AGREEMENT = [
    ([{"prompt": "x", "steps": 4, "Vendor": "North"}], True),
    ({"items": [{"id": "a"}], "prompt": "p {id}", "matrix": {"bg": ["w", 1]}}, True),
    ({"items": [{"prompt": "x"}], "defaults": {"width": 512, "height": 512}}, True),
    ([{"prompt": "x", "steps": 0}], False),
    ([{"prompt": "x", "width": 500}], False),
    ([{"prompt": "x", "guidance": 31}], False),
    ([{"prompt": "x", "count": 65}], False),
    ([{"prompt": "x", "seed": -1}], False),
    ([{"prompt": "x", "tags": ["a"]}], False),
    ([{"prompt": "x" * 2001}], False),
    ({"items": [{"prompt": "x"}], "extra": 1}, False),
    ({"items": [{"prompt": "x"}], "matrix": {"bg": [{"a": 1}]}}, False),
    ({"items": "nope"}, False),
]


@pytest.mark.parametrize(("document", "accepted"), AGREEMENT)
def test_schema_and_parser_agree(document: object, accepted: bool) -> None:
    try:
        jsonschema.validate(document, manifest_json_schema())
        schema_ok = True
    except jsonschema.ValidationError:
        schema_ok = False
    try:
        expand(parse_manifest(json.dumps(document).encode(), "m.json"), Options(batch="b", base_dir=ROOT))
        parser_ok = True
    except ManifestError:
        parser_ok = False
    assert (schema_ok, parser_ok) == (accepted, accepted)
