"""The writer: images are stored on a thread of their own while the next job renders (the real tiny pipeline),
one hand-off deep, results in order, and a store that fails fails only its job."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from schemas.errors import StorageError
from schemas.settings import load_settings
from tests.test_render import spec
from worker.render import LocalRenderer
from worker.storage import LocalStorage
from worker.writer import Writer


class HeldStorage(LocalStorage):
    """A folder whose writes wait until the test lets them through, as a slow upload would (a simulation of a
    slow link; the write itself is the real one)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.go = threading.Event()
        self.waiting = threading.Event()

    def put(self, key: str, data: bytes, job_id: str) -> str:
        self.waiting.set()
        assert self.go.wait(60), "the test never let the write through"
        return super().put(key, data, job_id)


def test_the_next_job_renders_while_the_last_image_is_stored_and_hand_offs_wait_one_deep(
        cache_dir: Path, tmp_path: Path) -> None:
    renderer = LocalRenderer(load_settings(cache_dir=cache_dir, device="cpu"), "test:1")
    storage = HeldStorage(tmp_path / "out")
    first = renderer.start([spec(job_id="j1", output_key="a.png", width=256, height=256)], storage=storage)
    assert storage.waiting.wait(60) and not first.done()  # rendered; its image is held in the write

    steps: list[int] = []
    second_started = threading.Event()
    second: list[object] = []

    def start_second() -> None:
        second.append(renderer.start([spec(job_id="j2", output_key="b.png", width=256, height=256, seed=7)],
                                     lambda step, steps_all: steps.append(step), storage))
        second_started.set()

    thread = threading.Thread(target=start_second)
    thread.start()
    deadline = time.monotonic() + 60
    while len(steps) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert steps == [1, 2, 3, 4] and not first.done()  # the second job rendered while the first was stored
    assert not second_started.wait(0.3)  # its hand-off waits until the first image is stored: one deep
    storage.go.set()
    thread.join(60)
    [one] = first.result(60)
    [two] = second[0].result(60)  # type: ignore[attr-defined]
    assert one.ok and two.ok and [one.job_id, two.job_id] == ["j1", "j2"]
    for result in (one, two):
        data = Path(result.uri.removeprefix("file://")).read_bytes()  # type: ignore[union-attr]
        assert hashlib.sha256(data).hexdigest() == result.sha256


def test_a_store_that_fails_fails_its_job_and_then_hears_every_result(cache_dir: Path, tmp_path: Path) -> None:
    class Full(LocalStorage):
        def put(self, key: str, data: bytes, job_id: str) -> str:
            raise StorageError("No space left on device")

    renderer = LocalRenderer(load_settings(cache_dir=cache_dir, device="cpu"), "test:1")
    heard: list[list[str]] = []
    future = renderer.start([spec(job_id="j1", width=256, height=256), spec(job_id="j2", width=256, height=256,
                                                                               output_key="x.png")],
                            storage=Full(tmp_path), then=lambda results: heard.append([r.job_id for r in results]))
    results = future.result(60)
    assert [(r.ok, r.error) for r in results] == [(False, "No space left on device")] * 2
    assert heard == [["j1", "j2"]]


def test_the_writer_runs_hand_offs_in_order_and_drains() -> None:
    writer = Writer()
    release = threading.Event()
    order: list[int] = []

    def slow() -> None:
        release.wait(10)
        order.append(1)

    first = writer.submit(slow)
    assert not writer.drain(0.05)
    release.set()
    second = writer.submit(lambda: order.append(2))  # waits for the first, then runs
    assert writer.drain(10) and first.done() and second.done() and order == [1, 2]
    with pytest.raises(ZeroDivisionError):
        writer.submit(lambda: 1 / 0).result()  # the submitter reads a failure; the writer goes on
    assert writer.submit(lambda: 3).result() == 3
