"""The fleet on real services: a dispatcher and workers of 8, 16 and 24 GB render a mixed 4B/9B manifest
through Celery on a private Redis, into a real S3 HTTP endpoint, recorded in PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from schemas.models import tiny_path
from schemas.tables import Attempt, Job, Output
from tests.fleet_harness import AWS, AWS_SECRET, BUCKET, DB_PASSWORD, KILN, REDIS_PASSWORD, Fleet, running_fleet
from tests.services import s3_server
from tests.test_lora import make_lora
from tests.test_webhooks import SECRET, Receiver
from worker.encode import read_parameters

WORKERS = {"w8": 8, "w16": 16, "w24": 24}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.shutdown()


@pytest.fixture
def fleet(tmp_path: Path, postgres_url: str, cache_dir: Path, receiver: Receiver) -> Iterator[Fleet]:
    with running_fleet(tmp_path, postgres_url, cache_dir) as running:
        running.dispatcher(KILN_WEBHOOK_URL=receiver.url, KILN_WEBHOOK_SECRET=SECRET)
        yield running


def test_mixed_manifest_is_rendered_by_workers_that_fit_into_the_bucket(fleet: Fleet, receiver: Receiver) -> None:
    rows = "".join(f"s{i},small thing {i},tiny:klein-4b\n" for i in range(8))
    rows += "".join(f"b{i},big thing {i},tiny:klein-9b\n" for i in range(8))
    batch_id = fleet.submit("id,prompt,model\n" + rows, "--non-commercial")
    for name, vram in WORKERS.items():
        fleet.worker(name, vram, dispatchers_env=name == "w8")  # settings a worker does not use change nothing
    fleet.wait_quiet(16, 240)
    assert fleet.check() == {"succeeded": 16, "dead": 0, "lost_or_failed_attempts": 0}

    with fleet.engine.connect() as conn:
        jobs = {j.id: j for j in conn.execute(select(Job))}
        ran_on = {a.job_id: a.worker for a in conn.execute(select(Attempt).where(Attempt.status == "succeeded"))}
        outputs = list(conn.execute(select(Output)))
    assert len(ran_on) == 16 and all(o.sha256 for o in outputs)
    big = {jid for jid, j in jobs.items() if j.model == "tiny:klein-9b"}
    assert all(ran_on[jid] in ("w16", "w24") for jid in big), "a 9B job ran on a card too small for it"
    assert any(ran_on[jid] == "w8" for jid in jobs if jid not in big), "the 8 GB card took no 4B work"

    fleet.wait_until(lambda: all(w["loaded_model"] and w["seconds_per_image"] for w in fleet.workers().values()),
                     30, "heartbeats naming the loaded models")
    assert {n: (w["vram_gb"], w["models"]) for n, w in fleet.workers().items()} == {
        "w8": (8.0, ["tiny", "tiny:klein-4b"]), "w16": (16.0, ["tiny:klein-9b", "tiny", "tiny:klein-4b"]),
        "w24": (24.0, ["tiny:klein-9b", "tiny", "tiny:klein-4b"])}
    assert "this card (cpu 8.0 GiB) fits no klein-9b work" in fleet.workers()["w8"]["unserved"]["tiny:klein-9b"]
    status = json.loads(fleet.kiln("status", batch_id, "--json"))
    assert status["counts"]["succeeded"] == 16 and status["unfit"] == [] and status["failures"] == []
    fleet.wait_until(lambda: "batch.finished" in receiver.kinds(), 30, "the batch.finished webhook")
    [finished] = [r for r in receiver.received if r["event"] == "batch.finished"]
    assert finished["signed"] and finished["body"]["data"]["counts"]["succeeded"] == 16
    with urllib.request.urlopen(fleet.metrics_url, timeout=10) as response:  # what Prometheus scrapes
        metrics = response.read().decode()
    assert 'kiln_jobs{status="succeeded"} 16.0' in metrics and "kiln_images_total 16.0" in metrics
    assert all(f'kiln_worker_online{{worker="{name}"}} 1.0' in metrics for name in WORKERS), metrics
    assert 'kiln_worker_seconds_per_image{worker="w24"}' in metrics
    assert re.search(r"^kiln_reports_waiting \d+\.0$", metrics, re.M), metrics
    assert sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("kiln_worker_images_total{")) == 16

    inspect = subprocess.run([sys.executable, "-m", "celery", "-A", "schemas.broker", "inspect", "active_queues",
                              "--timeout", "5"], env=fleet.env, cwd=fleet.tmp, capture_output=True, text=True,
                             timeout=60)
    assert "w24@" in inspect.stdout and "kiln.render.tiny" in inspect.stdout, inspect.stdout + inspect.stderr
    w8_section = inspect.stdout.split("w8@", 1)[1].split("->", 1)[0]
    assert "kiln.render.tiny" in w8_section and "vram16" not in w8_section and "klein-9b" not in w8_section

    fleet.kiln("export", batch_id, "-o", "plain.csv")
    printed = fleet.everything_printed()
    for secret in (REDIS_PASSWORD, AWS_SECRET, DB_PASSWORD, SECRET, "X-Amz-Signature", "X-Amz-Credential"):
        assert secret not in printed, f"{secret} leaked into a log, an error, a status or an export"

    fleet.kiln("export", batch_id, "--presign", "600", "-o", "out.jsonl")  # signed links only when asked for
    first = json.loads((fleet.tmp / "out.jsonl").read_text().splitlines()[0])
    with urllib.request.urlopen(first["kiln_download_url"]) as response:
        assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jobs_that_no_worker_fits_are_named_in_status(fleet: Fleet) -> None:
    batch_id = fleet.submit("id,prompt,model\nbig,x,tiny:klein-9b\n", "--non-commercial")
    fleet.worker("w8", 8)
    fleet.wait_until(lambda: bool(json.loads(fleet.kiln("workers", "--json"))), 60, "the worker's first heartbeat")
    status = json.loads(fleet.kiln("status", batch_id, "--json"))
    assert status["unfit"] == [{"row_id": "big", "count": 1, "reason": "needs a 16 GB card for klein-9b at 1.05 MP; "
                                                                         "the largest worker takes 8 GB work"}]


def _aws() -> dict[str, str]:
    return {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


def test_embedded_render_writes_to_s3_with_verified_objects(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    with s3_server(tmp_path) as endpoint:
        boto3.client("s3", endpoint_url=endpoint, **_aws()).create_bucket(Bucket=BUCKET)
        env = {**kiln_env, **AWS, "KILN_STORAGE_URL": f"s3://{BUCKET}/shop", "KILN_S3_ENDPOINT_URL": endpoint}
        (tmp_path / "m.csv").write_text("id,prompt,width,height\na,x,256,256\nb,y,256,256\n")
        done = subprocess.run([KILN, "render", "m.csv", "--model", "tiny", "--json"], env=env, cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert '"storage": "s3://kiln-test/shop"' in done.stdout
        s3 = boto3.client("s3", endpoint_url=endpoint, **_aws())
        assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]) == ["shop/m/a.png",
                                                                                            "shop/m/b.png"]
        sheet = subprocess.run([KILN, "export", json.loads(done.stdout)["batch_id"], "--contact-sheet", "s.html"],
                               env=env, cwd=tmp_path, capture_output=True, text=True)
        assert "contact sheet of 2 jobs (2 images)" in sheet.stderr, sheet.stderr  # read back from the bucket
        missing = subprocess.run([KILN, "render", "m.csv", "--model", "tiny"], capture_output=True, text=True,
                                 env={**env, "KILN_STORAGE_URL": "s3://no-such-bucket/x"}, cwd=tmp_path)
        assert missing.returncode == 2 and "cannot reach bucket 'no-such-bucket'" in missing.stderr
        assert "may list s3://no-such-bucket/x/ (s3:ListBucket on the prefix)" in missing.stderr


def test_reference_images_and_a_lora_travel_with_their_jobs_and_the_output_is_webp(fleet: Fleet) -> None:
    packshots = fleet.tmp / "packshots"
    packshots.mkdir()
    Image.fromarray(np.full((300, 200, 3), 180, dtype=np.uint8)).save(packshots / "mug.png")
    Image.fromarray(np.full((200, 300, 3), 90, dtype=np.uint8)).save(packshots / "mug-side.jpg")
    sha = hashlib.sha256((packshots / "mug.png").read_bytes()).hexdigest()
    side = hashlib.sha256((packshots / "mug-side.jpg").read_bytes()).hexdigest()
    lora = make_lora(fleet.tmp / "house-style")
    house = hashlib.sha256(lora.read_bytes()).hexdigest()
    fleet.submit("id,prompt,reference,lora,lora_scale,width,height,format\n"
                 "mug,a mug,packshots/mug.png|packshots/mug-side.jpg,house-style/pytorch_lora_weights.safetensors,"
                 "0.8,256,256,webp\n", "--model", "tiny")
    shutil.rmtree(packshots)  # gone from where they were submitted: only the bucket has them
    shutil.rmtree(fleet.tmp / "house-style")
    fleet.worker("w1", 16)
    fleet.wait_quiet(1, 120)
    assert fleet.check() == {"succeeded": 1, "dead": 0, "lost_or_failed_attempts": 0}
    listed = fleet.s3.list_objects_v2(Bucket=BUCKET, Prefix="renders/_references/")["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(  # stored once each, by content
        [f"renders/_references/{sha}.png", f"renders/_references/{side}.jpg",
         f"renders/_references/{house}.safetensors"])
    # the output in the format the row asked for, named and typed for it, its parameters where image readers look
    [output] = [o["Key"] for o in fleet.s3.list_objects_v2(Bucket=BUCKET, Prefix="renders/")["Contents"]
                if "/_references/" not in o["Key"]]
    assert output.endswith("/mug.webp")
    assert fleet.s3.head_object(Bucket=BUCKET, Key=output)["ContentType"] == "image/webp"
    data = fleet.s3.get_object(Bucket=BUCKET, Key=output)["Body"].read()
    assert Image.open(io.BytesIO(data)).format == "WEBP"
    params = json.loads(read_parameters(data)["kiln"])["params"]
    assert (params["reference_sha256"], [r["sha256"] for r in params["more_references"]]) == (sha, [side])
    assert [(lo["sha256"], lo["scale"]) for lo in params["loras"]] == [(house, 0.8)]


def test_a_reference_that_never_reached_the_bucket_is_bad_input(fleet: Fleet, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from dispatcher.bucket import Bucket
    from schemas.errors import RenderError
    from worker.upload import fetch_reference

    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    bucket = Bucket(f"s3://{BUCKET}/renders", fleet.endpoint)
    url = bucket.download_url("_references/" + "0" * 64 + ".png", 60)
    with pytest.raises(RenderError, match="the reference image is not in the bucket: submit the batch again") as caught:
        fetch_reference(url, "0" * 64, ".png", tmp_path, timeout=3, budget=5)
    assert caught.value.kind == "bad_input"
    with pytest.raises(RenderError, match="the LoRA house.safetensors is not in the bucket") as caught:
        fetch_reference(url, "0" * 64, ".png", tmp_path, timeout=3, budget=5, what="the LoRA house.safetensors")
    assert caught.value.kind == "bad_input"


def test_cancel_mid_batch_reaches_published_messages_and_leaves_no_image_without_its_row(fleet: Fleet) -> None:
    rows = "id,prompt\n" + "".join(f"p{i},product {i}\n" for i in range(20))  # 1024x1024: about a second each
    batch_id = fleet.submit(rows, "--model", "tiny")
    fleet.worker("w1", 16)
    fleet.worker("w2", 16)
    fleet.wait_until(lambda: fleet.count(Job.status == "succeeded") >= 3, 120, "three images")
    fleet.kiln("batch", "cancel", batch_id)
    fleet.wait_until(lambda: fleet.count(Job.status.in_(["queued", "running"])) == 0, 120, "the batch to settle")
    summary = fleet.check(cancelled=True)
    assert summary["cancelled"] >= 10 and summary["succeeded"] + summary["cancelled"] == 20
    logs = "".join((fleet.tmp / f"{w}.log").read_text() for w in ("w1", "w2"))
    assert "was withdrawn (its batch cancelled or paused): not rendered" in logs  # the published ones


def _hub_cache(root: Path, tiny: Path, broken: bool = False) -> Path:
    """A Hugging Face cache holding klein-4b as a download would leave it, with the tiny model's weights (or, when
    `broken`, a download cut short: the transformer's weights missing)."""
    repo = root / "hub" / "models--black-forest-labs--FLUX.2-klein-4B"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    if broken:
        for weights in (repo / "snapshots" / revision / "transformer").glob("*.safetensors"):
            weights.unlink()
    return root


