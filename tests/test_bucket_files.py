"""A LoRA (or reference image) named by bucket URI: the dispatcher reads it with the fleet's bucket credentials
(moto's S3 server), checks it like a file, and the job counts it by content."""

from __future__ import annotations

import hashlib
from pathlib import Path

import boto3
import pytest

from dispatcher import usecases
from schemas.errors import ManifestError
from schemas.settings import KilnSettings
from tests.test_lora import make_lora
from tests.test_models_push import fleet  # noqa: F401  (the fixture: S3 server, Redis, settings)


def test_a_lora_on_a_bucket_uri_is_checked_and_counted_by_content(fleet: KilnSettings,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    lora = make_lora(tmp_path / "lora")
    boto3.client("s3", endpoint_url=fleet.s3_endpoint_url).upload_file(str(lora), "shop", "styles/house.safetensors")
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt,model,lora\nmug,tiny,s3://shop/styles/house.safetensors\n", encoding="utf-8")
    [job] = usecases.expansion(usecases.Request(manifest), fleet).jobs
    assert job.params.loras[0].sha256 == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert Path(job.params.loras[0].path).read_bytes() == lora.read_bytes()  # a local copy, for the renderer

    manifest.write_text("prompt,model,lora\nmug,tiny,s3://shop/styles/gone.safetensors\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"'s3://shop/styles/gone.safetensors': s3://shop/styles/gone.safetensors "
                                            r"does not exist"):
        usecases.expansion(usecases.Request(manifest), fleet)
    with pytest.raises(ManifestError, match="no bucket is configured here"):
        usecases.expansion(usecases.Request(manifest), fleet.model_copy(update={"storage_url": str(tmp_path)}))
