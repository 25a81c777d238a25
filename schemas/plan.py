"""The loading plan: for a model, a card and a job's shape, how each component is stored, where it lives and when
it is on the accelerator. The dispatcher reads it to choose a job's queue; the worker reads it to load the model.

Strategies, fastest first (bf16 before fp8: a plan only gives up precision to fit):

| strategy      | transformer                          | text encoder                                        |
|---------------|--------------------------------------|-----------------------------------------------------|
| bf16-resident | bf16, on the card                    | bf16, on the card beside it                         |
| bf16-staged   | bf16, on the card                    | on the card only while it encodes the jobs in hand   |
| fp8-staged    | float8 weights (torchao fp8 math on  | as above                                             |
|               | compute capability 8.9+, else fp8    |                                                      |
|               | storage with bf16 compute)           |                                                      |

Between its stages a staged encoder waits in host memory (a discrete GPU) or is released and loaded again from disk
(unified memory: Apple MPS, or a CPU told to keep within --vram), where moving it would free nothing. The VAE is
always on the card. Sizes are GiB from the published configs (tests/test_plan.py recomputes them); activation
figures are estimates that `benchmarks/gpu.py` checks against measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RESERVE_GIB = 0.5  # CUDA context, cuBLAS workspace and allocator slack: never planned for tensors
ENCODE_CHUNK = 4  # prompts through the text encoder at once, so its activations have a fixed bound
REFERENCE_MP = 1024 * 1024 / 1e6  # the pipeline shrinks every reference image to at most this many megapixels
DeviceKind = Literal["cuda", "mps", "cpu"]
Stage = Literal["encode", "denoise"]  # prompts through the text encoder; denoising and decoding
STAGES: tuple[Stage, ...] = ("encode", "denoise")


@dataclass(frozen=True)
class Profile:
    """A model family's memory: weights per component (GiB) and activation estimates."""

    text_encoder_gib: float  # bf16, the 27 layers whose hidden states klein reads, no LM head
    transformer_gib: float  # bf16
    transformer_fp8_gib: float  # float8 linear weights + scales + the layers kept in bf16 + one layer upcast
    vae_gib: float
    text_activation_gib: float  # ENCODE_CHUNK prompts of 512 tokens with every hidden state kept
    transformer_gib_per_mp: float  # activations per megapixel of image tokens, per image in the batch
    decode_gib_per_mp: float  # VAE decode (and encode of references) per megapixel, one image at a time
    fixed_activation_gib: float = 1.0  # latents, embeddings, rotary tables, kernel workspaces

    def activation_gib(self, shape: Shape) -> float:
        """Peak activation memory of one denoise-and-decode call of `shape`. The VAE decodes one image at a time."""
        tokens_mp = shape.megapixels + shape.references * REFERENCE_MP
        vae_mp = max(shape.megapixels, REFERENCE_MP if shape.references else 0.0)
        return (self.fixed_activation_gib + self.decode_gib_per_mp * vae_mp
                + self.transformer_gib_per_mp * tokens_mp * shape.batch)


_KLEIN_4B = Profile(text_encoder_gib=5.80, transformer_gib=7.22, transformer_fp8_gib=3.78, vae_gib=0.16,
                    text_activation_gib=0.40, transformer_gib_per_mp=0.30, decode_gib_per_mp=1.5)
_KLEIN_9B = Profile(text_encoder_gib=10.86, transformer_gib=16.91, transformer_fp8_gib=8.75, vae_gib=0.16,
                    text_activation_gib=0.60, transformer_gib_per_mp=0.40, decode_gib_per_mp=1.5)
_TINY = Profile(text_encoder_gib=0.001, transformer_gib=0.001, transformer_fp8_gib=0.001, vae_gib=0.001,
                text_activation_gib=0.01, transformer_gib_per_mp=0.01, decode_gib_per_mp=0.05,
                fixed_activation_gib=0.01)
PROFILES: dict[str, Profile] = {"klein-4b": _KLEIN_4B, "klein-base-4b": _KLEIN_4B, "klein-9b": _KLEIN_9B,
                                "klein-base-9b": _KLEIN_9B, "tiny": _TINY}


@dataclass(frozen=True)
class Card:
    """What renders: its kind, the memory Kiln may use on it (GiB, after --vram) and whether it has fp8 math."""

    kind: DeviceKind
    gib: float
    fp8_math: bool = False  # CUDA compute capability 8.9+ (RTX 40/50, L4, H100)

    @property
    def unified(self) -> bool:
        """Memory shared with the host: moving a component off the accelerator frees nothing."""
        return self.kind != "cuda"

    @property
    def usable_gib(self) -> float:
        """What the plan may fill with weights and activations."""
        return self.gib - RESERVE_GIB

    def __str__(self) -> str:
        return f"{self.kind} {self.gib:.1f} GiB" + (", fp8 math" if self.fp8_math else "")