def test_only_workers_with_a_models_weights_get_its_jobs_and_a_broken_copy_charges_nothing(
        fleet: Fleet, cache_dir: Path) -> None:
    tiny = tiny_path(cache_dir)
    batch_id = fleet.submit("id,prompt,width,height\n" + "".join(f"p{i},product {i},256,256\n" for i in range(6)),
                            "--model", "klein-4b")
    fleet.worker("none", 16, models="klein-4b,tiny", HF_HOME=str(fleet.tmp / "empty-hf"))
    fleet.worker("broken", 16, models="klein-4b,tiny",
                 HF_HOME=str(_hub_cache(fleet.tmp / "broken-hf", tiny, broken=True)))
    fleet.wait_until(lambda: fleet.count(Job.status == "queued") == 6 and "broken" in _attempts(fleet)
                     and "klein-4b" in fleet.workers().get("broken", {}).get("unserved", {}), 120,
                     "the broken copy to fail and be dropped")
    workers = fleet.workers()
    assert "could not be downloaded" in workers["none"]["unserved"]["klein-4b"]  # checked at start, never taken
    assert "cannot load klein-4b" in workers["broken"]["unserved"]["klein-4b"]
    assert workers["none"]["models"] == workers["broken"]["models"] == ["tiny"]
    [unfit] = json.loads(fleet.kiln("status", batch_id, "--json"))["unfit"][:1]
    assert unfit["reason"].startswith("no worker has klein-4b: start one with `kiln worker --models klein-4b`")

    fleet.worker("good", 16, models="klein-4b", HF_HOME=str(_hub_cache(fleet.tmp / "good-hf", tiny)))
    fleet.wait_quiet(6, 180)
    assert fleet.check() == {"succeeded": 6, "dead": 0, "lost_or_failed_attempts": 0}  # nothing charged
    attempts = _attempts(fleet)
    assert attempts["good"] == ["succeeded"] * 6 and "none" not in attempts
    assert attempts["broken"] == ["worker"]  # one failed load; what it took after that went back untouched


