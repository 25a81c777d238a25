"""One storage contract, run against every backend chosen by URL (a folder, and S3 on a real S3 HTTP endpoint):
each key written once, another job's image never overwritten, a job's own earlier image replaced."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest

from schemas.errors import ConfigError
from schemas.job import JobSpec
from schemas.settings import KilnSettings, load_settings
from schemas.storage import KeyTakenError, Storage, open_storage
from tests.services import s3_server
from worker.encode import encode

AWS = {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_DEFAULT_REGION": "us-east-1"}


def image(job_id: str, shade: int) -> bytes:
    """A Kiln PNG of job `job_id`, as the renderer writes it."""
    job = JobSpec.of(job_id=job_id, attempt=1, batch_id="b", manifest="m.csv", manifest_row=1, row_id="r", model="tiny",
                  prompt="p", width=16, height=16, steps=4, guidance=1.0, seed=1, output_key="k.png")
    return encode(np.full((16, 16, 3), shade / 255), job, "bf16-resident")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with s3_server(tmp_path_factory.mktemp("s3")) as url:
        yield url


@pytest.fixture(params=["folder", "s3"])
def settings(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KilnSettings:
    if request.param == "folder":
        return load_settings(storage_url=str(tmp_path / "renders"))
    endpoint = request.getfixturevalue("endpoint")
    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    bucket = f"b{abs(hash(request.node.nodeid)) % 10**8}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return load_settings(storage_url=f"s3://{bucket}/shop", s3_endpoint_url=endpoint)


def read(storage: Storage, settings: KilnSettings, key: str) -> bytes:
    uri = storage.uri(key)
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://")).read_bytes()
    bucket, _, name = uri.removeprefix("s3://").partition("/")
    return bytes(boto3.client("s3", endpoint_url=settings.s3_endpoint_url).get_object(
        Bucket=bucket, Key=name)["Body"].read())


def test_a_key_is_written_once_and_never_over_another_jobs_image(settings: KilnSettings) -> None:
    storage = open_storage(settings)
    storage.check()
    first = image("job-a", 10)
    assert storage.put("cat/shoe.png", first, "job-a") == storage.uri("cat/shoe.png")
    with pytest.raises(KeyTakenError, match="already holds the image of job job-a: delete it or give this "
                                            "manifest another output template"):
        storage.put("cat/shoe.png", image("job-b", 200), "job-b")  # an edited row with the same output key
    assert read(storage, settings, "cat/shoe.png") == first
    again = image("job-a", 11)  # the same job rendered again (its first result was never recorded)
    storage.put("cat/shoe.png", again, "job-a")
    assert read(storage, settings, "cat/shoe.png") == again


def test_the_backend_follows_the_url_scheme(tmp_path: Path) -> None:
    from dispatcher.bucket import Bucket
    from worker.storage import LocalStorage

    assert isinstance(open_storage(load_settings(storage_url=str(tmp_path))), LocalStorage)
    assert isinstance(open_storage(load_settings(storage_url=(tmp_path / "x").as_uri())), LocalStorage)
    assert isinstance(open_storage(load_settings(storage_url="s3://bucket/prefix")), Bucket)
    with pytest.raises(ConfigError, match="no storage for gs:// URLs; use a folder or one of file://, s3://"):
        open_storage(load_settings(storage_url="gs://bucket/prefix"))


def test_a_folder_that_cannot_be_written_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="KILN_STORAGE_URL: cannot use"):
        open_storage(load_settings(storage_url=str(tmp_path / "file" / "renders"))).check()
