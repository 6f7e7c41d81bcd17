"""sigma_t schedules and their argument checks."""

from __future__ import annotations

import math

import pytest

from flatlora_optim import NoiseSchedule


def test_cosine_is_the_papers_ramp():
    s = NoiseSchedule(0.05, "cosine", total_steps=100)
    for t in [0, 1, 25, 50, 99, 100, 150]:
        expected = 0.05 * 0.5 * (1 - math.cos(math.pi * min(t, 100) / 100))
        assert s.sigma(t) == pytest.approx(expected, abs=1e-15)
    assert s.sigma(0) == 0.0 and s.sigma(50) == pytest.approx(0.025) and s.sigma(100) == pytest.approx(0.05)


def test_linear_constant_and_callable():
    assert NoiseSchedule(0.1, "linear", 10).sigma(5) == pytest.approx(0.05)
    assert NoiseSchedule(0.1, "linear", 10).sigma(20) == pytest.approx(0.1)
    assert NoiseSchedule(0.1, "constant").sigma(12345) == 0.1
    assert NoiseSchedule(0.2, lambda t: 0.5 if t < 3 else 1.0).sigma(1) == pytest.approx(0.1)
    assert NoiseSchedule(0.2, lambda t: 1.0).name == "callable"


@pytest.mark.parametrize("rho", [-0.01, float("nan"), float("inf"), "0.1", True])
def test_bad_rho(rho):
    with pytest.raises(ValueError, match="rho"):
        NoiseSchedule(rho, "constant")


def test_cosine_needs_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        NoiseSchedule(0.05, "cosine")
    with pytest.raises(ValueError, match="total_steps"):
        NoiseSchedule(0.05, "linear")


@pytest.mark.parametrize("total", [0, -5, 2.5, True])
def test_bad_total_steps(total):
    with pytest.raises(ValueError, match="total_steps"):
        NoiseSchedule(0.05, "cosine", total)


def test_bad_schedule_and_bad_callable_value():
    with pytest.raises(ValueError, match="schedule"):
        NoiseSchedule(0.05, "exponential", 10)
    with pytest.raises(ValueError, match="schedule"):
        NoiseSchedule(0.05, 3, 10)
    with pytest.raises(ValueError, match="callable returned"):
        NoiseSchedule(0.05, lambda t: -1.0).sigma(0)


def test_numbers_of_numpy_and_one_element_tensors_are_taken_as_torch_takes_them():
    """``np.float32`` rho, ``np.int64`` total_steps and a schedule that returns a numpy or tensor scalar work (torch's
    optimizers and schedulers take them); the schedule keeps plain Python numbers (checkpoints load with weights_only)."""
    import numpy as np
    import torch

    schedule = NoiseSchedule(np.float32(0.1), "linear", np.int64(10))
    assert type(schedule.rho) is float and type(schedule.total_steps) is int
    assert schedule.sigma(5) == pytest.approx(NoiseSchedule(0.1, "linear", 10).sigma(5))
    assert NoiseSchedule(0.1, "linear", torch.tensor(10)).total_steps == 10
    assert NoiseSchedule(0.2, lambda t: np.float32(0.5)).sigma(0) == pytest.approx(0.1)
    assert NoiseSchedule(0.2, lambda t: torch.tensor(0.5)).sigma(0) == pytest.approx(0.1)
    for bad in (np.bool_(True), torch.tensor([0.1, 0.2]), torch.tensor(True), 10**400):
        with pytest.raises(ValueError, match="rho"):
            NoiseSchedule(bad, "constant")
    for bad in (np.float64(10.0), np.bool_(True), torch.tensor(10.0)):
        with pytest.raises(ValueError, match="total_steps"):
            NoiseSchedule(0.1, "linear", bad)
    with pytest.raises(ValueError, match="callable returned"):
        NoiseSchedule(0.2, lambda t: torch.tensor([0.5, 0.5])).sigma(0)