def _attempts(fleet: Fleet) -> dict[str, list[str]]:
    """Each worker's attempts' statuses, oldest first."""
    found: dict[str, list[str]] = {}
    with fleet.engine.connect() as conn:
        for attempt in conn.execute(select(Attempt).order_by(Attempt.started_at, Attempt.number)):
            found.setdefault(attempt.worker, []).append(attempt.status)
    return found


def test_a_two_model_batch_costs_each_worker_at_most_one_load_per_model(fleet: Fleet) -> None:
    rows = "".join(f"a{i},thing {i},tiny:klein-4b,512,512\nb{i},thing {i},tiny:klein-9b,512,512\n" for i in range(9))
    fleet.submit("id,prompt,model,width,height\n" + rows, "--non-commercial")
    for name in ("w1", "w2", "w3"):
        fleet.worker(name, 16, models="tiny:klein-4b,tiny:klein-9b")
    fleet.wait_quiet(18, 240)
    assert fleet.check() == {"succeeded": 18, "dead": 0, "lost_or_failed_attempts": 0}
    rendered = _attempts(fleet)
    fleet.wait_until(lambda: all(sum(fleet.workers()[w]["model_loads"].values()) >= 1 for w in rendered), 30,
                     "heartbeats with the model loads")
    loads = {name: w["model_loads"] for name, w in fleet.workers().items()}
    assert all(set(w["load_seconds"]) == set(w["model_loads"]) for w in fleet.workers().values())
    print(f"model loads per worker for an 18-job batch of two models: {loads}")  # the figure the issue asks for
    assert all(n <= 1 for per_model in loads.values() for n in per_model.values()), loads


