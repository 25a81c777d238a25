"""The `tiny` model: a small random-weight FLUX.2 [klein] built from the real classes.

It keeps the real geometry (VAE scale factor 8, 32 latent channels patchified to 128, sizes in multiples of 16,
a Qwen3 text encoder read at layers 9, 18 and 27 with a Qwen chat template), so its cost grows with resolution
like the real model's, while a 512x512 image takes a fraction of a second on a CPU. It is built once into the
cache folder and then loaded with `from_pretrained` like any other model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas.files import folder_once
from schemas.models import tiny_path, tiny_small_decoder_path

TEXT_HIDDEN = 16
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template, cut to what Flux2KleinPipeline uses (one user turn, thinking disabled).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SCHEDULER = {  # the published klein scheduler config
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 4096,
    "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0, "shift_terminal": None,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}


def ensure_tiny(cache_dir: Path) -> Path:
    """Build the tiny model into the cache once (atomically: a half-built folder is never left behind)."""
    return _built(tiny_path(cache_dir), "model_index.json", build_tiny_pipeline)


def ensure_tiny_small_decoder(cache_dir: Path) -> Path:
    """The tiny model's small decoder, as FLUX.2-small-decoder is to klein: the tiny VAE's encoder with a slimmer
    decoder (random weights), built once."""
    return _built(tiny_small_decoder_path(cache_dir), "config.json", lambda: build_tiny_small_decoder(cache_dir))


def build_tiny_small_decoder(cache_dir: Path) -> Any:
    import torch
    from diffusers import AutoencoderKLFlux2

    full = AutoencoderKLFlux2.from_pretrained(ensure_tiny(cache_dir) / "vae")
    torch.manual_seed(1)
    small = AutoencoderKLFlux2.from_config({**full.config, "decoder_block_out_channels": (4, 4, 4, 4)})
    encoder = {k: v for k, v in full.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    small.load_state_dict(encoder, strict=False)
    return small


def _built(target: Path, marker: str, build: Callable[[], Any]) -> Path:
    def fill(staging: Path) -> None:
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar for a 1 MB model
        build().save_pretrained(staging)
    return folder_once(target, marker, fill)


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template, made without the hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]  # lazily exported

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return Qwen2TokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              chat_template=CHAT_TEMPLATE)


def build_tiny_pipeline(text_layers: int = 28) -> Any:
    """The tiny pipeline in memory, with seeded random weights."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=text_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        tie_word_embeddings=True))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_HIDDEN, timestep_guidance_channels=32,
        axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False, mlp_ratio=2.0)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=32, norm_num_groups=4, mid_block_add_attention=False, patch_size=(2, 2), sample_size=64)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.loads(json.dumps(SCHEDULER)))
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=True)
