"""The one job lifecycle (dispatcher.lifecycle) as `kiln render` lives it: a transient failure retried after its
backoff and charged, a model this machine cannot load left queued and charged nothing. The fleet's side is in
test_dispatch.py and test_fleet.py; the store's in test_store.py."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from dispatcher import runner, store
from dispatcher.expand import Options, expand
from dispatcher.lifecycle import Fault, RetryPolicy, after_failure, fault_of
from dispatcher.reader import parse_manifest
from schemas.errors import StorageError
from schemas.job import JobStatus
from schemas.models import tiny_path
from schemas.settings import load_settings
from schemas.tables import Attempt, Batch
from tests.test_cli import kiln, sql, write
from worker.render import LocalRenderer
from worker.storage import LocalStorage

T0 = datetime(2026, 1, 1, 12, 0, 0)
POLICY = RetryPolicy(max_attempts=3, retry_base=timedelta(seconds=10))


def test_each_kind_of_failure_is_charged_to_whoever_caused_it() -> None:
    assert [fault_of(k) for k in ("bad_input", "worker", "oom", "withdrawn", "nan", "error", None)] == [
        Fault.JOB, Fault.WORKER, Fault.CARD, Fault.NOBODY, Fault.TRANSIENT, Fault.TRANSIENT, Fault.TRANSIENT]
    assert after_failure(Fault.JOB, 1, 1, POLICY).status is JobStatus.FAILED
    assert after_failure(Fault.WORKER, 0, 0, POLICY) == after_failure(Fault.WORKER, 9, 9, POLICY)  # never spent
    assert after_failure(Fault.CARD, 0, 0, POLICY).bigger_card
    assert after_failure(Fault.TRANSIENT, 2, 2, POLICY).delay == timedelta(seconds=20)
    assert after_failure(Fault.TRANSIENT, 3, 1, POLICY).status is JobStatus.QUEUED  # one bad card kills nothing
    assert after_failure(Fault.TRANSIENT, 3, 2, POLICY).status is JobStatus.DEAD
    assert after_failure(Fault.TRANSIENT, 6, 1, POLICY).status is JobStatus.DEAD
    assert after_failure(Fault.TRANSIENT, 3, 1, RetryPolicy(3, timedelta(0), spread=1)).status is JobStatus.DEAD


class DiskHiccup(LocalStorage):
    """A folder whose first write fails, as a full disk would before something is cleaned up."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failed = False

    def put(self, key: str, data: bytes, job_id: str) -> str:
        if not self.failed:
            self.failed = True
            raise StorageError("No space left on device")
        return super().put(key, data, job_id)


def test_an_embedded_run_retries_a_transient_failure_after_its_backoff(database_url: str, cache_dir: Path,
                                                                      tmp_path: Path) -> None:
    sessions = store.open_database(database_url)
    expansion = expand(parse_manifest(b"id,prompt,width,height\na,x,256,256\nb,y,256,256\n", "m.csv"),
                       Options(batch="m", base_dir=tmp_path, model="tiny"))
    with sessions.begin() as s:
        store.record_batch(s, Batch(id="b1", name="m", manifest="m.csv", manifest_sha256="0" * 64, created_at=T0),
                           expansion, T0)
    now = [T0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += timedelta(seconds=seconds)

    renderer = LocalRenderer(load_settings(cache_dir=cache_dir, device="cpu"), "here:1")
    summary = runner.run_batch(sessions, renderer, "b1", lambda: now[0], POLICY, storage=DiskHiccup(tmp_path / "out"),
                               sleep=sleep)
    assert (summary.rendered, summary.failed, summary.retried) == (2, 0, 1)
    assert len(waits) == 1 and 10 <= waits[0] < 11  # the first retry's backoff, waited out once
    with sessions.begin() as s:
        attempts = [(a.status, a.error) for a in s.scalars(select(Attempt).order_by(Attempt.started_at,
                                                                                       Attempt.number))]
    assert attempts[0] == ("failed", "No space left on device") and [a for a, _ in attempts[1:]] == ["succeeded"] * 2
    assert sorted(p.name for p in (tmp_path / "out" / "m").iterdir()) == ["a.png", "b.png"]


def test_a_model_this_machine_cannot_load_stays_queued_uncharged_and_the_rest_renders(
        tmp_path: Path, kiln_env: dict[str, str], cache_dir: Path) -> None:
    broken = tmp_path / "half-downloaded"
    shutil.copytree(tiny_path(cache_dir), broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.unlink()
    manifest = write(tmp_path / "m.csv", "id,prompt,model,width,height\na,x,tiny,256,256\n"
                                         "b,y,./half-downloaded,256,256\nc,z,./half-downloaded,256,256\n")
    done = kiln("render", str(manifest), cwd=tmp_path, env=kiln_env, check=1)
    assert "1 rendered, 0 failed" in done.stdout
    assert f"not rendered here {broken}: cannot load {broken}" in " ".join(done.stdout.split())
    assert "2 jobs stay queued" in done.stdout
    db = tmp_path / "kiln.db"
    assert sql(db, "SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status") == [("queued", 2),
                                                                                          ("succeeded", 1)]
    assert sql(db, "SELECT status FROM attempts WHERE status != 'succeeded'") == [("worker",)]  # one try, no charge
