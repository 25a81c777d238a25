"""The `kiln` command end to end, as a user runs it: real tiny pipeline, real files, real databases."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
KILN = str(Path(sys.executable).with_name("kiln"))
CATALOG = ROOT / "examples" / "catalog.csv"


def kiln(*args: str, cwd: Path, env: dict[str, str], check: int | None = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([KILN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check is not None:
        assert done.returncode == check, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def sql(db: Path, query: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query).fetchall()


def wait_for_jobs(db: Path, status: str, at_least: int, proc: subprocess.Popen[str], seconds: float = 120) -> None:
    """Wait until the render in `proc` has `at_least` jobs in `status`, or fail the test."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if sql(db, f"SELECT count(*) FROM jobs WHERE status = '{status}'")[0][0] >= at_least:
                return
        except sqlite3.OperationalError:
            pass  # the database is still being created
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"the render never had {at_least} {status} jobs")


def test_catalog_renders_records_exports_and_renders_nothing_new_the_second_time(
        tmp_path: Path, kiln_env: dict[str, str]) -> None:
    first = json.loads(kiln("render", str(CATALOG), "--model", "tiny", "--json", cwd=tmp_path, env=kiln_env).stdout)
    assert (first["jobs"], first["rendered"], first["failed"], first["already_done"]) == (24, 24, 0, 0)
    assert 0 < first["load_seconds"] < first["wall_seconds"]  # reported on its own, not in seconds per image
    assert abs(first["seconds_per_image"] - (first["wall_seconds"] - first["load_seconds"]) / 24) < 0.002
    images = sorted((tmp_path / "renders" / "catalog").glob("*.png"))
    assert len(images) == 24 and Image.open(images[0]).size == (1024, 1024)
    db = tmp_path / "kiln.db"
    outputs = sql(db, "SELECT o.batch_id, o.manifest, o.manifest_row, o.key, j.status FROM outputs o "
                      "JOIN jobs j ON j.id = o.job_id ORDER BY o.manifest_row")
    assert len(outputs) == 24
    assert outputs[0] == (first["batch_id"], str(CATALOG), 1, "catalog/trail-runner-01.png", "succeeded")
    mtimes = {p: p.stat().st_mtime_ns for p in images}

    second = json.loads(kiln("render", str(CATALOG), "--model", "tiny", "--json", cwd=tmp_path, env=kiln_env).stdout)
    assert (second["rendered"], second["already_done"]) == (0, 24)
    assert second["batch_id"] == first["batch_id"] and sql(db, "SELECT count(*) FROM batches") == [(1,)]  # no no-op
    assert {p: p.stat().st_mtime_ns for p in images} == mtimes
    assert sql(db, "SELECT count(*) FROM outputs") == [(24,)]

    kiln("export", first["batch_id"], "-o", "results.csv", cwd=tmp_path, env=kiln_env)
    with open(tmp_path / "results.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 24
    assert rows[10]["Title"] == "Chef's Knife 8\"" and rows[10]["kiln_status"] == "succeeded"
    assert rows[10]["kiln_output_uri"] == (tmp_path / "renders" / "catalog" / "knife-01.png").as_uri()
    assert rows[10]["kiln_model"] == "tiny" and rows[10]["kiln_attempts"] == "1" and rows[10]["kiln_error"] == ""
    assert rows[10]["kiln_plan"] == "bf16-resident"  # how the model was loaded for it
    kiln("export", second["batch_id"][:6], "-o", "results.jsonl", cwd=tmp_path, env=kiln_env)
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["kiln_job_id"] for r in lines] == [r["kiln_job_id"] for r in rows]

    status = json.loads(kiln("status", first["batch_id"], "--json", cwd=tmp_path, env=kiln_env).stdout)
    assert status["counts"]["succeeded"] == 24 and status["jobs"] == 24


