"""The device Kiln renders on: which one, the memory it may use there (the Card the plan reads), and the cap
that keeps it to that memory.

A worker's main process measures its card through NVML without initializing CUDA, so the GPU process Celery
forks can; the GPU process measures the same card through torch. Unified memory (Apple MPS, a CPU) is shared
with the system: a Mac advertises a share of it, and a CPU worker advertises nothing unless `--vram` says so.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from schemas.errors import ConfigError, ModelError
from schemas.plan import RESERVE_GIB, Card

log = logging.getLogger("kiln.worker")
GIB = 2**30
MPS_SHARE = 0.7  # of a Mac's memory: about what macOS lets the GPU wire (recommendedMaxWorkingSetSize)
FP8_MATH = (8, 9)  # compute capability from which CUDA cards multiply in fp8 (Ada, Hopper, Blackwell)


def pick_device(preference: str) -> torch.device:
    """CUDA when present, then Apple MPS, else the CPU; or exactly what KILN_DEVICE names."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelError("KILN_DEVICE=cuda but torch sees no CUDA GPU: install the CUDA build of torch "
                         "(README, 'Real models on a GPU') or use KILN_DEVICE=auto")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise ModelError("KILN_DEVICE=mps but this torch has no Apple MPS support: use KILN_DEVICE=auto")
    return torch.device(preference)


def system_memory_gib() -> float:
    """This machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def _capped(measured: float, vram: float | None, what: str, strict: bool = True) -> float:
    if vram is None:
        return measured
    if vram <= RESERVE_GIB:
        raise ConfigError(f"--vram {vram:g}: must be more than {RESERVE_GIB} GB (the CUDA context alone takes that)")
    if vram > measured + 0.01:
        if strict:
            raise ConfigError(f"--vram {vram:g}: this {what} has only {measured:.1f} GB; give at most that, or "
                              "leave --vram out to use it all")
        # Unified memory can page: a CPU worker standing in for a bigger card (a test fleet) is allowed, and told.
        log.warning("--vram %g is more than this %s's %.1f GB: expect swapping", vram, what, measured)
    return vram


def unified_card(kind: str, vram: float | None, advertise: bool) -> Card:
    """An MPS or CPU card: the share Kiln may use of memory it shares with the system. A CPU worker (advertise)
    claims no memory unless told to; an embedded run on a CPU may use the machine's RAM."""
    ram = system_memory_gib()
    if kind == "mps":
        return Card("mps", _capped(ram * MPS_SHARE, vram, "Mac's GPU share", strict=False))
    if vram is None:
        return Card("cpu", 0.0 if advertise else ram)
    return Card("cpu", _capped(ram, vram, "machine", strict=False))


def nvml_card(preference: str, vram: float | None) -> tuple[str, Card] | None:
    """(name, card) of the first visible NVIDIA GPU, read through NVML (no CUDA initialization), or None."""
    if preference not in ("auto", "cuda"):
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = int((os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0").strip())
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total / GIB
        capability = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
    except Exception as exc:  # no NVIDIA driver, no GPU, no pynvml
        if preference == "cuda":
            raise ConfigError(f"KILN_DEVICE=cuda but NVML sees no GPU ({type(exc).__name__}): install the NVIDIA "
                              "driver, or use KILN_DEVICE=auto") from None
        return None
    name = name if isinstance(name, str) else name.decode()
    card = Card("cuda", _capped(total, vram, name), fp8_math=capability >= FP8_MATH)
    return f"cuda:{name} (cc {capability[0]}.{capability[1]})", card


def advertised_card(preference: str, vram: float | None) -> tuple[str, Card]:
    """What a worker tells the fleet it has, measured without initializing CUDA in this process."""
    found = nvml_card(preference, vram)
    if found:
        return found
    if preference in ("auto", "mps") and sys.platform == "darwin" and torch.backends.mps.is_available():
        return "mps", unified_card("mps", vram, advertise=True)
    return "cpu", unified_card("cpu", vram, advertise=True)


def local_card(device: torch.device, vram: float | None) -> Card:
    """The card `device` is for rendering here, measured through torch (initializes CUDA: call it in the process
    that renders); on a CPU, the machine's memory unless `vram` says otherwise."""
    if device.type != "cuda":
        return unified_card(device.type, vram, advertise=False)
    props = torch.cuda.get_device_properties(device)
    return Card("cuda", _capped(props.total_memory / GIB, vram, props.name),
                fp8_math=(props.major, props.minor) >= FP8_MATH)


def cap_memory(device: torch.device, card: Card) -> None:
    """Keep this process to the card's memory: `--vram N` is a promise to whoever else uses the GPU."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / GIB
        torch.cuda.set_per_process_memory_fraction(min(1.0, card.usable_gib / total), device)
    elif device.type == "mps":
        recommended = torch.mps.recommended_max_memory() / GIB
        torch.mps.set_per_process_memory_fraction(min(2.0, card.gib / recommended))


def free_cached(device: torch.device) -> None:
    """Give the allocator's cached blocks back, so the next load or stage starts from what is really in use."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def device_name(device: torch.device) -> str:
    """What renders, in words: 'cuda:NVIDIA GeForce RTX 4070', 'mps', 'cpu'."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type
