"""Which jobs fit which cards: the memory rules as data.

A job's need is the smallest card on which some strategy for its model holds the weights that are on the GPU at
once plus the activations for its resolution and batch. Jobs are queued by that need (`kiln.render.vram16`), and a
worker consumes the queues at and below its own size, biggest first: a 24 GB card prefers 9B work and takes 4B
work when no 9B work waits, and an 8 GB card never sees a 9B job.

Strategies per model (bf16 sizes from the published configs; the text encoder keeps the 28 layers klein reads):

| model | card  | strategy       | on the GPU at once                                        |
|-------|-------|----------------|-----------------------------------------------------------|
| 4B    | 8 GB  | fp8-staged     | text encoder alone (6.2 GB), then fp8 transformer + VAE    |
| 4B    | 12 GB | bf16-staged    | text encoder alone, then bf16 transformer (7.8 GB) + VAE   |
| 4B    | 24 GB | bf16-resident  | everything (14.2 GB), no shuttling                         |
| 9B    | 16 GB | fp8-staged     | text encoder alone (11.7 GB), then fp8 transformer + VAE   |
| 9B    | 24 GB | bf16-staged    | text encoder alone, then bf16 transformer (18.2 GB) + VAE  |
| 9B    | 48 GB | bf16-resident  | everything (30.1 GB)                                       |
"""

from __future__ import annotations

from dataclasses import dataclass

TIERS = (8, 12, 16, 24, 48, 80)  # GB; the queue a job waits in is named by the first tier its need fits
RESERVE_GB = 0.5  # CUDA context and allocator slack
TEXT_ACTIVATION_GB = 0.5  # 512 tokens through the text encoder


@dataclass(frozen=True)
class Strategy:
    """One way to run a model: the card it needs and what sits on the GPU in each stage."""

    name: str
    min_vram_gb: int
    text_encoder_gb: float  # resident beside the transformer, or alone in its own stage when staged
    transformer_gb: float  # transformer + VAE
    staged: bool  # text encoder and transformer take turns on the GPU
    activation_scale: float = 1.0  # the tiny model's activations are a rounding error

    def need_gb(self, megapixels: float, batch: int = 1) -> float:
        """GPU memory this strategy needs for images of `megapixels`, `batch` at a time."""
        images = self.transformer_gb + self.activation_scale * activation_gb(megapixels, batch)
        if self.staged:
            return max(self.text_encoder_gb + TEXT_ACTIVATION_GB, images) + RESERVE_GB
        return self.text_encoder_gb + images + RESERVE_GB


def activation_gb(megapixels: float, batch: int = 1) -> float:
    """Peak activations, dominated by the VAE decode: an estimate of 1.5 GB per megapixel image plus 1 GB.
    A card that runs out anyway lowers its own ceiling and the job moves to a bigger card."""
    return 1.0 + 1.5 * megapixels * batch


_4B = (Strategy("fp8-staged", 8, 6.2, 4.1, True), Strategy("bf16-staged", 12, 6.2, 7.9, True),
       Strategy("bf16-resident", 24, 6.2, 7.9, False))
_9B = (Strategy("fp8-staged", 16, 11.7, 9.3, True), Strategy("bf16-staged", 24, 11.7, 18.3, True),
       Strategy("bf16-resident", 48, 11.7, 18.3, False))
STRATEGIES: dict[str, tuple[Strategy, ...]] = {
    "klein-4b": _4B, "klein-base-4b": _4B, "klein-9b": _9B, "klein-base-9b": _9B,
    "tiny": (Strategy("resident", 0, 0.0, 0.05, False, activation_scale=0.01),),
}


def best_strategy(profile: str, vram_gb: float, megapixels: float, batch: int = 1) -> Strategy | None:
    """The fastest strategy (least shuttling) that fits a card of `vram_gb`, or None."""
    fitting = [s for s in STRATEGIES[profile] if s.min_vram_gb <= vram_gb and s.need_gb(megapixels, batch) <= vram_gb]
    return max(fitting, key=lambda s: s.min_vram_gb, default=None)


def need_tier(profile: str, megapixels: float, batch: int = 1, at_least: int = 0) -> int | None:
    """The smallest tier (GB) on which the job fits and which is above `at_least`, or None when none does."""
    for tier in TIERS:
        if tier > at_least and best_strategy(profile, tier, megapixels, batch):
            return tier
    return None


def queue_name(tier: int) -> str:
    """The render queue for jobs that need a card of `tier` GB."""
    return f"kiln.render.vram{tier}"


def worker_queues(vram_gb: float) -> list[str]:
    """The queues a card of `vram_gb` consumes, the biggest jobs first."""
    return [queue_name(t) for t in reversed(TIERS) if t <= vram_gb]


def why_unfit(profile: str, megapixels: float, largest_worker_gb: float | None) -> str:
    """Why no registered worker can take a job, in words for `kiln status`."""
    tier = need_tier(profile, megapixels)
    if tier is None:
        return f"{profile} at {megapixels:.2f} MP fits no card Kiln knows (up to {TIERS[-1]} GB)"
    have = f"the largest worker has {largest_worker_gb:g} GB" if largest_worker_gb else "no worker is registered"
    return f"needs a {tier} GB card for {profile} at {megapixels:.2f} MP; {have}"


def job_queue(profile: str, width: int, height: int, at_least: int = 0) -> str | None:
    """The render queue of a one-image job, or None when no card Kiln knows can take it."""
    tier = need_tier(profile, width * height / 1e6, 1, at_least)
    return queue_name(tier) if tier is not None else None
