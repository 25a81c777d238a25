"""Which models a fleet worker serves, and which one it works on now.

Weights before work: at start, before it subscribes to anything, a worker makes sure the weights of every model it
will serve are on this machine (downloaded or built, outside any job's time limit) and subscribes only to those
models' queues. A model it cannot get is not served, with the reason in its heartbeats.

Model affinity: a worker consumes one model's queues at a time: the heaviest model whose work waits (in the queue,
or in the database behind it: the dispatcher publishes how many jobs each queue has), because only cards as big as
its own can take that work, while smaller cards take the lighter work. It keeps its model loaded until that
model's work runs out or heavier work comes. A two-model batch costs each worker at most one load per model
(benchmarks/fleet_sim.py: a simulated 10-PC fleet finishes within 4% of the lower bound; choosing the model with
the most waiting work instead kept big cards on light work and took 39% longer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from schemas.capacity import need_tier, worker_queues
from schemas.errors import KilnError
from schemas.models import REGISTRY, ModelSpec, resolve_model, weights_location
from schemas.plan import Card, Shape

log = logging.getLogger("kiln.worker")
DEFAULT_MODEL = "klein-4b"


def default_models(card: Card, cache_dir: Path) -> list[str]:
    """What a worker serves without --models: every registry model its card fits whose weights are on this machine
    already, or else klein-4b (downloaded at start)."""
    fits = [name for name, spec in REGISTRY.items() if not spec.is_tiny and worker_queues(card, name, spec.profile)]
    here = [name for name in fits if weights_location(REGISTRY[name], cache_dir)]
    return here or [n for n in fits if n == DEFAULT_MODEL]


def prepare_models(names: Iterable[str], card: Card, fetch: Callable[[ModelSpec], object]
                   ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({model: its queues this card consumes}, {model: why it is not served}), after `fetch` made sure of each
    model's weights (raising a KilnError when it cannot). Served models come heaviest first."""
    served: dict[str, list[str]] = {}
    unserved: dict[str, str] = {}
    for name in names:
        try:
            spec = resolve_model(name)
        except KilnError as exc:
            unserved[name] = str(exc)
            continue
        queues = worker_queues(card, spec.name, spec.profile)
        if not queues:
            unserved[spec.name] = f"this card ({card}) fits no {spec.profile} work"
            continue
        try:
            fetch(spec)
        except KilnError as exc:
            unserved[spec.name] = str(exc)
            continue
        served[spec.name] = queues
    order = sorted(served, key=lambda m: -(need_tier(resolve_model(m).profile, Shape.of(1024, 1024)) or 0))
    return {m: served[m] for m in order}, unserved


def pick_model(current: str | None, served: Sequence[str], waiting: dict[str, int]) -> str | None:
    """The model to work on: the heaviest one (`served` comes heaviest first) whose work waits, since only cards
    as big as this one can take it and smaller cards take the lighter work meanwhile; else the current one (or
    the first) until work comes. Work of the loaded model keeps it loaded until heavier work waits."""
    busy = [m for m in served if waiting.get(m, 0) > 0]
    if busy:
        return busy[0]
    return current if current in served else (served[0] if served else None)


class Consumer(Protocol):
    """What ModelChooser needs of Celery's consumer (celery.worker.consumer.Consumer)."""

    def add_task_queue(self, queue: str) -> Any: ...

    def cancel_task_queue(self, queue: str) -> Any: ...


class ModelChooser:
    """Runs in the worker's main process, on Celery's event loop: subscribes to the queues of one model at a time
    (pick_model), and drops models (or all work) when the rendering process says it cannot serve them."""

    def __init__(self, queues: dict[str, list[str]], waiting: Callable[[list[str]], list[int] | None],
                 news: Callable[[], list[dict[str, Any]]]) -> None:
        """`queues`: model -> its queues, heaviest model first. `waiting(queues)`: how many jobs wait for each
        queue (None when the broker cannot say). `news()`: what the rendering process said since last asked."""
        self.queues, self.waiting, self.news = dict(queues), waiting, news
        self.current: str | None = None
        self.consumer: Consumer | None = None
        self._subscribed: list[str] = []

    def first(self) -> list[str]:
        """The queues to start with."""
        self.current = pick_model(None, list(self.queues), self._waiting())
        self._subscribed = list(self.queues.get(self.current, [])) if self.current else []
        return self._subscribed

    def tick(self) -> None:
        """Hear the rendering process, then move to another model's queues if pick_model says so."""
        for note in self.news():
            for model, why in note.get("unserved", {}).items():
                if self.queues.pop(model, None) is not None:
                    log.warning("no longer taking %s work: %s", model, why)
            if note.get("problem"):
                log.error("taking no more work: %s", note["problem"])
                self.queues.clear()
        target = pick_model(self.current, list(self.queues), self._waiting())
        if target != self.current:
            self.switch(target)

    def switch(self, target: str | None) -> None:
        """Consume `target`'s queues instead of the current model's."""
        if self.consumer is not None:
            for queue in self._subscribed:
                self.consumer.cancel_task_queue(queue)
            for queue in self.queues.get(target, []) if target else []:
                self.consumer.add_task_queue(queue)
        log.info("taking %s work now", target) if target else log.info("taking no work")
        self.current = target
        self._subscribed = list(self.queues.get(target, [])) if target else []

    def attach(self, consumer: Consumer) -> None:
        """The consumer whose queues to change (again after each reconnect: it consumes what it did before)."""
        self.consumer = consumer

    def _waiting(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for model, queues in self.queues.items():
            found = self.waiting(queues)
            if found is None:  # the broker cannot say: stay as we are
                return {self.current: 1} if self.current else {}
            counts[model] = sum(found)
        return counts
