"""Speed-ups that leave what is rendered alone: the attention kernel, chosen for this card by timing the candidates
on the model's own attention shape, and regional torch.compile of the transformer's repeated blocks.

KILN_ATTENTION=auto times the exact attention kernels usable here (PyTorch's SDPA as it dispatches by itself, and
its cuDNN, flash and memory-efficient kernels forced; flash-attn 2 and 3 when installed) once per loaded model on
a CUDA card, and keeps the fastest whose output matches SDPA's; elsewhere SDPA is left to choose. A named backend
(any of diffusers' `AttentionBackendName`, approximate ones such as sage included) is used as named.

KILN_COMPILE=auto tries a compile on CUDA (with Triton) when the plan computes without per-layer hooks (layerwise
fp8 casting moves weights inside forward, which a full graph cannot hold) and, for `kiln render`, when the batch
has at least COMPILE_MIN_IMAGES images: the first jobs are timed eagerly, then compiled, and the compile is kept
only where it renders at least COMPILE_MIN_GAIN faster on this card (CompileTrial). On this project's CPU the tiny
model's compile took 28 s and saved 10% an image (break-even after some 1,400 images), so a CPU compiles only when
told to (`on`). A compile that fails on this machine (no compiler, a kernel Triton cannot build) falls back to
eager with one warning; the job renders.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from schemas.errors import ConfigError, first_line
from schemas.plan import Plan

log = logging.getLogger("kiln.worker")
# Exact attention only: what `auto` may pick without changing an image beyond rounding.
AUTO_CANDIDATES = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3")
MATCH_TOLERANCE = 0.05  # largest difference from SDPA's output, relative to its largest value, a kernel may show
TIMED_CALLS = 5
TEXT_TOKENS = 512  # the pipeline pads every prompt to this many tokens
TRIAL_CALLS = 2  # timed calls of each way in a compile trial (the fastest counts)
COMPILE_MIN_GAIN = 0.03  # a compile is kept when it renders at least this much faster: new sizes compile again


def check_attention(name: str) -> None:
    """Fail at start, with what to do, when KILN_ATTENTION names a backend diffusers lacks or one whose package is
    not installed here. Hub kernels (`*_hub`) are fetched by diffusers on first use, so they need the internet."""
    if name == "auto":
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    names = sorted(b.value for b in AttentionBackendName)
    if name not in names:
        raise ConfigError(f"attention backend {name!r} (KILN_ATTENTION, --attention): not one diffusers knows; "
                          "use auto or one of " + ", ".join(names))
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as exc:
        raise ConfigError(f"attention backend {name!r} (KILN_ATTENTION, --attention) cannot run here: {exc} "
                          "Or use auto") from None


def attention_tokens(width: int, height: int, references: int = 0) -> int:
    """The sequence length klein's attention sees: text tokens, then one token per 16x16 pixels of the image
    and of each reference (the pipeline shrinks references to at most 1024x1024)."""
    return TEXT_TOKENS + width * height // 256 + references * 1024 * 1024 // 256


def time_attention(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, tokens: int,
                   candidates: Sequence[str]) -> dict[str, float]:
    """Median seconds of one attention call of this shape for each candidate that runs here and matches SDPA's
    output (the first candidate is the reference); those that fail or differ are left out."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
        dispatch_attention_fn,
    )

    generator = torch.Generator("cpu").manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, generator=generator).to(device, dtype) for _ in range(3))
    reference: torch.Tensor | None = None
    timings: dict[str, float] = {}
    for name in candidates:
        try:
            backend = AttentionBackendName(name)
            _check_attention_backend_requirements(backend)
            out = dispatch_attention_fn(q, k, v, backend=backend)  # warm-up, and the output to compare
            if reference is None:
                reference = out.float()
            elif (out.float() - reference).abs().max().item() > MATCH_TOLERANCE * reference.abs().max().item():
                log.info("attention %s differs from SDPA on this card: not used", name)
                continue
            seconds = []
            for _ in range(TIMED_CALLS):
                started = _sync(device)
                dispatch_attention_fn(q, k, v, backend=backend)
                seconds.append(_sync(device) - started)
            timings[name] = statistics.median(seconds)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:  # no kernel for this card/dtype
            log.debug("attention %s does not run here: %s", name, exc)
    return timings


