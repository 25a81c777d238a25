"""Where a component's weights are, stage by stage, as the plan says; and fp8 transformer weights.

A resident component is on the device from load to unload. A staged one is on the device only for its stage:
on a discrete GPU it waits in (pinned) host memory and its weights are copied up for the stage and simply dropped
after it (the host copy never changed, so nothing is copied back); on unified memory it is released and loaded
again from disk, since moving it would free nothing.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from schemas.plan import Fp8Method
from worker.device import free_cached

Load = Callable[[], Any]  # builds the component on the CPU, in its planned storage dtype


class Resident:
    """A component that stays on the device."""

    def __init__(self, load: Load, device: torch.device) -> None:
        self.module = load().to(device)

    def acquire(self) -> Any:
        """The component, on the device."""
        return self.module

    def park(self) -> None:
        """Nothing to do: a resident component stays."""

    @property
    def on_device(self) -> bool:
        """Always."""
        return True


class Parked:
    """A staged component on a discrete GPU: pinned host copies, on the device only between acquire and park."""

    def __init__(self, load: Load, device: torch.device) -> None:
        self.module = load()
        self.device = device
        self._host = {name: _pin(t) for name, t in _tensors(self.module)}
        self.on_device = True  # until parked just below
        self.park()

    def acquire(self) -> Any:
        """Copy the weights up (asynchronously from pinned memory; the stream orders the compute after them)."""
        if not self.on_device:
            for name, tensor in _tensors(self.module):
                tensor.data = self._host[name].to(self.device, non_blocking=True)
            self.on_device = True
        return self.module

    def park(self) -> None:
        """Point the weights back at the host copies; the device copies are freed with their last reference.
        Tensors that came while it was on the device (a LoRA's) get host copies now; those of modules gone since
        (an unloaded LoRA's) are dropped."""
        tensors = dict(_tensors(self.module))
        self._host = {name: self._host[name] if name in self._host else _pin(tensor.detach().to("cpu"))
                      for name, tensor in tensors.items()}
        for name, tensor in tensors.items():
            tensor.data = self._host[name]
        self.on_device = False


class Released:
    """A staged component on unified memory: loaded for its stage, released after it."""

    def __init__(self, load: Load, device: torch.device) -> None:
        self._load = load
        self.device = device
        self.module: Any = None

    def acquire(self) -> Any:
        """Load the component from disk onto the device."""
        if self.module is None:
            self.module = self._load().to(self.device)
        return self.module

    def park(self) -> None:
        """Release it: its memory goes back to the system."""
        if self.module is not None:
            self.module = None
            gc.collect()
            free_cached(self.device)

    @property
    def on_device(self) -> bool:
        """Whether it is loaded now."""
        return self.module is not None


Slot = Resident | Parked | Released


def slot(load: Load, device: torch.device, staged: bool, release: bool) -> Slot:
    """Hold a component as the plan says."""
    if not staged:
        return Resident(load, device)
    return Released(load, device) if release else Parked(load, device)


def _tensors(module: Any) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _pin(tensor: torch.Tensor) -> torch.Tensor:
    data = tensor.data.to("cpu")
    if not torch.cuda.is_available():
        return data
    try:
        return data.pin_memory()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without pinning, or no pinnable memory left:
        return data  # pageable memory works too, a little slower


def to_fp8(transformer: Any, method: Fp8Method, compute_dtype: torch.dtype, device: torch.device) -> Any:
    """Store the transformer's weights as float8: torchao fp8 matmuls on cards with fp8 math, else fp8 storage
    upcast to `compute_dtype` one layer at a time (diffusers' layerwise casting). Quantizes module by module on
    the device, so the bf16 transformer never has to fit on the card whole."""
    if method == "layerwise":
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
        return transformer
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    # Dynamic activation quantization is what uses the fp8 tensor cores; it exists only on CUDA. Elsewhere (a
    # test on a CPU) the weights are still torchao float8 tensors, dequantized for each matmul.
    config = (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if device.type == "cuda"
              else Float8WeightOnlyConfig())
    quantize_(transformer, config, device=device if device.type == "cuda" else None)
    return transformer


def fp8_weights(module: Any) -> int:
    """How many of a module's weight tensors are stored in float8 (plain or torchao)."""
    count = 0
    for _, tensor in module.named_parameters():
        inner = getattr(tensor, "qdata", tensor)
        count += inner.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    return count
