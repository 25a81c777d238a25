"""Simulation (not a measurement of rendering): how Kiln's own scheduling code spreads a mixed batch over a mixed
fleet. Virtual workers with 8, 12, 16 and 24 GB cards run a 10,000-job batch of klein-4b and klein-9b jobs at two
sizes. Each job goes to the queue Kiln's `schemas.capacity.job_queue` gives it; each worker consumes the queues
`worker_queues` gives its card, one model at a time, choosing the model with Kiln's `worker.serving.pick_model`
(model affinity) and taking the queues of that model in turn (as kombu's Redis transport cycles them). Two
workers join late and one is switched off mid-batch (its job comes back after the worker timeout).

Against it: the same workers on one FIFO queue, each taking the first job its card fits (no affinity, no card
classes), and a lower bound: for each card class, the work no smaller card can do over the capacity of the cards
that can (loads ignored). Render and load times are assumptions from the figures in ../shared/KLEIN.md, scaled per
card class; they are printed with the results.

    .venv/bin/python -m benchmarks.fleet_sim [--jobs 10000] [--seed 1]
"""

from __future__ import annotations

import argparse
import heapq
import random
from collections import Counter, deque
from dataclasses import dataclass, field

from schemas.capacity import TIER_FLOOR_GIB, job_queue, worker_queues
from schemas.plan import Card, Shape, plan_for
from worker.serving import pick_model

MODELS = ("klein-4b", "klein-9b")
SIZES = ((1024, 1024), (1536, 1536))
# Seconds per image on a 24 GB RTX 4090 at 1024x1024, 4 steps (ComfyUI's 5090 figures, 1.2 s and 2 s, slowed by a
# third), and a bigger image costs its pixel ratio to the power 1.2 (attention grows faster than pixels).
BASE_SECONDS = {"klein-4b": 1.6, "klein-9b": 2.7}
LOAD_SECONDS = {"klein-4b": 20.0, "klein-9b": 35.0}
# A card class's speed relative to that 4090 (RTX 4080/4070 Ti S, 4070/3060 12 GB, 4060), fp8 math from RTX 40 on.
CARDS = {24: 1.0, 16: 0.75, 12: 0.5, 8: 0.35}
WORKER_TIMEOUT = 60.0


@dataclass
class Worker:
    name: str
    tier: int
    joins: float = 0.0
    leaves: float | None = None
    card: Card = field(init=False)
    queues: dict[str, list[str]] = field(init=False)  # model -> its queues on this card, biggest first
    loaded: str | None = None
    loads: int = 0
    busy_until: float = 0.0
    cycle: int = 0

    def __post_init__(self) -> None:
        self.card = Card("cuda", TIER_FLOOR_GIB[self.tier], fp8_math=True)
        self.queues = {m: q for m in reversed(MODELS) if (q := worker_queues(self.card, m, m))}  # heaviest first

    def seconds(self, model: str, width: int) -> float:
        return BASE_SECONDS[model] * (width * width / 1024**2) ** 1.2 / CARDS[self.tier]

    def fits(self, model: str, width: int) -> bool:
        return plan_for(model, self.card, Shape.of(width, width)) is not None


def fleet() -> list[Worker]:
    """Ten gaming PCs: three 8 GB, three 12 GB, two 16 GB, two 24 GB; one 12 GB and one 16 GB join an hour late,
    one 24 GB is switched off two hours in."""
    workers = [Worker(f"w{tier}-{i}", tier) for tier, n in ((8, 3), (12, 3), (16, 2), (24, 2)) for i in range(n)]
    workers[5].joins = workers[7].joins = 3600.0
    workers[9].leaves = 7200.0
    return workers


def batch(jobs: int, rng: random.Random) -> list[tuple[str, int]]:
    """60% klein-4b, 40% klein-9b; 70% at 1024x1024, 30% at 1536x1536; in manifest order."""
    return [("klein-4b" if rng.random() < 0.6 else "klein-9b", 1024 if rng.random() < 0.7 else 1536)
            for _ in range(jobs)]


def kiln(jobs: list[tuple[str, int]], workers: list[Worker]) -> tuple[float, Counter[str]]:
    """Kiln's queues and affinity: (makespan, jobs per worker)."""
    queues: dict[str, deque[tuple[str, int]]] = {}
    for model, width in jobs:
        queue = job_queue(model, model, width, width)
        assert queue is not None, f"{model} at {width} fits no card"
        queues.setdefault(queue, deque()).append((model, width))
    return run(workers, lambda w, now: take_kiln(w, queues), lambda job: queues[
        job_queue(job[0], job[0], job[1], job[1]) or ""].appendleft(job))


def take_kiln(worker: Worker, queues: dict[str, deque[tuple[str, int]]]) -> tuple[str, int] | None:
    waiting = {m: sum(len(queues.get(q, ())) for q in qs) for m, qs in worker.queues.items()}
    model = pick_model(worker.loaded, list(worker.queues), waiting)
    if model is None or not waiting.get(model):
        return None
    subscribed = [q for q in worker.queues[model] if queues.get(q)]
    worker.cycle += 1  # kombu's Redis transport takes the subscribed queues in turn
    return queues[subscribed[worker.cycle % len(subscribed)]].popleft()


