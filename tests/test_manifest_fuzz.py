"""Property tests: whatever bytes or rows come in, the result is a valid batch or Kiln's own ManifestError."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.expand import Options, expand
from dispatcher.reader import parse_manifest
from schemas.errors import ManifestError
from schemas.keys import key_problem
from schemas.manifest import MAX_PIXELS, MAX_PROMPT_CHARS

OPTIONS = Options(batch="b", base_dir=Path("/nonexistent"), max_jobs=200)
FIELD_NAMES = ["prompt", "id", "model", "width", "height", "steps", "guidance", "seed", "count", "output", "x", "{y}"]
VALUES = st.one_of(st.text(max_size=20), st.integers(-5, 5000), st.floats(), st.none(), st.booleans())


def batch_or_manifest_error(data: bytes, name: str) -> None:
    try:
        jobs = expand(parse_manifest(data, name), OPTIONS).jobs
    except ManifestError as exc:
        assert str(exc)  # always says something
        return
    assert jobs
    assert len({j.output_key for j in jobs}) == len(jobs)
    for job in jobs:
        assert key_problem(job.output_key) is None
        assert job.params.width * job.params.height <= MAX_PIXELS and len(job.params.prompt) <= MAX_PROMPT_CHARS
        assert 0 <= job.params.seed < 2**32 and 1 <= job.params.steps <= 100


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=400), st.sampled_from(["m.csv", "m.tsv", "m.json", "m.jsonl", "m"]))
def test_arbitrary_bytes_never_crash_the_reader(data: bytes, name: str) -> None:
    batch_or_manifest_error(data, name)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.dictionaries(st.sampled_from(FIELD_NAMES), VALUES, max_size=6), min_size=1, max_size=5))
def test_arbitrary_rows_give_a_valid_batch_or_a_manifest_error(rows: list[dict[str, object]]) -> None:
    batch_or_manifest_error(json.dumps(rows).encode(), "m.json")
