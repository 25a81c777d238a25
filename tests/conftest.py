"""Shared fixtures: real SQLite and PostgreSQL databases, and the real tiny model built once per session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

POSTGRES_URL = os.environ.get("KILN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REQUIRE_SERVICES = os.environ.get("KILN_REQUIRE_SERVICES") == "1"  # set by .ci/run: a missing service fails


def _postgres_or_skip() -> None:
    try:
        engine = sqlalchemy.create_engine(POSTGRES_URL)
        with engine.connect():
            pass
        engine.dispose()
    except sqlalchemy.exc.OperationalError as exc:
        message = f"PostgreSQL not reachable at {POSTGRES_URL}: {exc.orig}"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    _postgres_or_skip()
    schema = f"kiln_test_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kiln.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Kiln cache folder with the tiny model built in it, shared by the whole session."""
    from worker.tiny import ensure_tiny

    path = tmp_path_factory.mktemp("kiln-cache")
    ensure_tiny(path)
    return path


@pytest.fixture
def kiln_env(tmp_path: Path, cache_dir: Path) -> dict[str, str]:
    """Environment for running the `kiln` command in a scratch folder with the shared tiny model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(KILN_CACHE_DIR=str(cache_dir), KILN_DEVICE="cpu", HF_HUB_OFFLINE="1", COLUMNS="200")
    return env
