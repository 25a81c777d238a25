"""Kiln's one settings object, read from KILN_* environment variables and overridden by CLI options."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.errors import ConfigError
from schemas.manifest import MAX_JOBS, MAX_MANIFEST_BYTES, MAX_ROWS

# Below this many images `kiln render` under KILN_COMPILE=auto does not compile: the warm-up (about 10 s a shape
# for a FLUX transformer on an H100, by diffusers' figures) would not be won back at ~0.1-0.3 s an image.
COMPILE_MIN_IMAGES = 100


class KilnSettings(BaseSettings):
    """Every knob Kiln reads from its environment; built once at the entry point and passed down."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="forbid", validate_default=True)

    database_url: str = Field("sqlite:///kiln.db", description="SQLAlchemy URL; SQLite file in the working "
                                                               "directory by default, postgresql+psycopg://... "
                                                               "in production")
    storage_url: str = Field("renders", description="where images go: a folder, file:///path, "
                                                    "or s3://bucket/prefix (fleet)")
    cache_dir: Path = Field(Path("~/.cache/kiln"), description="where the tiny model is built once")
    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", description="torch device for rendering")
    batch_size: int = Field(1, ge=1, le=64, description="images per pipeline call (same model and size)")
    vram: float | None = Field(None, gt=0, description="GPU memory (GiB) Kiln may use, CUDA context included: "
                                                          "the plan fits it and the process is capped at it "
                                                          "(default: the whole card)")
    models: str | None = Field(None, description="models a fleet worker serves, comma-separated (default: the "
                                                 "ones its card fits whose weights are here, else klein-4b)")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="regional torch.compile of the transformer: auto tries it on a CUDA card with Triton "
                            f"(`kiln render`: batches of {COMPILE_MIN_IMAGES}+ images) and keeps it where it is "
                            "faster; on anywhere; off")
    attention: str = Field("auto", description="attention kernel: auto times the exact ones this card has and "
                                               "keeps the fastest (CUDA), or a diffusers backend name")
    prompt_cache_mb: int = Field(512, ge=0, description="host memory for prompt embeddings kept between renders")
    max_jobs: int = Field(MAX_JOBS, ge=1, description="refuse manifests that expand to more jobs than this")
    max_rows: int = Field(MAX_ROWS, ge=1, description="refuse manifests with more rows than this")
    max_manifest_bytes: int = Field(MAX_MANIFEST_BYTES, ge=1, description="refuse manifest files bigger than this")
    # the fleet
    broker_url: str | None = Field(None, description="Celery broker, redis://host:6379/0 or rediss://")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2); unset for AWS")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="where `kiln dispatcher` serves Prometheus "
                                                                      "metrics on /metrics (default: off)")
    webhook_url: str | None = Field(None, description="POST job.dead and batch.finished events here (http:// or "
                                                      "https://), signed with KILN_WEBHOOK_SECRET")
    webhook_secret: str | None = Field(None, description="the HMAC-SHA256 key of X-Kiln-Signature")
    serve_token: str | None = Field(None, description="the secret that unlocks batch control in `kiln serve` "
                                                      "(unset or empty: read-only)")
    backlog: int = Field(4, ge=1, le=1000, description="messages waiting per render queue and live worker on it")
    heartbeat_seconds: float = Field(5.0, gt=0, description="how often a worker reports in")
    worker_timeout_seconds: float = Field(60.0, gt=0, description="silence after which a worker's jobs go back")
    message_ttl_seconds: float = Field(900.0, gt=0, description="a render message unclaimed this long is "
                                                                  "dropped and the job republished")
    max_attempts: int = Field(3, ge=1, le=20, description="attempts before a job is dead")
    job_time_limit_seconds: float = Field(1800.0, gt=0,
                                          description="a worker kills a render message (all its jobs) running longer")
    retry_base_seconds: float = Field(10.0, ge=0, description="backoff before retry n is base * 2**(n-1)")
    storage_timeout_seconds: float = Field(30.0, gt=0, description="an S3 request with no answer this long is "
                                                                     "given up and tried again")
    upload_retry_seconds: float = Field(300.0, ge=0, description="how long a worker keeps retrying the upload of "
                                                                   "a rendered image before the attempt fails")

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://")):
            raise ValueError("must be redis://[:password@]host:port/db or rediss:// for TLS")
        if url is not None and url.startswith("rediss://") and "ssl_cert_reqs=" not in url:
            # Celery's transport would otherwise skip checking the server's certificate (kombu's default is
            # CERT_NONE, with a warning); TLS that does not check who answers is not what rediss:// promises.
            url += ("&" if "?" in url else "?") + "ssl_cert_reqs=required"
        return url

    @model_validator(mode="after")
    def _webhook_signed(self) -> KilnSettings:
        if self.webhook_url and not self.webhook_secret:
            raise ValueError("KILN_WEBHOOK_URL needs KILN_WEBHOOK_SECRET, the key receivers check signatures with")
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            raise ValueError("KILN_WEBHOOK_URL must be an http:// or https:// URL")
        return self

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, url: str) -> str:
        if not url.startswith(("sqlite:", "postgresql")):
            raise ValueError("must be sqlite:///FILE or postgresql+psycopg://USER@HOST/DB")
        return url

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, path: Path) -> Path:
        return path.expanduser()


def load_settings(**overrides: Any) -> KilnSettings:
    """Build the settings from the environment plus explicit overrides, or raise one clear ConfigError."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return KilnSettings(**given)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if not err["loc"]:  # a rule across settings: its message names them
                lines.append(err["msg"].removeprefix("Value error, "))
                continue
            name = str(err["loc"][0])
            source = f"--{name.replace('_', '-')}" if name in given else f"KILN_{name.upper()}"
            lines.append(f"{source}: {err['msg'].removeprefix('Value error, ')}; got {err.get('input')!r}")
        raise ConfigError("; ".join(lines)) from None
