"""The loading plan as a table (which strategy on which card), the queues it chooses, and the promise that the
dispatcher's queue choice and the worker's loader agree on every card."""

from __future__ import annotations

import itertools
import re

import pytest

from schemas.capacity import (
    TIER_FLOOR_GIB,
    TIERS,
    job_queue,
    model_key,
    need_tier,
    queue_model_key,
    queue_name,
    queue_tier,
    reference_card,
    why_unfit,
    worker_queues,
)
from schemas.plan import PROFILES, RESERVE_GIB, Card, Shape, plan_for

MP_1024 = Shape.of(1024, 1024)
RTX_4060, RTX_3060, RTX_4060_TI, RTX_3090, RTX_4090 = (Card("cuda", 7.996, True), Card("cuda", 12.0, False),
                                                       Card("cuda", 15.996, True), Card("cuda", 24.0, False),
                                                       Card("cuda", 23.99, True))


@pytest.mark.parametrize(("profile", "card", "shape", "described"), [
    ("klein-4b", RTX_4060, MP_1024, "fp8-staged (fp8 torchao, encoder staged)"),  # the design card: 4B on 8 GB
    ("klein-4b", Card("cuda", 8.0), MP_1024, "fp8-staged (fp8 storage, bf16 compute, encoder staged)"),  # RTX 3070
    ("klein-4b", RTX_3060, MP_1024, "bf16-staged (encoder staged)"),
    ("klein-4b", RTX_4060_TI, MP_1024, "bf16-staged (encoder staged)"),
    ("klein-4b", RTX_4090, MP_1024, "bf16-resident"),
    ("klein-4b", Card("cuda", 7.996), Shape.of(512, 512), "fp8-staged (fp8 storage, bf16 compute, encoder staged)"),
    ("klein-9b", RTX_4060_TI, MP_1024, "fp8-staged (fp8 torchao, encoder staged)"),  # 9B on 16 GB
    ("klein-9b", RTX_3090, MP_1024, "bf16-staged (encoder staged)"),
    ("klein-9b", Card("cuda", 48.0), MP_1024, "bf16-resident"),
    ("klein-base-9b", RTX_4060_TI, Shape.of(512, 512), "fp8-staged (fp8 torchao, encoder staged)"),
    ("klein-4b", Card("mps", 11.2), MP_1024, "bf16-staged (encoder released between stages)"),  # a 16 GB Mac
    ("klein-4b", Card("cpu", 8.0), MP_1024,
     "fp8-staged (fp8 storage, bf16 compute, encoder released between stages)"),
    ("tiny", Card("cpu", 1.0), MP_1024, "bf16-resident"),
])
def test_the_plan_per_card(profile: str, card: Card, shape: Shape, described: str) -> None:
    plan = plan_for(profile, card, shape)
    assert plan is not None and plan.describe() == described
    assert plan.need_gib <= card.gib


@pytest.mark.parametrize(("profile", "card"), [
    ("klein-9b", RTX_4060), ("klein-9b", RTX_3060), ("klein-4b", Card("mps", 7.9)), ("klein-9b", Card("mps", 16.0)),
    ("klein-4b", Card("cpu", 0.0)),
])
def test_no_plan_where_nothing_fits(profile: str, card: Card) -> None:
    assert plan_for(profile, card, MP_1024) is None


def test_every_plan_leaves_the_reserve_free_and_stages_what_it_says() -> None:
    for profile, tier in itertools.product(PROFILES, TIERS):
        plan = plan_for(profile, reference_card(tier), MP_1024)
        if plan is None:
            continue
        assert plan.need_gib <= TIER_FLOOR_GIB[tier]
        assert plan.need_gib - max(plan.encode_gib, plan.denoise_gib) == pytest.approx(RESERVE_GIB)
        staged = {c.name for c in plan.components if c.staged}
        assert staged == ({"text_encoder", "transformer"} if plan.strategy.staged else set())
        assert {c.name: c.storage for c in plan.components}["transformer"] == ("fp8" if plan.strategy.fp8 else "bf16")


def test_a_loaded_strategy_is_kept_while_it_fits() -> None:
    bigger = Shape.of(1024, 1024, 2)
    assert plan_for("klein-4b", RTX_4090, bigger, keep="bf16-staged").strategy.name == "bf16-staged"  # type: ignore[union-attr]
    assert plan_for("klein-4b", RTX_4090, bigger).strategy.name == "bf16-resident"  # type: ignore[union-attr]
    assert plan_for("klein-4b", RTX_4060, MP_1024, keep="bf16-resident").strategy.name == "fp8-staged"  # type: ignore[union-attr]


