"""The render parameters are one object: every field decides the job id, every field but the per-image ones decides
the shape (which jobs share a pipeline call), and every field survives the jobs table and the wire. A field added
to RenderParams without a value below fails here, and then these checks hold for it too."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import select

from dispatcher import store
from schemas.job import JobSpec, JobStatus
from schemas.params import Lora, Reference, RenderParams, content_type
from schemas.tables import Job

BASE = RenderParams(model="tiny", prompt="a red shoe", width=512, height=512, steps=4, guidance=1.0, seed=7)
# For each field, a value other than BASE's (as the manifest could ask for it).
OTHER: dict[str, Any] = {"model": "tiny:klein-9b", "prompt": "a blue shoe", "width": 768, "height": 640,
                         "steps": 8, "guidance": 2.5, "seed": 8, "reference": "/refs/shoe.png",
                         "reference_sha256": "ab" * 32, "format": "webp", "quality": 80,
                         "more_references": (Reference(path="/refs/side.png", sha256="cd" * 32),),
                         "loras": (Lora(path="/loras/house.safetensors", sha256="ef" * 32, scale=0.8),),
                         "decoder": "small"}


def test_every_field_has_another_value_to_try() -> None:
    assert set(OTHER) == set(RenderParams.model_fields), "add the new field to OTHER"


@pytest.mark.parametrize("name", sorted(OTHER))
def test_every_field_changes_the_job_id(name: str) -> None:
    changed = BASE.model_copy(update={name: OTHER[name]})
    assert changed.job_id("k.png") != BASE.job_id("k.png")


@pytest.mark.parametrize("name", sorted(set(OTHER) - RenderParams.PER_IMAGE))
def test_every_field_but_prompt_and_seed_changes_the_shape(name: str) -> None:
    assert BASE.model_copy(update={name: OTHER[name]}).shape != BASE.shape


@pytest.mark.parametrize("name", sorted(RenderParams.PER_IMAGE))
def test_prompt_and_seed_leave_the_shape_so_jobs_share_a_call(name: str) -> None:
    assert BASE.model_copy(update={name: OTHER[name]}).shape == BASE.shape


def test_the_output_key_changes_the_job_id_and_not_the_shape() -> None:
    assert BASE.job_id("a.png") != BASE.job_id("b.png")


def test_ids_of_jobs_made_before_parameters_were_added_stand() -> None:
    """A parameter at its default adds nothing to the id: a catalog submitted again after an upgrade names the same
    jobs, and renders nothing twice. (The id as the first release computed it, for a fixed job.)"""
    first_release = hashlib.sha256(json.dumps(["tiny", "a red shoe", 512, 512, 4, 1.0, 7, "cat/shoe.png", None],
                                              ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()[:32]
    assert BASE.job_id("cat/shoe.png") == first_release


def test_every_field_survives_the_jobs_table_and_the_wire(database_url: str) -> None:
    params = RenderParams(**OTHER)
    sessions = store.open_database(database_url)
    now = datetime(2026, 1, 1)
    with sessions.begin() as session:
        session.add(Job(id="j", output_key="k.webp", status=JobStatus.QUEUED, attempts=0, created_at=now,
                        updated_at=now, **params.columns()))
    with sessions() as session:
        row = session.scalars(select(Job)).one()
        assert RenderParams.of_row(row) == params
        assert row.shape == params.shape
    spec = JobSpec(job_id="j", attempt=1, batch_id="b", manifest="m", manifest_row=1, row_id="r", output_key="k",
                   params=params)
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_exports_get_one_plain_value_per_parameter() -> None:
    flat = RenderParams(**OTHER).flat()
    assert (flat["reference"], flat["reference_sha256"]) == (
        "/refs/shoe.png|/refs/side.png", "ab" * 32 + "|" + "cd" * 32)
    assert all(v is None or isinstance(v, str | int | float) for v in flat.values())
    assert set(flat) == set(RenderParams.model_fields) - {"more_references", "loras"} | {"lora", "lora_scale"}
    assert (flat["lora"], flat["lora_scale"]) == ("/loras/house.safetensors", "0.8")


def test_content_types_follow_the_key() -> None:
    assert [content_type(k) for k in ("a/b.png", "a/b.webp", "a/b.JPG", "a/b.jpeg", "a.b/c")] == [
        "image/png", "image/webp", "image/jpeg", "image/jpeg", "image/png"]
