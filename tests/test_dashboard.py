"""`kiln serve`, the dashboard: a real batch rendered by the tiny pipeline into the S3 test server, the real server
process, and Debian's Chromium driven by Playwright; the HTTP rules (read-only, the token) on SQLite and
PostgreSQL."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from dispatcher import store, web
from dispatcher.images import StoredImages
from schemas.settings import load_settings
from tests.services import free_port, running, s3_server, unavailable
from tests.test_cli import KILN, kiln, sql, write
from tests.test_usecases import record

CHROMIUM = os.environ.get("KILN_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
AWS = {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_DEFAULT_REGION": "us-east-1"}
TOKEN = "night-shift"


def broken_png(path: Path) -> Path:
    """A reference image with a sound header, cut short: its job fails when it is decoded."""
    Image.fromarray(np.full((64, 64, 3), 99, dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


@pytest.fixture
def rendered(tmp_path: Path, kiln_env: dict[str, str]) -> Iterator[tuple[dict[str, str], str]]:
    """A batch of 7 images and one failed row, rendered by `kiln render` into a bucket on the S3 test server."""
    with s3_server(tmp_path) as endpoint:
        env = kiln_env | AWS | {"KILN_S3_ENDPOINT_URL": endpoint, "KILN_STORAGE_URL": "s3://shots/night"}
        boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in AWS.items() if "KEY" in k},
                     region_name="us-east-1").create_bucket(Bucket="shots")
        broken_png(tmp_path / "broken.png")
        manifest = write(tmp_path / "mugs.csv", "id,prompt,reference,width,height\n"
                         + "".join(f"mug-{i},a red mug number {i},,256,256\n" for i in range(7))
                         + "bad,a blue mug,broken.png,256,256\n")
        kiln("render", str(manifest), "--model", "tiny", cwd=tmp_path, env=env, check=1)
        [(batch_id,)] = sql(tmp_path / "kiln.db", "SELECT id FROM batches")
        yield env, str(batch_id)


def test_the_batch_page_shows_every_image_and_the_failed_row_in_chromium_and_control_needs_the_token(
        tmp_path: Path, rendered: tuple[dict[str, str], str]) -> None:
    if not Path(CHROMIUM).exists():
        unavailable(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    env, batch_id = rendered
    port = free_port()
    with running([KILN, "serve", "--port", str(port), "--token", TOKEN], port, tmp_path / "serve.log",
                 env | {"KILN_DATABASE_URL": f"sqlite:///{tmp_path / 'kiln.db'}"}), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        assert "succeeded 7" in page.inner_text("table") and "failed 1" in page.inner_text("table")
        page.click(f"text={batch_id}")
        page.wait_for_load_state("networkidle")
        loaded = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
        assert loaded == [256] * 7, f"thumbnails that did not load: {loaded}"
        failed = page.inner_text("figure.failed")
        assert "bad" in failed and "cannot be read" in failed  # the failed row, with its reason
        assert "cannot be read" in page.inner_text("table")  # and in the failures grouped by reason
        screenshot = Path(os.environ.get("KILN_SCREENSHOT") or tmp_path / "dashboard.jpg")  # .ci/run keeps one
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True, quality=80)
        assert Image.open(screenshot).size[0] == 1200

        page.click("text=failed (1)")  # the filter
        assert page.locator("figure").count() == 1 and page.locator("img").count() == 0

        page.goto(f"http://127.0.0.1:{port}/batches/{batch_id}?show=done")
        first = page.locator("figure a").first.get_attribute("href")
        assert first is not None
        image = page.request.get(f"http://127.0.0.1:{port}{first}")  # redirected to a signed link on the bucket
        assert image.ok and image.body().startswith(b"\x89PNG") and "X-Amz-Signature" in image.url

        assert page.locator("form button").count() == 0  # read-only until signed in
        page.goto(f"http://127.0.0.1:{port}/login")
        submit(page, "input[name=token]", "guess")
        assert "not the token" in page.inner_text("main")
        submit(page, "input[name=token]", TOKEN)
        page.click(f"text={batch_id}")
        submit(page, "button:text('pause')")
        assert page.locator(".tag.paused").count() == 1
        assert sql(tmp_path / "kiln.db", "SELECT paused FROM batches") == [(1,)]
        submit(page, "button:text('retry failed and dead')")
        assert sql(tmp_path / "kiln.db", "SELECT status FROM jobs WHERE prompt = 'a blue mug'") == [("queued",)]
        submit(page, "button:text('resume')")
        assert sql(tmp_path / "kiln.db", "SELECT paused FROM batches") == [(0,)]

        page.click("text=Fleet")
        assert re.search(r"cpu", page.inner_text("table"))  # the embedded renderer that made the batch
        browser.close()


def submit(page: Any, selector: str, text: str | None = None) -> None:
    """Fill in a field and press Enter, or press a button; return once the page it leads to has loaded."""
    with page.expect_navigation():
        if text is None:
            page.click(selector)
        else:
            page.fill(selector, text)
            page.press(selector, "Enter")


T0 = datetime(2026, 1, 1, 20, 0, 0)


def client(database_url: str, tmp_path: Path, token: str | None) -> TestClient:
    sessions = store.open_database(database_url)
    app = web.create_app(sessions, StoredImages(load_settings(storage_url=str(tmp_path / "renders"))),
                         lambda: T0 + timedelta(minutes=1), timedelta(seconds=60), token)
    return TestClient(app)


def test_without_a_token_the_dashboard_is_read_only_and_with_one_only_the_token_controls(
        database_url: str, tmp_path: Path) -> None:
    record(store.open_database(database_url), "id,prompt\na,x\nb,y\n")
    read_only = client(database_url, tmp_path, None)
    assert read_only.get("/batches/b1").status_code == 200
    refused = read_only.post("/batches/b1/pause", headers={"Authorization": "Bearer anything"})
    assert refused.status_code == 403 and "read-only" in refused.text
    assert "<form" not in read_only.get("/batches/b1").text

    guarded = client(database_url, tmp_path, TOKEN)
    assert guarded.post("/batches/b1/pause", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert guarded.post("/login", data={"token": "wrong"}).status_code == 403
    with store.open_database(database_url).begin() as s:
        assert store.find_batch(s, "b1").paused is False  # type: ignore[union-attr]
    signed_in = guarded.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert signed_in.status_code == 303 and "httponly" in signed_in.headers["set-cookie"].lower()
    done = guarded.post("/batches/b1/pause", follow_redirects=False)  # the cookie the sign-in set
    assert done.status_code == 303 and done.headers["location"] == "/batches/b1"
    with store.open_database(database_url).begin() as s:
        assert store.find_batch(s, "b1").paused is True  # type: ignore[union-attr]
    assert guarded.post("/batches/b1/cancel").status_code == 200
    assert guarded.get("/api/batches/b1").json()["counts"]["cancelled"] == 2


def test_bad_requests_get_a_message_not_a_traceback(database_url: str, tmp_path: Path) -> None:
    record(store.open_database(database_url), "id,prompt\na,x\n")
    app = client(database_url, tmp_path, None)
    missing = app.get("/batches/<nope>")
    assert missing.status_code == 404 and "no batch &#39;&lt;nope&gt;&#39;" in missing.text  # escaped
    assert app.get("/api/batches/nope").json() == {"error": "no batch 'nope': `kiln status` lists the recent ones"}
    assert app.get("/batches/b1?show=everything").status_code == 400
    assert app.get("/batches/b1?page=two").status_code == 400
    assert app.get("/batches/b1?page=99").status_code == 200  # the last page
    [job] = record(store.open_database(database_url), "id,prompt\nc,z\n", batch_id="c1")
    assert app.get(f"/thumbs/{job}.jpg").status_code == 404  # queued: no image yet
    assert app.get(f"/images/{job}").status_code == 404
    assert app.get("/workers").status_code == 200 and "No worker" in app.get("/workers").text


def test_a_gallery_pages_through_a_big_batch_and_filters_by_status(database_url: str, tmp_path: Path) -> None:
    rows = "".join(f"r{i},prompt {i}\n" for i in range(100))
    record(store.open_database(database_url), "id,prompt\n" + rows)
    app = client(database_url, tmp_path, None)
    first = app.get("/batches/b1").text
    assert first.count("<figure") == web.PER_PAGE and "page 1 of 3" in first and "waiting (100)" in first
    last = app.get("/batches/b1?page=3").text
    assert last.count("<figure") == 100 - 2 * web.PER_PAGE and "<b>r99</b>" in last
    assert "No done jobs" in app.get("/batches/b1?show=done").text
    assert f'content="{web.REFRESH_SECONDS}"' in first  # a batch still going reloads itself
