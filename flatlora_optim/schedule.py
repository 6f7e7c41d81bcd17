"""The noise-radius schedule sigma_t of Flat-LoRA.

The paper ramps the relative noise level up over training with a cosine curve:

.. math::
    \\sigma_t = \\rho \\cdot \\tfrac{1}{2}\\left(1 - \\cos\\left(\\pi \\, \\min(t, T) / T\\right)\\right)

where ``t`` counts optimizer steps already taken and ``T`` is the total number of optimizer
steps. Small noise early lets the adapter find a good basin before it is pushed towards a flat
one. ``"linear"`` (``rho * t / T``), ``"constant"`` (``rho``) and any callable ``factor(t)``
(multiplied by ``rho``, as ``torch.optim.lr_scheduler.LambdaLR`` multiplies the base LR) are
offered too.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

__all__ = ["NoiseSchedule", "ScheduleLike", "SCHEDULE_NAMES", "as_real", "as_int"]

ScheduleLike = Union[str, Callable[[int], float]]
SCHEDULE_NAMES = ("cosine", "linear", "constant")


def as_real(value: Any) -> Optional[float]:
    """``value`` as a Python float when it is a real number -- an int or float, a numpy scalar, a one-element tensor --
    as torch's optimizers and schedulers take them; None for anything else, booleans included."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # (numpy's bool is no numbers.Real)
        try:
            return float(value)
        except OverflowError:  # an int too large for a float
            return math.inf
    return None


def as_int(value: Any) -> Optional[int]:
    """``value`` as a Python int when it is an integer -- an int, a numpy integer, a one-element integer tensor --; None
    for anything else, booleans and floats included (``operator.index``'s rule)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None  # (numpy 1.x's bool has __index__; numpy 2's has not)
    try:
        return operator.index(value)
    except TypeError:
        return None


class NoiseSchedule:
    """Maps an optimizer step count ``t`` to the noise level ``sigma_t``.

    Args:
        rho: the largest relative noise level (the paper uses 0.05 to 0.15). Must be >= 0.
        schedule: ``"cosine"`` (default, the paper's), ``"linear"``, ``"constant"`` or a
            callable ``factor(t) -> float`` whose value is multiplied by ``rho``.
        total_steps: ``T``, the number of optimizer steps of the whole run. Required by
            ``"cosine"`` and ``"linear"``; after ``T`` steps they stay at ``rho``.
    """

    def __init__(self, rho: float, schedule: ScheduleLike = "cosine", total_steps: Optional[int] = None):
        value = as_real(rho)
        if value is None or not math.isfinite(value) or value < 0:
            raise ValueError(f"Invalid rho {rho!r}: rho is the relative noise radius and must be a finite number >= 0 (the paper uses 0.05-0.15).")
        if isinstance(schedule, str):
            if schedule not in SCHEDULE_NAMES:
                raise ValueError(f"Invalid schedule {schedule!r}: choose one of {SCHEDULE_NAMES} or pass a callable factor(step) -> float.")
            if schedule != "constant":
                if total_steps is None:
                    raise ValueError(
                        f"schedule={schedule!r} needs total_steps (the number of optimizer steps of the whole run, "
                        "e.g. len(loader) * epochs // grad_accum); pass total_steps=... or use schedule='constant'."
                    )
        elif not callable(schedule):
            raise ValueError(f"Invalid schedule {schedule!r}: expected a name in {SCHEDULE_NAMES} or a callable factor(step) -> float.")
        steps = as_int(total_steps)  # (None for None)
        if total_steps is not None and (steps is None or steps <= 0):
            raise ValueError(f"Invalid total_steps {total_steps!r}: expected a positive int (optimizer steps).")
        self.rho = value
        self.schedule = schedule
        self.total_steps = steps

    @property
    def name(self) -> str:
        """The schedule's name, or ``"callable"`` for a user function (which cannot be saved)."""
        return self.schedule if isinstance(self.schedule, str) else "callable"

    def factor(self, step: int) -> float:
        """The fraction of ``rho`` used at optimizer step ``step``."""
        if isinstance(self.schedule, str):
            if self.schedule == "constant":
                return 1.0
            progress = min(step, self.total_steps) / self.total_steps  # type: ignore[operator]
            if self.schedule == "linear":
                return progress
            return 0.5 * (1.0 - math.cos(math.pi * progress))
        returned = self.schedule(step)
        value = as_real(returned)
        if value is None or not math.isfinite(value) or value < 0:
            raise ValueError(f"The schedule callable returned {returned!r} at step {step}; it must return a finite float >= 0 (a factor of rho).")
        return value

    def sigma(self, step: int) -> float:
        """``sigma_t`` for optimizer step ``step``: ``rho * factor(step)``."""
        return self.rho * self.factor(step)

    def __repr__(self) -> str:
        return f"NoiseSchedule(rho={self.rho}, schedule={self.name!r}, total_steps={self.total_steps})"