def fifo(jobs: list[tuple[str, int]], workers: list[Worker]) -> tuple[float, Counter[str]]:
    """One queue in manifest order; a free worker takes the first job its card fits."""
    queue = list(jobs)

    def take(worker: Worker, _now: float) -> tuple[str, int] | None:
        for i, (model, width) in enumerate(queue):
            if worker.fits(model, width):
                return queue.pop(i)
        return None

    return run(workers, take, lambda job: queue.insert(0, job))


def run(workers: list[Worker], take, give_back) -> tuple[float, Counter[str]]:
    """Events in time order: a worker joins or frees up and takes its next job (loading its model if another is
    loaded); a switched-off worker's job comes back after the worker timeout. Returns (makespan, jobs done per
    worker)."""
    for w in workers:
        w.loaded, w.loads, w.busy_until, w.cycle = None, 0, 0.0, 0
    events: list[tuple[float, int, str]] = [(w.joins, i, "free") for i, w in enumerate(workers)]
    heapq.heapify(events)
    done: Counter[str] = Counter()
    idle: set[int] = set()
    makespan = 0.0
    in_hand: dict[int, tuple[str, int]] = {}
    while events:
        now, i, kind = heapq.heappop(events)
        w = workers[i]
        if kind == "back":  # the switched-off worker's job is given back: wake the idle ones
            give_back(in_hand.pop(i))
            for j in sorted(idle):
                heapq.heappush(events, (now, j, "free"))
            idle.clear()
            continue
        if i in in_hand:  # its job finished
            done[w.name] += 1
            del in_hand[i]
            makespan = max(makespan, now)
        if w.leaves is not None and now >= w.leaves:
            continue
        job = take(w, now)
        if job is None:
            idle.add(i)
            continue
        model, width = job
        seconds = w.seconds(model, width)
        if w.loaded != model:
            seconds += LOAD_SECONDS[model]
            w.loaded, w.loads = model, w.loads + 1
        in_hand[i] = job
        if w.leaves is not None and now + seconds > w.leaves:  # switched off mid-render
            heapq.heappush(events, (w.leaves + WORKER_TIMEOUT, i, "back"))
        else:
            heapq.heappush(events, (now + seconds, i, "free"))
    return makespan, done


def lower_bound(jobs: list[tuple[str, int]], workers: list[Worker]) -> float:
    """For each card class: the jobs no smaller card fits, over the capacity of the cards that fit any of them
    (speed x time available); the largest of these, loads ignored. Work in 24 GB-card seconds; the makespan at
    which capacity covers the work is found by bisection."""
    def smallest(job: tuple[str, int]) -> int:
        return min(w.tier for w in workers if w.fits(*job))

    bound = 0.0
    for tier in sorted(CARDS):
        group = [j for j in jobs if smallest(j) >= tier]
        able = [w for w in workers if any(w.fits(m, x) for m, x in set(group))]
        work = sum(BASE_SECONDS[m] * (x * x / 1024**2) ** 1.2 for m, x in group)
        low, high = 0.0, 1e7
        for _ in range(60):
            t = (low + high) / 2
            capacity = sum(CARDS[w.tier] * max(0.0, min(t, w.leaves or t) - w.joins) for w in able)
            low, high = (t, high) if capacity < work else (low, t)
        bound = max(bound, high)
    return bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    jobs = batch(args.jobs, random.Random(args.seed))
    workers = fleet()
    mix = Counter(jobs)
    print("SIMULATION: Kiln's queue choice, card classes and model affinity, with assumed render times")
    print("batch: " + ", ".join(f"{n} {m} at {w}x{w}" for (m, w), n in sorted(mix.items())))
    for tier, speed in CARDS.items():
        w = next(x for x in workers if x.tier == tier)
        takes = ", ".join(f"{m} {s}: {w.seconds(m, s):.1f} s" for m in MODELS for s in (1024, 1536) if w.fits(m, s))
        print(f"  {tier} GB card (speed {speed}): {takes or 'nothing'}")
    print(f"  model loads: {', '.join(f'{m} {s:.0f} s' for m, s in LOAD_SECONDS.items())}; "
          "w12-2 and w16-1 join after 1 h, w24-1 is switched off after 2 h")
    bound = lower_bound(jobs, workers)
    print(f"lower bound: {bound / 3600:.2f} h")
    for name, schedule in (("kiln", kiln), ("one FIFO queue", fifo)):
        makespan, done = schedule(jobs, workers)
        assert sum(done.values()) == len(jobs), f"{name}: {sum(done.values())} of {len(jobs)} jobs done"
        loads = sum(w.loads for w in workers)
        print(f"{name:15} makespan {makespan / 3600:.2f} h = {makespan / bound:.2f}x the lower bound "
              f"(goal for Kiln <= 1.10x); {loads} model loads")


if __name__ == "__main__":
    main()