def choose_attention(setting: str, transformer: Any, device: torch.device, dtype: torch.dtype, tokens: int,
                     measure: bool | None = None) -> tuple[str | None, dict[str, float]]:
    """The backend to set on `transformer` (None: leave diffusers' default, SDPA, which dispatches by itself) and
    the timings it rests on. `auto` measures on CUDA (or where `measure` says)."""
    if setting != "auto":
        return setting, {}
    if not (device.type == "cuda" if measure is None else measure):
        return None, {}
    config = transformer.config
    timings = time_attention(device, dtype, config.num_attention_heads, config.attention_head_dim, tokens,
                             AUTO_CANDIDATES)
    if not timings:
        return None, {}
    fastest = min(timings, key=timings.__getitem__)
    log.info("attention on this card at %d tokens: %s; using %s", tokens,
             ", ".join(f"{n} {s * 1e3:.2f} ms" for n, s in sorted(timings.items(), key=lambda t: t[1])), fastest)
    return fastest, timings


@dataclass
class CompileTrial:
    """KILN_COMPILE=auto on a card where a compile can work: the first shape rendered is timed eagerly, then with
    the transformer's blocks compiled, and the faster way is kept. Each phase's first call warms up (kernels; the
    compile itself) and is not counted; calls of other shapes do not count either."""

    shape: tuple[int, ...] | None = None
    eager: list[float] = field(default_factory=list)  # seconds per image, timed calls
    compiled: list[float] = field(default_factory=list)
    warm: bool = False  # this phase's first call is done

    def record(self, shape: tuple[int, ...], seconds: float) -> Literal["compile", "keep", "eager"] | None:
        """Count one call's seconds per image; what to do now: compile (eager is timed), keep the compile or go
        back to eager (both are timed: the trial is over), or nothing yet."""
        if self.shape is None:
            self.shape = shape
        if shape != self.shape:
            return None
        if not self.warm:
            self.warm = True
            return None
        timings = self.eager if len(self.eager) < TRIAL_CALLS else self.compiled
        timings.append(seconds)
        if timings is self.eager:
            if len(self.eager) < TRIAL_CALLS:
                return None
            self.warm = False
            return "compile"
        if len(self.compiled) < TRIAL_CALLS:
            return None
        return "keep" if min(self.compiled) <= (1 - COMPILE_MIN_GAIN) * min(self.eager) else "eager"

    def __str__(self) -> str:
        return f"{min(self.compiled):.3f} s an image compiled against {min(self.eager):.3f} s eager"


def compile_reason(setting: str, device: torch.device, plan: Plan) -> str | None:
    """Why the transformer is not compiled under this setting, device and plan, or None when it is."""
    if setting == "off":
        return "KILN_COMPILE=off"
    if plan.fp8 == "layerwise":
        return "layerwise fp8 casting moves weights inside forward"
    if setting == "on":
        return None
    if device.type != "cuda":
        return f"on {device.type} the warm-up does not pay (KILN_COMPILE=on compiles anyway)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None


def compile_blocks(transformer: Any) -> None:
    """Compile each repeated transformer block (blocks of a kind share their compiled code): regional
    compilation, about the full model's speed-up for a fraction of its compile time."""
    transformer.compile_repeated_blocks(fullgraph=True)


def uncompile_blocks(transformer: Any) -> None:
    """Put every block back to eager."""
    for module in transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def compiled_blocks(transformer: Any) -> int:
    """How many of the transformer's modules run compiled."""
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules())


def compile_failure(exc: BaseException) -> str | None:
    """What went wrong, in a line, when an error came from torch.compile (tracing, or building kernels) rather
    than from running the model; else None. Keeps no reference to the error."""
    from torch._dynamo.exc import TorchDynamoException

    if not isinstance(exc, TorchDynamoException):
        return None
    inner = getattr(exc, "inner_exception", None)  # what the compiler backend raised, when it did
    if inner is not None:
        return f"{type(exc).__name__} from {type(inner).__name__}: {first_line(inner)}"
    return f"{type(exc).__name__}: {first_line(exc)}"


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
