"""Models synced to the fleet: `kiln models push` puts a model's files in the bucket once (moto's S3 server), the
dispatcher hands workers a signed sheet through Redis (a private redis-server), and a worker without the model
pulls it from there, file by file checked, before it subscribes. The tiny model's diffusers folder stands in for
klein-4b's (same layout, kilobytes instead of 16 GB)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis

from dispatcher import usecases
from dispatcher.bucket import Bucket
from schemas.errors import ConfigError, ModelError
from schemas.messages import ModelSheet, model_sheet_key
from schemas.models import REGISTRY, pulled_path, weights_location
from schemas.settings import KilnSettings, load_settings
from tests.services import redis_server, s3_server
from worker.fleet import FleetWorker
from worker.pull import pull_model
from worker.tiny import ensure_tiny


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KilnSettings]:
    for k, v in {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    with s3_server(tmp_path) as endpoint, redis_server(tmp_path) as broker:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="shop")
        yield load_settings(storage_url="s3://shop/renders", s3_endpoint_url=endpoint, broker_url=broker.url,
                            cache_dir=tmp_path / "pusher-cache", device="cpu")


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def test_a_pushed_model_reaches_a_worker_that_lacks_it_exactly(fleet: KilnSettings, cache_dir: Path,
                                                                 tmp_path: Path) -> None:
    source = ensure_tiny(cache_dir)
    said: list[tuple[str, bool]] = []
    sheet = usecases.push_model("klein-4b", source, fleet, lambda path, _size, sent: said.append((path, sent)))
    assert {f.path: f.sha256 for f in sheet.files} == digests(source)
    assert said and all(sent for _, sent in said)
    said.clear()
    usecases.push_model("klein-4b", source, fleet, lambda path, _size, sent: said.append((path, sent)))
    assert said and not any(sent for _, sent in said)  # a second push sends nothing again

    broker = redis.Redis.from_url(fleet.broker_url or "")
    offered = ModelSheet.model_validate_json(broker.get(model_sheet_key("klein-4b")) or b"")
    assert all(f.url.startswith("http") for f in offered.files)  # signed links: the worker holds no keys

    # A worker with no weights for klein-4b pulls them while it prepares, then serves the model.
    worker_cache = tmp_path / "worker-cache"
    assert weights_location(REGISTRY["klein-4b"], worker_cache) is None
    settings = fleet.model_copy(update={"cache_dir": worker_cache, "models": "klein-4b", "vram": 8.0})
    state = FleetWorker(settings, "pc-1").state
    assert state.beat.models == ["klein-4b"], state.beat.unserved
    pulled = weights_location(REGISTRY["klein-4b"], worker_cache)
    assert pulled == pulled_path(worker_cache, "klein-4b") and digests(pulled) == digests(source)

    # The dispatcher renews the sheet (its links expire) from what the bucket holds.
    broker.delete(model_sheet_key("klein-4b"))
    bucket = Bucket.from_settings(fleet)
    assert usecases.share_models(bucket, broker) == 1
    assert broker.get(model_sheet_key("klein-4b"))


def test_a_file_changed_in_the_bucket_fails_the_pull_and_leaves_nothing(fleet: KilnSettings, cache_dir: Path,
                                                                        tmp_path: Path) -> None:
    usecases.push_model("klein-4b", ensure_tiny(cache_dir), fleet)
    boto3.client("s3", endpoint_url=fleet.s3_endpoint_url).put_object(
        Bucket="shop", Key="renders/_models/klein-4b/vae/config.json", Body=b'{"tampered": true}')
    broker = redis.Redis.from_url(fleet.broker_url or "")
    sheet = ModelSheet.model_validate_json(broker.get(model_sheet_key("klein-4b")) or b"")
    worker_cache = tmp_path / "worker-cache"
    with pytest.raises(ModelError, match=r"vae/config.json of klein-4b did not arrive as it was pushed"):
        pull_model(sheet, worker_cache, timeout=10)
    assert not any((worker_cache / "models" / "pulled").iterdir())  # no half folder, no staging left


def test_push_says_what_is_wrong(fleet: KilnSettings, cache_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="takes a registered model"):
        usecases.push_model("./some/folder", None, fleet)
    with pytest.raises(ModelError, match=r"not on this machine: `hf download black-forest-labs/FLUX.2-klein-4B`"):
        usecases.push_model("klein-4b", None, fleet)
    with pytest.raises(ModelError, match="holds a tiny-shaped|holds a klein-4b model, not klein-9b"):
        usecases.push_model("klein-9b", ensure_tiny(cache_dir), fleet)
    with pytest.raises(ConfigError, match="needs the fleet's bucket"):
        usecases.push_model("klein-4b", ensure_tiny(cache_dir), fleet.model_copy(update={"storage_url": str(tmp_path)}))


def test_the_push_command_reports_each_file_and_resumes(fleet: KilnSettings, cache_dir: Path,
                                                        kiln_env: dict[str, str], tmp_path: Path) -> None:
    from tests.test_cli import kiln

    env = {**kiln_env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")},
           "KILN_STORAGE_URL": fleet.storage_url, "KILN_S3_ENDPOINT_URL": fleet.s3_endpoint_url or "",
           "KILN_BROKER_URL": fleet.broker_url or ""}
    first = kiln("models", "push", "klein-4b", "--from", str(ensure_tiny(cache_dir)), cwd=tmp_path, env=env)
    assert "uploaded: transformer/config.json" in first.stdout
    assert "pushed klein-4b:" in first.stdout and "workers are told at once" in first.stdout
    again = kiln("models", "push", "klein-4b", "--from", str(ensure_tiny(cache_dir)), cwd=tmp_path, env=env)
    assert "already there: transformer/config.json" in again.stdout and "(0.00 GB uploaded now)" in again.stdout
    wrong = kiln("models", "push", "klein-4b", cwd=tmp_path, env=env, check=1)
    assert "not on this machine" in wrong.stderr + wrong.stdout


def test_a_worker_account_reads_the_sheets_and_cannot_change_them(tmp_path: Path) -> None:
    # Workers may write under kiln.render.*; a sheet there would let a stolen worker password send every worker
    # to other files. Sheets live under kiln.models.*, which the worker's rules make read-only.
    from schemas.broker import WORKER_ACL

    with redis_server(tmp_path, users=[f"kiln-worker on >w {WORKER_ACL}"]) as server:
        redis.Redis.from_url(server.url).set(model_sheet_key("klein-4b"), "{}")
        worker = redis.Redis.from_url(server.url_for("kiln-worker:w"))
        assert worker.get(model_sheet_key("klein-4b")) == b"{}"
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.set(model_sheet_key("klein-4b"), '{"model": "klein-4b", "files": []}')
