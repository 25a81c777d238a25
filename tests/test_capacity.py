"""The fit rules as a table: which card takes which job, and in which queue it waits."""

from __future__ import annotations

import pytest

from schemas.capacity import STRATEGIES, best_strategy, job_queue, need_tier, why_unfit, worker_queues

MP_512, MP_1024 = 512 * 512 / 1e6, 1024 * 1024 / 1e6


@pytest.mark.parametrize(("profile", "megapixels", "vram", "strategy"), [
    ("klein-4b", MP_1024, 8, "fp8-staged"),
    ("klein-4b", MP_1024, 12, "bf16-staged"),
    ("klein-4b", MP_1024, 16, "bf16-staged"),
    ("klein-4b", MP_1024, 24, "bf16-resident"),
    ("klein-4b", MP_512, 8, "fp8-staged"),
    ("klein-9b", MP_1024, 8, None),
    ("klein-9b", MP_1024, 12, None),
    ("klein-9b", MP_1024, 16, "fp8-staged"),
    ("klein-9b", MP_1024, 24, "bf16-staged"),
    ("klein-9b", MP_1024, 48, "bf16-resident"),
    ("klein-base-9b", MP_512, 16, "fp8-staged"),
    ("tiny", MP_1024, 1, "resident"),
])
def test_best_strategy_per_card(profile: str, megapixels: float, vram: float, strategy: str | None) -> None:
    found = best_strategy(profile, vram, megapixels)
    assert (found.name if found else None) == strategy


@pytest.mark.parametrize(("profile", "megapixels", "batch", "tier"), [
    ("klein-4b", MP_1024, 1, 8),  # the design card: 4B on 8 GB
    ("klein-9b", MP_1024, 1, 16),  # 9B on 16 GB and up
    ("klein-4b", MP_1024, 4, 12),  # batches count: four 1 MP images need more room
    ("klein-9b", MP_1024, 8, 24),
    ("klein-9b", MP_1024, 32, 80),
    ("klein-9b", MP_1024, 64, None),
])
def test_need_tier_counts_resolution_and_batch(profile: str, megapixels: float, batch: int, tier: int | None) -> None:
    assert need_tier(profile, megapixels, batch) == tier


def test_every_strategy_fits_its_own_card_at_one_megapixel() -> None:
    for profile, strategies in STRATEGIES.items():
        for s in strategies:
            assert s.need_gb(MP_1024) <= max(s.min_vram_gb, 1), (profile, s)


def test_after_an_oom_a_job_needs_a_bigger_card_than_the_one_that_failed() -> None:
    assert job_queue("klein-4b", 1024, 1024) == "kiln.render.vram8"
    assert job_queue("klein-4b", 1024, 1024, at_least=8) == "kiln.render.vram12"
    assert job_queue("klein-9b", 1024, 1024, at_least=24) == "kiln.render.vram48"
    assert job_queue("klein-9b", 1024, 1024, at_least=80) is None


@pytest.mark.parametrize(("vram", "queues"), [
    (6, []),
    (8, ["kiln.render.vram8"]),
    (16, ["kiln.render.vram16", "kiln.render.vram12", "kiln.render.vram8"]),
    (24.5, ["kiln.render.vram24", "kiln.render.vram16", "kiln.render.vram12", "kiln.render.vram8"]),
])
def test_workers_consume_their_tiers_biggest_first(vram: float, queues: list[str]) -> None:
    assert worker_queues(vram) == queues


def test_unfit_reasons_say_what_card_is_needed() -> None:
    assert why_unfit("klein-9b", MP_1024, 8) == ("needs a 16 GB card for klein-9b at 1.05 MP; "
                                                 "the largest worker has 8 GB")
    assert "no worker is registered" in why_unfit("klein-4b", MP_1024, None)
