"""Benchmark: the dispatcher side at scale. For manifests of N rows (a CSV as a shop exports it), the wall time and
peak memory of `kiln submit --dry-run` (read, validate, expand) and of `kiln submit` (the same, then recording
the batch) on SQLite and on PostgreSQL; recording is the difference. Each run is a `kiln` process of its own, its
peak memory read from the operating system. The caps are raised to fit the biggest manifest.

    .venv/bin/python -m benchmarks.scale --rows 10000,100000            # goals: dry run of 1,000,000 rows under
    .venv/bin/python -m benchmarks.scale --rows 1000000 --no-record     # 60 s and 1 GB; recording 100,000 jobs
                                                                        # under 20 s on either database

Needs PostgreSQL (KILN_TEST_POSTGRES_URL, as the tests) unless --sqlite-only.
"""

from __future__ import annotations

import argparse
import atexit
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

COLUMNS = "id,Title,Vendor,Color,prompt,seed\n"


def catalog(path: Path, rows: int) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        fh.write(COLUMNS)
        for i in range(rows):
            fh.write(f"sku-{i},Product {i},Vendor {i % 97},{('red', 'blue', 'oak')[i % 3]},"
                     f"Studio photo of Product {i} by Vendor {i % 97} in {('red', 'blue', 'oak')[i % 3]},{i}\n")
    return path


def run(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one kiln process."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, _, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if proc.stderr is not None:
        problem = proc.stderr.read().decode()
        proc.stderr.close()
        if problem.strip():
            raise SystemExit(f"{' '.join(args)}: {problem.strip()}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000", help="comma-separated manifest sizes")
    parser.add_argument("--no-record", action="store_true", help="only the dry runs")
    parser.add_argument("--sqlite-only", action="store_true")
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    kiln = str(Path(sys.executable).with_name("kiln"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    biggest = max(sizes)
    caps = ["--max-rows", str(biggest), "--max-jobs", str(biggest), "--max-bytes", str(200 * biggest + 2**20)]
    print(f"{os.cpu_count()} CPUs; one kiln process per figure")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for rows in sizes:
            manifest = catalog(tmp / f"catalog-{rows}.csv", rows)
            dry, dry_mb = run([kiln, "submit", str(manifest), "--dry-run", "--model", "tiny", *caps], env, tmp)
            print(f"{rows:>9,} rows ({manifest.stat().st_size / 2**20:.0f} MiB): dry run {dry:6.1f} s, "
                  f"{dry_mb:5.0f} MB peak", flush=True)
            if args.no_record:
                continue
            databases = {"sqlite": f"sqlite:///{tmp / f'kiln-{rows}.db'}"}
            if not args.sqlite_only:
                databases["postgresql"] = postgres_schema()
            for name, url in databases.items():
                wall, mb = run([kiln, "submit", str(manifest), "--model", "tiny", "--database-url", url, *caps],
                               env, tmp)
                print(f"{'':>9}   submit on {name:10}: {wall:6.1f} s, {mb:5.0f} MB peak; recording "
                      f"{wall - dry:6.1f} s, {1000 * (wall - dry) / rows:.2f} s per 1,000 jobs", flush=True)
                print(f"{'':>9}   tick on {name:12}: " + ", ".join(
                    f"{chore} {ms:.1f} ms" for chore, ms in tick_ms(url).items()) + " (the dispatcher's chores, "
                      "each once a second; medians)", flush=True)
                print(f"{'':>9}   claim on {name:11}: {claim_ms(url):6.1f} ms per job (median of {CLAIMS}, "
                      "as `kiln render` takes them)", flush=True)
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


CLAIMS = 40


def tick_ms(url: str, times: int = 10) -> dict[str, float]:
    """Median milliseconds of each chore of the dispatcher's once-a-second tick (dispatcher.service.Bookkeeping)
    with the batch just recorded queued, each in its own transaction as the tick runs it; no workers, nothing to
    publish to (the feed itself is `benchmarks.dispatcher_load`'s)."""
    import statistics
    from datetime import UTC, datetime

    from dispatcher import fleet, store
    from schemas.settings import load_settings

    sessions = store.open_database(url)
    policy = fleet.Policy.from_settings(load_settings())
    now = datetime.now(UTC).replace(tzinfo=None)
    chores: dict[str, Any] = {
        "reap": lambda s: fleet.reap(s, now, policy), "withdraw": lambda s: fleet.withdraw(s, lambda key: None),
        "outlook": lambda s: fleet.look(s, now, policy), "waiting": lambda s: fleet.waiting(s, now),
        "finish_batches": lambda s: store.finish_batches(s, now)}
    found = {}
    for name, chore in chores.items():
        spent = []
        for _ in range(times):
            started = time.perf_counter()
            with sessions.begin() as session:
                chore(session)
            spent.append(1000 * (time.perf_counter() - started))
        found[name] = statistics.median(spent)
    return found


def claim_ms(url: str) -> float:
    """Median milliseconds per claim of one job of the batch just recorded, as the embedded runner claims them
    (dispatcher.runner.run_batch: its batch, the loaded model and warm shape first), in this process."""
    import statistics
    from datetime import UTC, datetime

    from sqlalchemy import select

    from dispatcher import store
    from dispatcher.runner import LEASE
    from schemas.tables import Batch

    sessions = store.open_database(url)
    with sessions() as session:
        batch_id = session.execute(select(Batch.id)).scalar_one()
    times, shape, model = [], None, None
    for _ in range(CLAIMS):
        started = time.perf_counter()
        with sessions.begin() as session:
            [spec] = store.claim(session, "bench", datetime.now(UTC), LEASE, batch_id=batch_id,
                                 prefer_model=model, prefer_shape=shape)
        times.append(1000 * (time.perf_counter() - started))
        model, shape = spec.params.model, spec.params.shape
    return statistics.median(times)


def postgres_schema() -> str:
    """A fresh schema on the test PostgreSQL, dropped when this process ends."""
    import sqlalchemy

    from tests.conftest import POSTGRES_URL

    schema = f"kiln_scale_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")

    def drop() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")

    atexit.register(drop)
    return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"


if __name__ == "__main__":
    main()
