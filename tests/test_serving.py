"""Which models a worker serves and which one it works on: weights made sure of before any work, and a worker that
keeps to its loaded model while that model's work waits (the fleet test runs it on Celery and Redis)."""

from __future__ import annotations

from typing import Any

from schemas.errors import ModelError
from schemas.models import ModelSpec
from schemas.plan import Card
from worker.serving import ModelChooser, pick_model, prepare_models

CARD_16 = Card("cuda", 15.996, True)


def test_models_without_weights_or_room_are_not_served_and_say_why() -> None:
    def fetch(spec: ModelSpec) -> None:
        if spec.name == "klein-base-4b":
            raise ModelError("the weights of klein-base-4b could not be downloaded")

    served, unserved = prepare_models(["tiny:klein-4b", "klein-base-4b", "tiny:klein-9b", "no-such"], CARD_16,
                                      fetch)
    assert served == {"tiny:klein-9b": ["kiln.render.tiny-klein-9b.vram16"],  # heaviest first
                      "tiny:klein-4b": [f"kiln.render.tiny-klein-4b.vram{t}" for t in (16, 12, 8)]}
    assert unserved["klein-base-4b"] == "the weights of klein-base-4b could not be downloaded"
    assert unserved["no-such"].startswith("unknown model 'no-such'")
    _, small = prepare_models(["tiny:klein-9b"], Card("cuda", 7.996, True), fetch)
    assert small == {"tiny:klein-9b": "this card (cuda 8.0 GiB, fp8 math) fits no klein-9b work"}


def test_a_worker_takes_the_heaviest_waiting_work_and_keeps_its_model_while_nothing_heavier_waits() -> None:
    served = ["9b", "4b"]  # heaviest first
    assert pick_model(None, served, {"9b": 2, "4b": 300}) == "9b"  # only cards like this one can take 9B work
    assert pick_model("9b", served, {"9b": 0, "4b": 3}) == "4b"  # the 9B work is done
    assert pick_model("4b", served, {"9b": 0, "4b": 3}) == "4b"
    assert pick_model("4b", served, {"9b": 5, "4b": 1}) == "9b"  # heavier work came: it goes first
    assert pick_model("9b", served, {}) == "9b"  # nothing waits anywhere: stay
    assert pick_model("4b", served, {"9b": 0, "4b": 0}) == "4b"
    assert pick_model(None, [], {"4b": 3}) is None


class FakeConsumer:
    def __init__(self) -> None:
        self.queues: list[str] = []

    def add_task_queue(self, queue: str) -> Any:
        self.queues.append(queue)

    def cancel_task_queue(self, queue: str) -> Any:
        self.queues.remove(queue)


def test_the_chooser_moves_between_models_and_drops_what_the_renderer_cannot_serve() -> None:
    waiting = {"a.vram16": 0, "a.vram8": 0, "b.vram8": 2}
    news: list[dict[str, Any]] = []
    chooser = ModelChooser({"a": ["a.vram16", "a.vram8"], "b": ["b.vram8"]},
                           lambda queues: [waiting[q] for q in queues], lambda: [news.pop() for _ in list(news)])
    consumer = FakeConsumer()
    consumer.queues = chooser.first()
    assert consumer.queues == ["b.vram8"]
    chooser.attach(consumer)
    waiting.update({"a.vram8": 4})
    chooser.tick()
    assert consumer.queues == ["a.vram16", "a.vram8"] and chooser.current == "a"  # heavier work came: it first
    waiting.update({"a.vram8": 0})
    chooser.tick()
    assert consumer.queues == ["b.vram8"]  # a's work is done; b's still waits
    waiting.update({"a.vram8": 3})
    chooser.tick()
    assert consumer.queues == ["a.vram16", "a.vram8"] and chooser.current == "a"
    news.append({"unserved": {"a": "its weights are corrupt"}})
    waiting.update({"b.vram8": 1})
    chooser.tick()
    assert consumer.queues == ["b.vram8"] and list(chooser.queues) == ["b"]
    news.append({"problem": "the device failed"})
    chooser.tick()
    assert consumer.queues == [] and chooser.current is None


def test_when_the_broker_cannot_say_the_worker_stays_where_it_is() -> None:
    chooser = ModelChooser({"a": ["a.vram8"], "b": ["b.vram8"]}, lambda queues: None, lambda: [])
    consumer = FakeConsumer()
    consumer.queues = chooser.first()
    chooser.attach(consumer)
    chooser.tick()
    assert consumer.queues == ["a.vram8"]
