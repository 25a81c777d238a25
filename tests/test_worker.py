"""What a worker says it has: measured without touching CUDA, a CPU claiming nothing unless told, and --vram
checked against the machine."""

from __future__ import annotations

import sys

import pytest
import torch

from schemas.errors import ConfigError
from schemas.plan import Card
from worker.device import advertised_card, local_card, system_memory_gib


def test_the_worker_measures_its_device_without_touching_cuda() -> None:
    device, card = advertised_card("auto", None)  # NVML where there is an NVIDIA driver, else this machine
    assert device == "cpu" or device.startswith(("cuda:", "mps"))
    if device == "cpu":
        assert card == Card("cpu", 0.0)  # a CPU worker claims no memory unless --vram says so
    assert "torch" not in sys.modules or not torch.cuda.is_initialized()


def test_a_cpu_worker_told_its_memory_claims_exactly_that() -> None:
    assert advertised_card("cpu", 8.0) == ("cpu", Card("cpu", 8.0))


def test_an_embedded_run_on_a_cpu_may_use_the_machines_memory() -> None:
    card = local_card(torch.device("cpu"), None)
    assert card.kind == "cpu" and card.gib == pytest.approx(system_memory_gib())


def test_an_impossible_vram_is_refused_with_what_to_give() -> None:
    with pytest.raises(ConfigError, match="must be more than 0.5 GB"):
        advertised_card("cpu", 0.3)


def test_a_cpu_may_stand_in_for_a_bigger_card_than_its_memory_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    assert advertised_card("cpu", 1e4)[1] == Card("cpu", 1e4)  # a simulated fleet on one small machine
    assert "expect swapping" in caplog.text