@pytest.mark.parametrize(("profile", "shape", "tier"), [
    ("klein-4b", MP_1024, 8),  # the design card: 4B on 8 GB
    ("klein-9b", MP_1024, 16),  # 9B on 16 GB and up
    ("klein-4b", Shape.of(1024, 1024, 4), 12),  # batches count: four 1 MP images need more room
    ("klein-4b", Shape.of(1024, 1024, 1, references=1), 8),
    ("klein-4b", Shape.of(1024, 1024, 1, references=2), 12),  # so do reference images' tokens
    ("klein-9b", Shape.of(1024, 1024, 8), 16),
    ("klein-9b", Shape.of(1024, 1024, 16), 24),
    ("klein-9b", Shape.of(1024, 1024, 32), 48),
    ("klein-9b", Shape.of(1024, 1024, 64), 48),  # fp8 weights leave the room
    ("klein-9b", Shape.of(1024, 1024, 128), 80),
    ("klein-9b", Shape.of(1024, 1024, 200), None),
    ("tiny", MP_1024, 8),
])
def test_need_tier_counts_resolution_batch_and_references(profile: str, shape: Shape, tier: int | None) -> None:
    assert need_tier(profile, shape) == tier


def test_after_an_oom_a_job_needs_a_bigger_class_than_the_one_that_failed() -> None:
    assert job_queue("klein-4b", "klein-4b", 1024, 1024) == "kiln.render.klein-4b.vram8"
    assert job_queue("klein-4b", "klein-4b", 1024, 1024, above=8) == "kiln.render.klein-4b.vram12"
    assert job_queue("tiny:klein-9b", "klein-9b", 1024, 1024, above=24) == "kiln.render.tiny-klein-9b.vram48"
    assert job_queue("klein-9b", "klein-9b", 1024, 1024, above=80) is None


def test_queues_are_per_model_and_name_folders_by_a_digest_of_their_path() -> None:
    folder = job_queue("/data/models/my klein", "klein-4b", 512, 512)
    assert folder is not None and re.fullmatch(r"kiln\.render\.folder-[0-9a-f]{12}\.vram8", folder)
    assert folder != job_queue("/data/models/other", "klein-4b", 512, 512)
    assert (queue_model_key(folder), queue_tier(folder)) == (model_key("/data/models/my klein"), 8)
    assert queue_model_key("kiln.render.tiny-klein-9b.vram16") == "tiny-klein-9b" == model_key("tiny:klein-9b")


@pytest.mark.parametrize(("card", "tiers_4b", "tiers_9b"), [
    (Card("cuda", 6.0), [], []),
    (RTX_4060, [8], []),  # 7.996 GiB: an "8 GB" card is a little under 8 GiB
    (RTX_4060_TI, [16, 12, 8], [16]),
    (Card("cuda", 22.49), [24, 16, 12, 8], [24, 16]),
    (Card("cuda", 79.6, True), [80, 48, 24, 16, 12, 8], [80, 48, 24, 16]),
    # no fp8 on Apple silicon: a 16 GB Mac's share serves the 8 GB class with bf16, and no 9B work
    (Card("mps", 11.2), [8], []),
    (Card("mps", 17.0), [12, 8], []),
    (Card("cpu", 0.0), [], []),  # a CPU worker takes nothing unless --vram says so
    (Card("cpu", 8.0), [8], []),
])
def test_workers_consume_the_classes_their_card_covers_biggest_first(card: Card, tiers_4b: list[int],
                                                                      tiers_9b: list[int]) -> None:
    assert worker_queues(card, "klein-4b", "klein-4b") == [f"kiln.render.klein-4b.vram{t}" for t in tiers_4b]
    assert worker_queues(card, "klein-9b", "klein-9b") == [f"kiln.render.klein-9b.vram{t}" for t in tiers_9b]


def test_the_queue_choice_and_the_loader_agree_on_every_card() -> None:
    """Whatever job the dispatcher puts in a queue, every worker that consumes that queue has a plan for it."""
    cards = [Card(kind, gib / 4, fp8)
             for kind in ("cuda", "mps", "cpu") for gib in range(16, 400, 3) for fp8 in (False, True)
             if not (fp8 and kind != "cuda")]
    shapes = [Shape.of(w, h, batch, refs) for w in (256, 512, 768, 1024) for h in (512, 1024)
              for batch in (1, 2, 4, 8, 16) for refs in (0, 1, 3)]
    checked = 0
    for profile in PROFILES:
        queues = {card: worker_queues(card, profile, profile) for card in cards}
        for shape in shapes:
            tier = need_tier(profile, shape)
            if tier is None:
                continue
            for card in cards:
                if queue_name(profile, tier) in queues[card]:
                    assert plan_for(profile, card, shape) is not None, (profile, shape, card)
                    checked += 1
    assert checked > 10_000


def test_unfit_reasons_say_what_card_is_needed() -> None:
    assert why_unfit("klein-9b", MP_1024, 8) == ("needs a 16 GB card for klein-9b at 1.05 MP; "
                                                 "the largest worker takes 8 GB work")
    assert "no worker is online" in why_unfit("klein-4b", MP_1024, None)
    assert "with 1 reference image(s)" in why_unfit("klein-4b", Shape.of(1024, 1024, 1, 1), None)
