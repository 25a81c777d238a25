"""The plan's weight sizes are the published configs' (recomputed here on the meta device, so the table cannot
drift from the models), and the prompt cache keeps to its budget."""

from __future__ import annotations

import pytest
import torch

from benchmarks.klein import MODELS, components
from schemas.plan import PROFILES
from worker.checkpoints import TEXT_ENCODER_LAYERS
from worker.prompts import PromptCache

GIB = 2**30


def _sizes(model: str) -> dict[str, float]:
    transformer, encoder, vae = components(model, "meta", text_layers=TEXT_ENCODER_LAYERS)
    params = sum(p.numel() for p in transformer.parameters())
    linears = [m.weight for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    in_linears = sum(w.numel() for w in linears)
    # fp8: one byte per linear weight, a float32 scale per row, the rest bf16, and one linear upcast at a time
    fp8 = in_linears + 2 * (params - in_linears) + 4 * sum(w.shape[0] for w in linears) + 2 * max(
        w.numel() for w in linears)
    # what Kiln loads of the encoder: the decoder stack without its final norm and without the LM head
    body = encoder.model
    encoder_params = sum(p.numel() for p in body.parameters()) - sum(p.numel() for p in body.norm.parameters())
    return {"transformer_gib": 2 * params / GIB, "transformer_fp8_gib": fp8 / GIB,
            "text_encoder_gib": 2 * encoder_params / GIB, "vae_gib": 2 * sum(p.numel() for p in vae.parameters()) / GIB}


@pytest.mark.parametrize("model", MODELS)
def test_the_plan_uses_the_sizes_of_the_published_configs(model: str) -> None:
    profile = PROFILES[model]
    for field, gib in _sizes(model).items():
        assert getattr(profile, field) == pytest.approx(gib, rel=0.01, abs=0.01), field


def test_the_9b_encoder_without_its_lm_head_saves_what_the_head_weighs() -> None:
    _, encoder, _ = components("klein-9b", "meta")
    head = encoder.lm_head.weight.numel() * 2 / 1e9
    assert head == pytest.approx(1.24, abs=0.01)  # Qwen3-8B's embeddings are untied: the head is its own 1.24 GB


def test_the_prompt_cache_keeps_to_its_budget_and_drops_the_oldest_first() -> None:
    entry = torch.zeros(512, 8, dtype=torch.bfloat16)  # 8 KiB
    cache = PromptCache(max_bytes=3 * 8192)
    for prompt in ("a", "b", "c"):
        cache.put("m", prompt, entry)
    assert cache.get("m", "a") is not None  # a is now the most recently used
    cache.put("m", "d", entry)
    assert (len(cache), cache.bytes) == (3, 3 * 8192)
    assert cache.get("m", "b") is None and cache.get("m", "a") is not None and cache.get("other", "a") is None
    assert (cache.hits, cache.misses) == (2, 2)
    cache.put("m", "huge", torch.zeros(512, 100, dtype=torch.bfloat16))  # bigger than the budget: not kept
    assert cache.get("m", "huge") is None and len(cache) == 3
