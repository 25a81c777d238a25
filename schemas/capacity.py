"""Which jobs go to which cards: one render queue per card class, chosen by the loading plan (schemas/plan.py).

A card class is named by its nominal size and has a floor: the least memory its cards report (an "8 GB" RTX 4060
has 7.996 GiB, an A10 "24 GB" 22.5 GiB). A job waits in the queue of the smallest class on whose floor a plan for
its model and shape fits. A worker consumes the queues of every class whose jobs all have a plan on its own card,
biggest first: a 24 GB card prefers 9B work and takes 4B work when no 9B work waits, an 8 GB card never sees a 9B
job, and an Apple MPS share (no fp8) serves only the classes its bf16 plans cover. Both sides ask the same
function, so a job a worker takes is a job it can load.
"""

from __future__ import annotations

from schemas.plan import PROFILES, Card, Shape, headroom_gib, plan_for

TIER_FLOOR_GIB = {8: 7.75, 12: 11.5, 16: 15.5, 24: 22.0, 48: 44.0, 80: 76.0}
TIERS = tuple(TIER_FLOOR_GIB)
QUEUE_PREFIX = "kiln.render.vram"


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


def queue_name(tier: int) -> str:
    """The render queue for jobs that need a card of class `tier`."""
    return f"{QUEUE_PREFIX}{tier}"


def queue_tier(queue: str) -> int:
    """The card class a queue serves."""
    return int(queue.removeprefix(QUEUE_PREFIX))


def worker_tiers(card: Card) -> list[int]:
    """The classes whose every job has a plan on `card`, biggest first."""
    def covers(tier: int) -> bool:
        for profile in PROFILES:
            needed = headroom_gib(profile, reference_card(tier))
            have = headroom_gib(profile, card)
            if needed is not None and (have is None or have < needed):
                return False
        return True

    return [t for t in reversed(TIERS) if TIER_FLOOR_GIB[t] <= card.gib and covers(t)]


def worker_queues(card: Card) -> list[str]:
    """The queues a worker with `card` consumes, the biggest jobs first."""
    return [queue_name(t) for t in worker_tiers(card)]


def why_unfit(profile: str, shape: Shape, largest_tier: int | None) -> str:
    """Why no live worker can take a job, in words for `kiln status`."""
    tier = need_tier(profile, shape)
    what = f"{profile} at {shape.megapixels:.2f} MP" + (f" with {shape.references} reference image(s)"
                                                         if shape.references else "")
    if tier is None:
        return f"{what} fits no card Kiln knows (up to {TIERS[-1]} GB)"
    have = f"the largest worker takes {largest_tier} GB work" if largest_tier else "no worker is registered"
    return f"needs a {tier} GB card for {what}; {have}"


def job_queue(profile: str, width: int, height: int, references: int = 0, above: int = 0) -> str | None:
    """The render queue of a one-image job, or None when no card Kiln knows can take it."""
    tier = need_tier(profile, Shape.of(width, height, 1, references), above)
    return queue_name(tier) if tier is not None else None
