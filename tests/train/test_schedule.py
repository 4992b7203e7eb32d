"""The learning-rate schedule: linear warm-up, then constant or cosine to 0 at the last epoch."""

from __future__ import annotations

import math

import pytest

from bpfm.training.config import TrainConfig
from bpfm.training.loop import lr_factor


def _factors(steps_per_epoch: int, **overrides) -> list[float]:
    config = TrainConfig(out="-", data="-", epochs=4, **overrides)
    return [lr_factor(s, steps_per_epoch, config) for s in range(4 * steps_per_epoch)]


def test_warm_up_rises_linearly_to_the_base_lr_then_stays():
    factors = _factors(10, warmup_epochs=1.0)
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10:] == [1.0] * 30


def test_a_fractional_warm_up_counts_in_fractional_steps():
    factors = _factors(5, warmup_epochs=0.5)  # 2.5 steps
    assert factors[:4] == pytest.approx([0.4, 0.8, 1.0, 1.0])


def test_cosine_decays_from_the_end_of_warm_up_to_zero_at_the_last_epoch():
    factors = _factors(10, warmup_epochs=1.0, schedule="cosine")
    assert factors[9] == factors[10] == 1.0
    assert factors[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert all(a > b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 29 / 30)))
