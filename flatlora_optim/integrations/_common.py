"""Framework-free helpers shared by the integrations (no framework is imported here)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from ..optimizer import FlatLoRA, check_settings
from ..schedule import ScheduleLike

__all__ = ["find_flatlora", "set_total_steps", "restart_schedule", "check_integration_settings"]

# Attributes under which framework wrappers keep the optimizer they wrap:
# accelerate's AcceleratedOptimizer (and so the HF Trainer's) ``.optimizer``,
# Lightning's LightningOptimizer ``._optimizer``.
_WRAPPED_ATTRS = ("optimizer", "_optimizer")


def find_flatlora(optimizer: Any) -> Optional[FlatLoRA]:
    """Return the :class:`FlatLoRA` inside ``optimizer`` (itself, or wrapped by a framework), else None.

    Frameworks wrap the optimizer they are given (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``); the perturbation controls live on the ``FlatLoRA``
    underneath, so callbacks and user code look it up through the wrappers.
    """
    seen = set()
    current = optimizer
    while current is not None and id(current) not in seen:
        if isinstance(current, FlatLoRA):
            return current
        seen.add(id(current))
        current = next((getattr(current, a) for a in _WRAPPED_ATTRS if getattr(current, a, None) is not None), None)
    return None


def set_total_steps(optimizer: Any, total_steps: int) -> FlatLoRA:
    """Set the schedule length ``T`` of the FlatLoRA in ``optimizer`` to ``total_steps`` optimizer steps.

    Frameworks know the real number of optimizer steps (after gradient accumulation, sharding
    over ranks, ``max_steps`` and epochs) only once training is set up, after the optimizer was
    built. This replaces ``opt.schedule`` by a :class:`NoiseSchedule` with the same ``rho`` and
    shape and the new length; the step count and the noise stream are untouched. Returns the FlatLoRA.
    """
    flat = find_flatlora(optimizer)
    if flat is None:
        raise TypeError(f"No FlatLoRA found in {type(optimizer).__name__}: wrap the optimizer with FlatLoRA(...) first.")
    if flat.schedule.total_steps != total_steps:
        flat.set_total_steps(total_steps)  # NoiseSchedule validates the value
    return flat


def restart_schedule(flat: FlatLoRA) -> None:
    """Set ``flat``'s step count back to 0 (a framework that starts a new run with the same optimizer: the noise
    schedule starts over with the framework's step count and LR schedule). Refused while its noise is in."""
    if flat.is_perturbed:
        raise RuntimeError("restart_schedule() while Flat-LoRA's noise is in the weights: call it between steps.")
    flat._step_index = 0


_FURTHER_KWARGS = ("mode", "rank_noise")  # FlatLoRA's keyword arguments that the integrations take as **flatlora_kwargs


def check_integration_settings(who: str, rho: float, schedule: ScheduleLike, total_steps: Optional[int], seed: int, restore: str,
                               flatlora_kwargs: Dict[str, Any]) -> None:
    """Refuse, where the user passes them to an integration, the settings :class:`FlatLoRA` would refuse only when
    training starts (a misspelt keyword, ``restore="bogus"``, ``rho < 0``). ``total_steps`` None: set later by the
    framework (a placeholder length is checked)."""
    unknown = sorted(set(flatlora_kwargs) - set(_FURTHER_KWARGS))
    if unknown:
        raise TypeError(f"{who} got unexpected keyword arguments {unknown}; besides its own it takes FlatLoRA's {list(_FURTHER_KWARGS)}.")
    check_settings(rho, schedule, 1 if total_steps is None else total_steps, seed=seed, restore=restore, **flatlora_kwargs)