@dataclass(frozen=True)
class Shape:
    """What a pipeline call asks of memory: image size, images at once, reference images."""

    megapixels: float
    batch: int = 1
    references: int = 0

    @classmethod
    def of(cls, width: int, height: int, batch: int = 1, references: int = 0) -> Shape:
        """The shape of `batch` images of width x height."""
        return cls(width * height / 1e6, batch, references)


@dataclass(frozen=True)
class Strategy:
    """One way to load a model."""

    name: str
    fp8: bool  # transformer weights stored as float8
    staged: bool  # text encoder on the card only while it encodes


STRATEGIES = (Strategy("bf16-resident", False, False), Strategy("bf16-staged", False, True),
              Strategy("fp8-staged", True, True))
Fp8Method = Literal["torchao", "layerwise"]


@dataclass(frozen=True)
class Component:
    """One component's part of a plan."""

    name: Literal["text_encoder", "transformer", "vae"]
    storage: Literal["bf16", "fp8"]
    staged: bool  # on the card only during its own stage (text encoder: encoding; transformer: denoising)
    gib: float


@dataclass(frozen=True)
class Plan:
    """How one model is loaded on one card for one shape, and what that needs."""

    profile: str
    strategy: Strategy
    fp8: Fp8Method | None  # how fp8 weights compute: torchao fp8 matmuls, or upcast to bf16 layer by layer
    release_staged: bool  # a staged encoder is released and reloaded (unified memory), not parked in host RAM
    encode_gib: float  # peak while encoding prompts
    denoise_gib: float  # peak while denoising and decoding

    @property
    def components(self) -> tuple[Component, ...]:
        """Each component's storage, stage and size."""
        p = PROFILES[self.profile]
        return (Component("text_encoder", "bf16", self.strategy.staged, p.text_encoder_gib),
                Component("transformer", "fp8" if self.strategy.fp8 else "bf16", self.strategy.staged,
                          p.transformer_fp8_gib if self.strategy.fp8 else p.transformer_gib),
                Component("vae", "bf16", False, p.vae_gib))

    def stage_gib(self, stage: Stage) -> float:
        """The peak planned for one stage."""
        return self.encode_gib if stage == "encode" else self.denoise_gib

    @property
    def need_gib(self) -> float:
        """The card memory this plan needs, the reserve included."""
        return max(self.encode_gib, self.denoise_gib) + RESERVE_GIB

    def describe(self) -> str:
        """One line for logs, results and `kiln workers`: 'fp8-staged (fp8 torchao, encoder staged)'."""
        parts = []
        if self.fp8:
            parts.append("fp8 " + ("torchao" if self.fp8 == "torchao" else "storage, bf16 compute"))
        if self.strategy.staged:
            parts.append("encoder " + ("released between stages" if self.release_staged else "staged"))
        return self.strategy.name + (f" ({', '.join(parts)})" if parts else "")


def _allowed(card: Card) -> tuple[Strategy, ...]:
    # Apple's MPS has no float8 dtype.
    return tuple(s for s in STRATEGIES if not (s.fp8 and card.kind == "mps"))


def _stages(profile: Profile, strategy: Strategy, activation: float) -> tuple[float, float]:
    transformer = profile.transformer_fp8_gib if strategy.fp8 else profile.transformer_gib
    denoise = transformer + profile.vae_gib + activation
    if strategy.staged:
        return profile.text_encoder_gib + profile.vae_gib + profile.text_activation_gib, denoise
    return profile.text_encoder_gib + denoise, profile.text_encoder_gib + denoise


def headroom_gib(profile: str, card: Card) -> float | None:
    """The most activation memory any plan for `profile` leaves room for on `card`, or None if none loads."""
    best = None
    for strategy in _allowed(card):
        encode, denoise = _stages(PROFILES[profile], strategy, 0.0)
        if encode <= card.usable_gib and denoise <= card.usable_gib:
            room = card.usable_gib - denoise
            best = room if best is None else max(best, room)
    return best


def plan_for(profile: str, card: Card, shape: Shape, keep: str | None = None) -> Plan | None:
    """The fastest plan for `profile` at `shape` that fits `card`, or None when none does. The strategy named
    `keep` (the one a loaded model has) is tried first, so a change of shape reloads nothing while it fits."""
    p = PROFILES[profile]
    activation = p.activation_gib(shape)
    for strategy in sorted(_allowed(card), key=lambda s: s.name != keep):
        encode, denoise = _stages(p, strategy, activation)
        if max(encode, denoise) <= card.usable_gib:
            fp8: Fp8Method | None = ("torchao" if card.fp8_math else "layerwise") if strategy.fp8 else None
            return Plan(profile, strategy, fp8, card.unified, encode, denoise)
    return None