def test_renders_on_postgresql_through_the_same_setting(tmp_path: Path, kiln_env: dict[str, str],
                                                        postgres_url: str) -> None:
    manifest = write(tmp_path / "m.csv", "id,prompt,width,height\na,red shoe,256,256\nb,blue bag,256,256\n")
    env = {**kiln_env, "KILN_DATABASE_URL": postgres_url}
    report = json.loads(kiln("render", str(manifest), "--model", "tiny", "--json", cwd=tmp_path, env=env).stdout)
    assert report["counts"]["succeeded"] == 2
    assert not (tmp_path / "kiln.db").exists()
    listed = json.loads(kiln("status", "--json", cwd=tmp_path, env=env).stdout)
    assert [b["batch_id"] for b in listed] == [report["batch_id"]]


BAD = [
    ("empty.csv", "", "empty.csv: is empty"),
    ("nohead.csv", "id,prompt\n", "has a header but no rows"),
    ("steps.csv", "prompt,steps\nx,0\n", 'steps.csv line 2: column "steps": must be a whole number from 1 to 100'),
    ("model.csv", "prompt,model\nx,klein-3b\n", "unknown model 'klein-3b': use one of klein-4b"),
    ("nc.csv", "prompt,model\nx,klein-9b\n", "FLUX Non-Commercial licence"),
    ("esc.csv", "prompt,output\nx,../../etc/x\n", "must stay inside their prefix"),
    ("bad.json", '[{"prompt": "x",}]', "bad.json line 1: is not valid JSON"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD)
def test_bad_manifests_exit_nonzero_with_one_clear_message_and_write_nothing(
        tmp_path: Path, kiln_env: dict[str, str], database_url: str, name: str, text: str, message: str) -> None:
    env = {**kiln_env, "KILN_DATABASE_URL": database_url}  # SQLite in tmp_path, or a fresh PostgreSQL schema
    manifest = write(tmp_path / name, text)
    for command in (["render", str(manifest)], ["submit", str(manifest)]):
        done = kiln(*command, cwd=tmp_path, env=env, check=2)
        assert message in done.stderr
        assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no database file, no renders folder
    assert json.loads(kiln("status", "--json", cwd=tmp_path, env=env).stdout) == []  # no batch in the database


def test_non_ascii_bytes_get_a_fix_it_message(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    (tmp_path / "latin1.csv").write_bytes("id,prompt\n1,Café au lait mug\n".encode("latin-1"))
    done = kiln("submit", "latin1.csv", cwd=tmp_path, env=kiln_env, check=2)
    assert "latin1.csv line 2: is not valid UTF-8" in done.stderr and "CSV UTF-8" in done.stderr


def test_debug_shows_the_traceback(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    done = kiln("--debug", "submit", str(write(tmp_path / "m.csv", "prompt,steps\nx,0\n")), cwd=tmp_path,
                env=kiln_env, check=None)
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_a_real_model_without_weights_fails_clearly_before_writing_anything(
        tmp_path: Path, kiln_env: dict[str, str]) -> None:
    manifest = write(tmp_path / "m.csv", "prompt\na red shoe\n")
    env = {**kiln_env, "HF_HOME": str(tmp_path / "hf")}
    done = kiln("render", str(manifest), "--model", "klein-4b", cwd=tmp_path, env=env, check=1)
    assert done.stderr.count("\n") <= 3 and "Traceback" not in done.stderr
    assert "black-forest-labs/FLUX.2-klein-4B" in done.stderr and "hf download" in done.stderr
    assert "--model tiny" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.csv"] or sorted(
        p.name for p in tmp_path.iterdir()) == ["m.csv"]


def test_rows_this_card_cannot_render_are_refused_before_writing_anything(
        tmp_path: Path, kiln_env: dict[str, str]) -> None:
    manifest = write(tmp_path / "m.csv", "prompt\na red shoe\n")
    done = kiln("render", str(manifest), "--model", "tiny:klein-9b", "--non-commercial", "--vram", "8",
                cwd=tmp_path, env=kiln_env, check=1)
    assert "tiny:klein-9b at 1024x1024 needs a 16 GB card; this one (cpu 8.0 GiB) has no plan for it" in done.stderr
    assert "`kiln submit`" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]


def test_text_a_database_cannot_store_is_a_clear_error_on_sqlite_and_postgresql(
        tmp_path: Path, kiln_env: dict[str, str], database_url: str) -> None:
    env = {**kiln_env, "KILN_DATABASE_URL": database_url}
    manifest = tmp_path / "m.json"
    manifest.write_text('[{"id": "a", "prompt": "soap\\u0000dish"}, {"id": "b", "prompt": "towel"}]')
    done = kiln("submit", str(manifest), cwd=tmp_path, env=env, check=2)
    assert "m.json [0]: column \"prompt\": contains a NUL character" in done.stderr
    assert "Traceback" not in done.stderr
    assert json.loads(kiln("status", "--json", cwd=tmp_path, env=env).stdout) == []  # nothing was written
    manifest.write_text('[{"id": "a", "prompt": "soap dish"}, {"id": "b", "prompt": "towel"}]')
    assert json.loads(kiln("submit", str(manifest), "--json", cwd=tmp_path, env=env).stdout)["queued"] == 2


def test_dry_run_summarizes_and_writes_nothing(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    done = kiln("submit", str(ROOT / "examples" / "lookbook.json"), "--dry-run", "--json", cwd=tmp_path, env=kiln_env)
    summary = json.loads(done.stdout)
    assert summary["jobs"] == 18 and summary["per_model"] == {"klein-4b": 18}
    assert summary["megapixels"] == round((12 * 1024 * 1024 + 6 * 768 * 1024) / 1e6, 2)
    assert summary["examples"][0]["prompt"].startswith("Catalog photo of the Arc Desk Lamp by Lumen Works")
    assert "batch_id" not in summary and list(tmp_path.iterdir()) == []
    text = kiln("submit", str(ROOT / "examples" / "lookbook.json"), "--dry-run", cwd=tmp_path, env=kiln_env).stdout
    assert "18 jobs" in text and "klein-4b: 18 jobs" in text and "nothing was written" in text


def test_the_reference_example_in_the_readme_expands_with_its_packshots(tmp_path: Path,
                                                                       kiln_env: dict[str, str]) -> None:
    done = kiln("submit", str(ROOT / "examples" / "restyle.csv"), "--dry-run", "--json", cwd=tmp_path, env=kiln_env)
    summary = json.loads(done.stdout)
    assert summary["jobs"] == 3 and [e["output"] for e in summary["examples"]] == [
        "restyle/mug-oak.webp", "restyle/mug-marble.webp", "restyle/mug-gift.jpg"]


def test_the_manifest_caps_are_settings_that_say_how_to_raise_them(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    manifest = write(tmp_path / "m.csv", "prompt\na\nb\nc\n")
    rows = kiln("submit", str(manifest), "--dry-run", "--max-rows", "2", cwd=tmp_path, env=kiln_env, check=2).stderr
    assert "has 3 rows; the limit is 2 (--max-rows, KILN_MAX_ROWS)" in rows
    size = kiln("submit", str(manifest), "--dry-run", cwd=tmp_path, env=kiln_env | {"KILN_MAX_MANIFEST_BYTES": "8"},
                check=2).stderr
    assert "is 13 bytes; the limit is 8 (--max-bytes, KILN_MAX_MANIFEST_BYTES)" in size
    assert "3 jobs" in kiln("submit", str(manifest), "--dry-run", "--max-bytes", "13", cwd=tmp_path,
                            env=kiln_env | {"KILN_MAX_ROWS": "3"}).stdout


def test_submit_records_a_batch_that_render_then_completes(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    manifest = write(tmp_path / "m.csv", "id,prompt,width,height\na,x,256,256\nb,y,256,256\n")
    submitted = json.loads(kiln("submit", str(manifest), "--model", "tiny", "--json", cwd=tmp_path,
                                env=kiln_env).stdout)
    assert submitted["queued"] == 2
    status = json.loads(kiln("status", submitted["batch_id"], "--json", cwd=tmp_path, env=kiln_env).stdout)
    assert status["counts"]["queued"] == 2
    rendered = json.loads(kiln("render", str(manifest), "--model", "tiny", "--json", cwd=tmp_path,
                               env=kiln_env).stdout)
    assert rendered["rendered"] == 2
    status = json.loads(kiln("status", submitted["batch_id"], "--json", cwd=tmp_path, env=kiln_env).stdout)
    assert status["counts"]["succeeded"] == 2 and status["progress"]["finished"] == 2
    watched = kiln("status", submitted["batch_id"], "--watch", cwd=tmp_path, env=kiln_env).stdout
    assert watched.startswith(f"{submitted['batch_id']}: 2/2 finished, ")  # nothing left: it stops at once
    assert "--watch follows one batch" in kiln("status", "--watch", cwd=tmp_path, env=kiln_env, check=2).stderr


def test_submit_says_what_renders_the_batch_with_the_options_it_was_given(tmp_path: Path,
                                                                          kiln_env: dict[str, str]) -> None:
    manifest = write(tmp_path / "m.csv", "id\nmug\n")
    options = ["--model", "tiny", "--prompt", "studio photo of a {id}", "--non-commercial"]
    here = kiln("submit", str(manifest), *options, cwd=tmp_path, env=kiln_env).stdout
    assert f"render it here with `kiln render {manifest} --model tiny --prompt 'studio photo of a {{id}}' " \
           "--non-commercial`" in here  # one line, however narrow the pipe
    fleet = kiln("submit", str(manifest), *options, cwd=tmp_path,
                 env={**kiln_env, "KILN_BROKER_URL": "redis://127.0.0.1:1/0"}).stdout
    batch_id = fleet.split("recorded batch ", 1)[1].split(":", 1)[0]
    assert f"the fleet's workers take it from here: follow it with `kiln status {batch_id}`" in fleet


def test_an_edited_row_never_overwrites_the_image_another_job_made(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    manifest = write(tmp_path / "m.csv", "id,prompt,width,height\nmug,a blue mug,256,256\n")
    kiln("render", str(manifest), "--model", "tiny", cwd=tmp_path, env=kiln_env)
    image = tmp_path / "renders" / "m" / "mug.png"
    before = image.read_bytes()
    write(manifest, "id,prompt,width,height\nmug,a red mug,256,256\n")  # same id, so the same output key
    done = kiln("render", str(manifest), "--model", "tiny", cwd=tmp_path, env=kiln_env, check=1)
    assert "already holds the image of job" in done.stdout and "another output template" in done.stdout
    assert image.read_bytes() == before
    [(sha,)] = sql(tmp_path / "kiln.db", "SELECT sha256 FROM outputs")
    assert sha == hashlib.sha256(before).hexdigest()  # the output row still describes the file it points at
    assert sql(tmp_path / "kiln.db", "SELECT status FROM jobs WHERE prompt = 'a red mug'") == [("failed",)]


def test_a_failing_job_is_recorded_and_the_batch_goes_on(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    Image.fromarray(np.full((256, 256, 3), 99, dtype=np.uint8)).save(tmp_path / "broken.png")
    data = (tmp_path / "broken.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[:len(data) // 2])  # a sound header, cut short: fails when decoded
    manifest = write(tmp_path / "m.csv", "id,prompt,reference,width,height\n"
                                         "a,x,,256,256\nb,y,broken.png,256,256\nc,z,,256,256\n")
    done = kiln("render", str(manifest), "--model", "tiny", cwd=tmp_path, env=kiln_env, check=1)
    assert "2 rendered, 1 failed" in done.stdout and "row b:" in done.stdout
    status = json.loads(kiln("status", "--json", cwd=tmp_path, env=kiln_env).stdout)[0]
    assert status["counts"] == {"queued": 0, "running": 0, "succeeded": 2, "failed": 1, "dead": 0, "cancelled": 0}
    detail = json.loads(kiln("status", status["batch_id"], "--json", cwd=tmp_path, env=kiln_env).stdout)
    assert detail["failures"][0]["row_id"] == "b" and "cannot be read" in detail["failures"][0]["error"]
    kiln("export", status["batch_id"], "--contact-sheet", "sheet.html", cwd=tmp_path, env=kiln_env)
    page = (tmp_path / "sheet.html").read_text(encoding="utf-8")
    assert page.count('<img alt="') == 2 and "2 of 3 images" in page and "http" not in page.split("<main>")[1]
    failed = page.split('<figure class="failed">')[1].split("</figure>")[0]
    assert "<b>b</b>" in failed and "cannot be read" in failed  # the failed row, with its reason
    kiln("export", status["batch_id"], "--contact-sheet", "sheet.png", cwd=tmp_path, env=kiln_env)
    assert Image.open(tmp_path / "sheet.png").size == (3 * 264, 292)
    retried = kiln("retry", status["batch_id"], "--set", "steps=6", cwd=tmp_path, env=kiln_env).stdout
    assert "1 failed and dead jobs queued again, 1 of them as new jobs with steps=6" in retried
    assert sql(tmp_path / "kiln.db", "SELECT steps, status FROM jobs WHERE retry_of IS NOT NULL") == [(6, "queued")]
    assert "no failed jobs to retry" in kiln("retry", status["batch_id"], "--failed", cwd=tmp_path,
                                             env=kiln_env).stdout
    bad = kiln("retry", status["batch_id"], "--set", "steps", cwd=tmp_path, env=kiln_env, check=2).stderr
    assert "--set steps: give FIELD=VALUE" in bad


def terminal_signals() -> None:
    """In the child: Ctrl-C behaves as in a terminal even when the test runner was started in the background
    (a non-interactive shell starts background jobs with SIGINT ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_render(tmp_path: Path, env: dict[str, str], jobs: int, status: str, at_least: int
                 ) -> tuple[Path, Path, subprocess.Popen[str]]:
    """Start `kiln render` on `jobs` 1024x1024 tiny jobs (about a second each) and return once `at_least` of them
    are in `status`, with the render still going."""
    manifest = write(tmp_path / "m.csv", "prompt\n" + "".join(f"shoe {i}\n" for i in range(jobs)))
    with open(tmp_path / "render.err", "w") as errors:  # what the render says when stopped
        proc = subprocess.Popen([KILN, "render", str(manifest), "--model", "tiny"], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=errors, text=True, preexec_fn=terminal_signals)
    db = tmp_path / "kiln.db"
    wait_for_jobs(db, status, at_least, proc)
    assert proc.poll() is None, "the render finished before it could be interrupted"
    return manifest, db, proc


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupting_a_render_requeues_its_job_and_the_next_run_finishes(
        tmp_path: Path, kiln_env: dict[str, str], signum: int) -> None:
    manifest, db, proc = start_render(tmp_path, kiln_env, 12, "succeeded", 2)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 130
    counts = dict(sql(db, "SELECT status, count(*) FROM jobs GROUP BY status"))
    assert "running" not in counts and counts["queued"] >= 1
    said = " ".join((tmp_path / "render.err").read_text().split())
    assert "interrupted: the job in hand went back to the queue; batch" in said and "Traceback" not in said
    assert f"{counts['succeeded']} done and {counts['queued']} queued. Run the same command again" in said
    assert sql(db, "SELECT count(*) FROM attempts WHERE status = 'running'") == [(0,)]
    report = json.loads(kiln("render", str(manifest), "--model", "tiny", "--json", cwd=tmp_path, env=kiln_env).stdout)
    assert report["rendered"] == counts["queued"] and report["counts"]["succeeded"] == 12
    assert sql(db, "SELECT count(*) FROM outputs") == [(12,)]


def test_pausing_a_batch_stops_its_render_here_with_the_rest_left_queued(tmp_path: Path,
                                                                        kiln_env: dict[str, str]) -> None:
    manifest, db, proc = start_render(tmp_path, kiln_env, 12, "succeeded", 1)
    [(batch_id,)] = sql(db, "SELECT id FROM batches")
    kiln("batch", "pause", str(batch_id), cwd=tmp_path, env=kiln_env)
    assert proc.wait(timeout=120) == 0
    counts = dict(sql(db, "SELECT status, count(*) FROM jobs GROUP BY status"))
    assert counts.get("queued", 0) >= 1 and "running" not in counts
    kiln("batch", "resume", str(batch_id), cwd=tmp_path, env=kiln_env)
    rest = json.loads(kiln("render", str(manifest), "--model", "tiny", "--json", cwd=tmp_path, env=kiln_env).stdout)
    assert rest["rendered"] == counts["queued"] and rest["counts"]["succeeded"] == 12


def test_a_killed_render_leaves_running_jobs_that_the_next_run_recovers(
        tmp_path: Path, kiln_env: dict[str, str]) -> None:
    manifest, db, proc = start_render(tmp_path, kiln_env, 8, "running", 1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    report = json.loads(kiln("render", str(manifest), "--model", "tiny", "--json", cwd=tmp_path, env=kiln_env).stdout)
    assert report["counts"]["succeeded"] == 8
    assert sql(db, "SELECT count(*) FROM outputs") == [(8,)]
    assert sql(db, "SELECT count(*) FROM attempts WHERE status = 'lost'")[0][0] >= 1


def test_models_list_shows_licences_defaults_and_local_weights(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    models = {m["name"]: m for m in json.loads(kiln("models", "list", "--json", cwd=tmp_path, env=kiln_env).stdout)}
    assert models["klein-9b"]["licence"] == "FLUX Non-Commercial" and not models["klein-9b"]["commercial_use"]
    assert (models["klein-base-4b"]["steps"], models["klein-base-4b"]["guidance"]) == (50, 4.0)
    assert models["tiny"]["weights"] == str(Path(kiln_env["KILN_CACHE_DIR"]) / "models" / "tiny-klein-v1")
    assert models["klein-4b"]["weights"] is None


def test_export_refuses_unknown_formats_and_batches(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    manifest = write(tmp_path / "m.csv", "prompt,width,height\nx,256,256\n")
    batch = json.loads(kiln("submit", str(manifest), "--json", cwd=tmp_path, env=kiln_env).stdout)["batch_id"]
    assert "name the file .csv or .jsonl" in kiln("export", batch, "-o", "r.xlsx", cwd=tmp_path, env=kiln_env,
                                                  check=1).stderr
    assert "no batch 'zzz'" in kiln("export", "zzz", cwd=tmp_path, env=kiln_env, check=1).stderr
    assert not (tmp_path / "r.xlsx").exists()
    unwritable = kiln("export", batch, "-o", "/sys/results.csv", cwd=tmp_path, env=kiln_env, check=1).stderr
    assert "cannot export to /sys/results.csv" in unwritable and "choose a folder you can write to" in unwritable
    assert "Traceback" not in unwritable


def test_images_and_exports_get_the_mode_the_umask_asks_for(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    manifest = write(tmp_path / "m.csv", "id,prompt,width,height\na,x,256,256\n")
    done = subprocess.run([KILN, "render", str(manifest), "--model", "tiny", "--json"], cwd=tmp_path, env=kiln_env,
                          capture_output=True, text=True, preexec_fn=lambda: os.umask(0o027))
    assert done.returncode == 0, done.stderr
    subprocess.run([KILN, "export", json.loads(done.stdout)["batch_id"], "-o", "r.csv"], cwd=tmp_path, env=kiln_env,
                   check=True, capture_output=True, preexec_fn=lambda: os.umask(0o022))
    assert oct((tmp_path / "renders" / "m" / "a.png").stat().st_mode & 0o777) == oct(0o640)
    assert oct((tmp_path / "r.csv").stat().st_mode & 0o777) == oct(0o644)
    with open(tmp_path / "r.csv", encoding="utf-8") as fh:
        [row] = list(csv.DictReader(fh))
    assert float(row["kiln_seconds"]) > 0  # how long the image took


def test_help_explains_every_command(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    text = kiln("--help", cwd=tmp_path, env=kiln_env).stdout
    for command in ("render", "submit", "status", "export", "models"):
        assert command in text
    assert len(text.splitlines()) < 40


def test_batches_are_paused_resumed_reprioritized_and_cancelled_in_the_database(
        tmp_path: Path, kiln_env: dict[str, str]) -> None:
    manifest = write(tmp_path / "m.csv", "id,prompt\na,x\nb,y\n")
    batch = json.loads(kiln("submit", str(manifest), "--priority", "3", "--json", cwd=tmp_path,
                            env=kiln_env).stdout)["batch_id"]
    assert kiln("batch", "pause", batch, cwd=tmp_path, env=kiln_env).stdout.strip() == f"batch {batch}: paused"
    assert json.loads(kiln("status", batch, "--json", cwd=tmp_path, env=kiln_env).stdout)["paused"] is True
    kiln("batch", "resume", batch, cwd=tmp_path, env=kiln_env)
    kiln("batch", "priority", batch, "7", cwd=tmp_path, env=kiln_env)
    status = json.loads(kiln("status", batch, "--json", cwd=tmp_path, env=kiln_env).stdout)
    assert (status["paused"], status["priority"]) == (False, 7)
    assert "2 jobs cancelled" in kiln("batch", "cancel", batch, cwd=tmp_path, env=kiln_env).stdout
    assert json.loads(kiln("status", batch, "--json", cwd=tmp_path, env=kiln_env).stdout)["counts"]["cancelled"] == 2
    resumed = kiln("batch", "resume", batch, cwd=tmp_path, env=kiln_env).stdout
    assert "its 2 cancelled jobs stay cancelled: submit the manifest again" in resumed
    again = json.loads(kiln("submit", str(manifest), "--json", cwd=tmp_path, env=kiln_env).stdout)
    assert again["queued"] == 2  # submitting again brings cancelled jobs back
    assert "no batch 'nope'" in kiln("batch", "pause", "nope", cwd=tmp_path, env=kiln_env, check=1).stderr


def test_fleet_commands_without_a_broker_say_which_variable_to_set(tmp_path: Path, kiln_env: dict[str, str]) -> None:
    for command in (["dispatcher"], ["worker", "--vram", "8"]):
        done = kiln(*command, cwd=tmp_path, env=kiln_env, check=2)
        assert "KILN_BROKER_URL is not set" in done.stderr and "Traceback" not in done.stderr
    bad = kiln("worker", cwd=tmp_path, env={**kiln_env, "KILN_BROKER_URL": "amqp://x"}, check=2)
    assert "KILN_BROKER_URL: must be redis://" in bad.stderr
    broker = {**kiln_env, "KILN_BROKER_URL": "redis://127.0.0.1:1/0", "KILN_DEVICE": "cpu"}
    cpu = kiln("worker", cwd=tmp_path, env=broker, check=2)
    assert "a CPU worker takes work only when --vram GB" in cpu.stderr and "Traceback" not in cpu.stderr
    assert "--vram 0.2: must be more than 0.5 GB" in kiln("worker", "--vram", "0.2", cwd=tmp_path, env=broker,
                                                          check=2).stderr
    manifest = write(tmp_path / "m.csv", "prompt\nx\n")
    batch = json.loads(kiln("submit", str(manifest), "--json", cwd=tmp_path, env=kiln_env).stdout)["batch_id"]
    assert "--presign needs S3 storage" in kiln("export", batch, "--presign", "60", cwd=tmp_path, env=kiln_env,
                                                check=2).stderr