def test_a_worker_renders_a_message_of_several_jobs_in_one_call_each_with_its_own_seed_and_upload(
        tmp_path: Path, postgres_url: str, cache_dir: Path) -> None:
    with running_fleet(tmp_path, postgres_url, cache_dir) as fleet:
        fleet.dispatcher(KILN_BATCH_SIZE="4")
        rows = "".join(f"p{i},product {i},256,256,{100 + i}\n" for i in range(8))
        fleet.submit("id,prompt,width,height,seed\n" + rows, "--model", "tiny")
        fleet.worker("w1", 16)
        fleet.wait_quiet(8, 120)
        assert fleet.check() == {"succeeded": 8, "dead": 0, "lost_or_failed_attempts": 0}
        log = (fleet.tmp / "w1.log").read_text()
        assert log.count("4 images of tiny at 256x256 in one pipeline call") == 2, log
        assert "1 image of" not in log
        outputs = {}
        for obj in fleet.s3.list_objects_v2(Bucket=BUCKET, Prefix="renders/")["Contents"]:
            data = fleet.s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
            params = json.loads(read_parameters(data)["kiln"])
            outputs[params["row_id"]] = (params["params"]["seed"], hashlib.sha256(data).hexdigest())
        assert {row: seed for row, (seed, _) in outputs.items()} == {f"p{i}": 100 + i for i in range(8)}
        assert len({digest for _, digest in outputs.values()}) == 8  # eight images, none stored twice
