"""Webhooks on SQLite and PostgreSQL, to a real HTTP receiver that checks every signature: job.dead and
batch.finished are written with the change that caused them, delivered, and retried with backoff until they land."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dispatcher import store, webhooks
from dispatcher.expand import Options, expand
from dispatcher.lifecycle import RetryPolicy
from dispatcher.reader import parse_manifest
from schemas.job import RenderResult
from schemas.tables import Batch
from tests.test_cli import kiln, write

T0 = datetime(2026, 1, 1, 21, 0, 0)
SECRET = "webhook-secret-5e1f"


class Receiver:
    """A webhook receiver on a loopback port: keeps what it was sent, verifies each signature, and answers
    `fail_first` requests with 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                signed = hmac.compare_digest(expected, self.headers["X-Kiln-Signature"])
                receiver.received.append({"event": self.headers["X-Kiln-Event"], "signed": signed,
                                          "delivery": self.headers["X-Kiln-Delivery"], "body": json.loads(body)})
                failing = receiver.fail_first > 0
                receiver.fail_first -= 1
                self.send_response(500 if failing or not signed else 204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/kiln"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kinds(self) -> list[str]:
        return [r["event"] for r in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver(fail_first=1)
    yield found
    found.server.shutdown()


def test_dead_jobs_and_finished_batches_reach_the_webhook_signed_and_retried(database_url: str,
                                                                             receiver: Receiver) -> None:
    sessions = store.open_database(database_url)
    expansion = expand(parse_manifest(b"id,prompt\na,x\nb,y\n", "m.csv"), Options(batch="m", base_dir=Path.cwd(),
                                                                                  model="tiny"))
    with sessions.begin() as s:
        store.record_batch(s, Batch(id="b1", name="m", manifest="m.csv", manifest_sha256="0", created_at=T0),
                           expansion, T0)
        a, b = store.claim(s, "w1", T0, timedelta(minutes=5), limit=2)
        once = RetryPolicy(max_attempts=1, retry_base=timedelta(0), spread=1)
        store.record_result(s, a, RenderResult(job_id=a.job_id, attempt=1, ok=False, worker="w1", seconds=1,
                                               error="NaN pixels", error_kind="nan"), T0, once)
        assert store.finish_batches(s, T0) == []  # b still running
        store.record_result(s, b, RenderResult(job_id=b.job_id, attempt=1, ok=True, worker="w1", seconds=1,
                                               uri="file:///x.png", sha256="0" * 64, bytes=1), T0, once)
        assert store.finish_batches(s, T0) == ["b1"] and store.finish_batches(s, T0) == []
    assert webhooks.deliver(sessions, receiver.url, SECRET, T0) == 1  # job.dead got a 500, batch.finished landed
    assert webhooks.deliver(sessions, receiver.url, SECRET, T0 + timedelta(seconds=1)) == 0  # backing off
    assert webhooks.deliver(sessions, receiver.url, SECRET, T0 + timedelta(seconds=6)) == 1
    assert webhooks.deliver(sessions, receiver.url, SECRET, T0 + timedelta(hours=2)) == 0  # each lands once
    assert receiver.kinds() == ["job.dead", "batch.finished", "job.dead"]
    assert all(r["signed"] for r in receiver.received)
    assert receiver.received[0]["delivery"] == receiver.received[2]["delivery"]  # one id: deduplicate on it
    dead = receiver.received[2]["body"]["data"]
    assert (dead["job_id"], dead["rows"], dead["error"], dead["batches"]) == (a.job_id, ["a"], "NaN pixels", ["b1"])
    finished = receiver.received[1]["body"]
    assert finished["kind"] == "batch.finished" and finished["data"]["counts"]["dead"] == 1
    assert finished["data"]["counts"]["succeeded"] == 1 and finished["created_at"] == "2026-01-01T21:00:00Z"


def test_kiln_render_tells_the_webhook_its_batch_finished(tmp_path: Path, kiln_env: dict[str, str],
                                                          receiver: Receiver) -> None:
    receiver.fail_first = 0
    env = {**kiln_env, "KILN_WEBHOOK_URL": receiver.url, "KILN_WEBHOOK_SECRET": SECRET}
    manifest = write(tmp_path / "m.csv", "id,prompt,width,height\na,x,256,256\n")
    batch = json.loads(kiln("render", str(manifest), "--model", "tiny", "--json", cwd=tmp_path, env=env).stdout)
    [event] = receiver.received
    assert event["signed"] and event["body"]["data"]["batch_id"] == batch["batch_id"]
    unsigned = kiln("render", str(manifest), cwd=tmp_path, env={**env, "KILN_WEBHOOK_SECRET": ""}, check=2)
    assert "KILN_WEBHOOK_URL needs KILN_WEBHOOK_SECRET" in unsigned.stderr
