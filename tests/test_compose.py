"""compose.yaml's wiring, checked without a Docker engine: what each service gets and what it exposes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from schemas.settings import KilnSettings

ROOT = Path(__file__).resolve().parent.parent


def services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def test_every_kiln_variable_in_compose_is_a_setting_kiln_reads() -> None:
    known = {f"KILN_{name.upper()}" for name in KilnSettings.model_fields}
    for name in ("dispatcher", "worker", "dashboard"):
        given = {k for k in services()[name]["environment"] if k.startswith("KILN_")}
        assert given <= known, f"{name} sets {sorted(given - known)}, which Kiln does not read"


def test_workers_get_the_broker_and_nothing_else_yet_reach_the_signed_upload_host() -> None:
    dispatcher, worker = services()["dispatcher"], services()["worker"]
    assert set(worker["environment"]) == {"KILN_BROKER_URL", "KILN_MODELS"}  # no database, no storage keys
    endpoint = dispatcher["environment"]["KILN_S3_ENDPOINT_URL"]  # the host uploads are signed for
    assert endpoint.startswith("http://${KILN_PUBLIC_HOST:-localhost}:")
    assert worker["extra_hosts"] == dispatcher["extra_hosts"] == ["${KILN_PUBLIC_HOST:-localhost}:host-gateway"]


def test_flower_is_not_open_to_the_lan_and_exports_have_a_writable_folder() -> None:
    assert services()["flower"]["ports"] == ["127.0.0.1:5555:5555"]  # it holds full broker rights
    volumes = services()["dispatcher"]["volumes"]
    assert ".:/manifests:ro" in volumes and "./exports:/exports" in volumes
    assert services()["dispatcher"]["environment"]["KILN_METRICS_PORT"] == "9464"


def test_the_dashboard_reads_what_the_dispatcher_writes_and_signs_links_for_the_browser() -> None:
    dashboard, dispatcher = services()["dashboard"], services()["dispatcher"]
    assert dashboard["command"] == ["serve", "--host", "0.0.0.0"] and dashboard["ports"] == ["8000:8000"]
    for name in ("KILN_DATABASE_URL", "KILN_STORAGE_URL", "KILN_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"):
        assert dashboard["environment"][name] == dispatcher["environment"][name]
