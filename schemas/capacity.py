"""Which jobs go to which cards: one render queue per card class, chosen by the loading plan (schemas/plan.py).

Queues are per model as well: `kiln.render.<model>.vram<class>`, so a job reaches only workers that have its
model's weights (a worker subscribes to the models it made sure of at start), and a worker can keep to the model
it has loaded while that model's work waits.

A card class is named by its nominal size and has a floor: the least memory its cards report (an "8 GB" RTX 4060
has 7.996 GiB, an A10 "24 GB" 22.5 GiB). A job waits in the queue of the smallest class on whose floor a plan for
its model and shape fits. A worker consumes the queues of every class whose jobs all have a plan on its own card,
biggest first: a 24 GB card prefers 9B work and takes 4B work when no 9B work waits, an 8 GB card never sees a 9B
job, and an Apple MPS share (no fp8) serves only the classes its bf16 plans cover. Both sides ask the same
function, so a job a worker takes is a job it can load.
"""

from __future__ import annotations

import hashlib
import re

from schemas.models import looks_like_path
from schemas.plan import Card, Shape, headroom_gib, plan_for

TIER_FLOOR_GIB = {8: 7.75, 12: 11.5, 16: 15.5, 24: 22.0, 48: 44.0, 80: 76.0}
TIERS = tuple(TIER_FLOOR_GIB)
QUEUE_PREFIX = "kiln.render"


def reference_card(tier: int) -> Card:
    """The weakest card of a class, on which the dispatcher plans: its floor, and no fp8 math (fp8 weights take
    the same memory with or without it)."""
    return Card("cuda", TIER_FLOOR_GIB[tier])


def need_tier(profile: str, shape: Shape, above: int = 0) -> int | None:
    """The smallest class above `above` on which `shape` of `profile` has a plan, or None when none has."""
    for tier in TIERS:
        if tier > above and plan_for(profile, reference_card(tier), shape) is not None:
            return tier
    return None


def model_key(model: str) -> str:
    """A model's part of a queue name: its registry name in characters Redis keys and logs take well, or for a
    folder (an absolute path) a digest of the path."""
    if looks_like_path(model):
        return "folder-" + hashlib.sha256(model.encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9_-]", "-", model)


def queue_name(model: str, tier: int) -> str:
    """The render queue for `model`'s jobs that need a card of class `tier`."""
    return f"{QUEUE_PREFIX}.{model_key(model)}.vram{tier}"


def queue_tier(queue: str) -> int:
    """The card class a queue serves."""
    return int(queue.rpartition(".vram")[2])


def queue_model_key(queue: str) -> str:
    """The model key (model_key) of a queue's jobs."""
    return queue.removeprefix(QUEUE_PREFIX + ".").rpartition(".vram")[0]


def worker_tiers(card: Card, profile: str) -> list[int]:
    """The classes that hold jobs of `profile` and whose every such job has a plan on `card`, biggest first."""
    have = headroom_gib(profile, card)
    if have is None:
        return []

    def covers(tier: int) -> bool:
        needed = headroom_gib(profile, reference_card(tier))
        return needed is not None and have >= needed

    return [t for t in reversed(TIERS) if TIER_FLOOR_GIB[t] <= card.gib and covers(t)]


def worker_queues(card: Card, model: str, profile: str) -> list[str]:
    """The queues of `model` (whose memory profile is `profile`) that a worker with `card` consumes, the biggest
    jobs first."""
    return [queue_name(model, t) for t in worker_tiers(card, profile)]


def why_unfit(profile: str, shape: Shape, largest_tier: int | None) -> str:
    """Why no live worker can take a job, in words for `kiln status`."""
    tier = need_tier(profile, shape)
    what = f"{profile} at {shape.megapixels:.2f} MP" + (f" with {shape.references} reference image(s)"
                                                         if shape.references else "")
    if tier is None:
        return f"{what} fits no card Kiln knows (up to {TIERS[-1]} GB)"
    have = f"the largest worker takes {largest_tier} GB work" if largest_tier else "no worker is online"
    return f"needs a {tier} GB card for {what}; {have}"


def job_queue(model: str, profile: str, width: int, height: int, references: int = 0,
              above: int = 0) -> str | None:
    """The render queue of a one-image job of `model`, or None when no card Kiln knows can take it."""
    tier = need_tier(profile, Shape.of(width, height, 1, references), above)
    return queue_name(model, tier) if tier is not None else None
