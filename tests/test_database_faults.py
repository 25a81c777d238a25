"""The database going wrong under the `kiln` command: a SQLite file locked by another process, a PostgreSQL
connection cut mid-commit. Each ends in a clear message and a state that running the command again repairs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sqlalchemy

from tests.faultproxy import CommitCutter
from tests.test_cli import kiln, sql, write

ROWS = "id,prompt,width,height\na,a red mug,256,256\nb,a blue mug,256,256\n"


def hold_lock(db: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process that takes SQLite's write lock on `db` and keeps it for `seconds`."""
    code = ("import sqlite3, sys, time\n"
            "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "conn.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(float(sys.argv[2]))\n"
            "conn.execute('COMMIT')\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_sqlite_file_locked_past_the_wait_is_a_clear_error_and_nothing_is_written(
        tmp_path: Path, kiln_env: dict[str, str]) -> None:
    manifest = write(tmp_path / "m.csv", ROWS)
    kiln("status", cwd=tmp_path, env=kiln_env)  # creates kiln.db (WAL)
    locker = hold_lock(tmp_path / "kiln.db", 30)
    try:
        done = kiln("render", str(manifest), "--model", "tiny", cwd=tmp_path, env=kiln_env, check=1)
    finally:
        locker.kill()
        locker.wait()
    assert "locked by another process" in done.stderr and "--database-url" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "renders").exists() and sql(tmp_path / "kiln.db", "SELECT count(*) FROM jobs") == [(0,)]


def test_a_sqlite_lock_released_within_the_wait_only_delays_the_render(
        tmp_path: Path, kiln_env: dict[str, str]) -> None:
    manifest = write(tmp_path / "m.csv", ROWS)
    kiln("status", cwd=tmp_path, env=kiln_env)
    locker = hold_lock(tmp_path / "kiln.db", 3)
    kiln("render", str(manifest), "--model", "tiny", cwd=tmp_path, env=kiln_env)
    locker.wait()
    assert sql(tmp_path / "kiln.db", "SELECT status, count(*) FROM jobs GROUP BY status") == [("succeeded", 2)]
    assert len(list((tmp_path / "renders").rglob("*.png"))) == 2


def test_a_submit_whose_commit_is_cut_says_so_and_submitting_again_is_safe(
        tmp_path: Path, kiln_env: dict[str, str], postgres_url: str) -> None:
    # COMMIT 1 creates the tables; COMMIT 2 records the batch and lands, but the answer never arrives.
    cutter = CommitCutter(postgres_url, every=1000, first=2)
    try:
        manifest = write(tmp_path / "m.csv", ROWS)
        done = kiln("submit", str(manifest), "--model", "tiny", "--database-url", cutter.url, cwd=tmp_path,
                    env=kiln_env, check=1)
    finally:
        cutter.close()
    assert cutter.cut == {"after": 1}
    assert "lost the database connection" in done.stderr and "Run it again" in done.stderr
    assert "Traceback" not in done.stderr
    again = json.loads(kiln("submit", str(manifest), "--model", "tiny", "--json", "--database-url", postgres_url,
                            cwd=tmp_path, env=kiln_env).stdout)
    assert (again["jobs"], again["queued"], again["in_progress"]) == (2, 0, 2)  # the first one had landed
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM jobs").scalar() == 2
    engine.dispose()
