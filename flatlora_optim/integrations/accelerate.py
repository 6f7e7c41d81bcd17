"""Flat-LoRA with Hugging Face accelerate: ``accelerator.prepare(model, FlatLoRA(...))``.

``FlatLoRA`` is a ``torch.optim.Optimizer`` whose ``param_groups``/``state`` are the wrapped
optimizer's, so ``accelerator.prepare`` wraps it in an ``AcceleratedOptimizer`` like any other
optimizer: device placement, ``GradScaler``, ``accelerator.clip_grad_norm_``,
``accelerator.save_state``/``load_state`` (the ``"flatlora"`` entry travels in the optimizer
state) all work unchanged. Inside ``with accelerator.accumulate(model):`` the prepared optimizer
steps only on the synchronising micro-batch; on the others ``opt.step()`` does nothing, the
Flat-LoRA step count does not advance, and ``perturbed()`` reuses the same draw -- exactly one
noise sample per optimizer step::

    flat = FlatLoRA(torch.optim.AdamW(lora_params, lr=2e-4), model, rho=0.05, total_steps=1)
    model, opt, loader = accelerator.prepare(model, flat, loader)
    set_total_steps(opt, count_optimizer_steps(accelerator, loader, epochs))  # the real T
    for x, y in loader:
        with accelerator.accumulate(model):
            with perturbed(opt):                 # or flat.perturbed()
                loss = loss_fn(model(x), y)
            accelerator.backward(loss)           # weights restored at the end of this backward
            opt.step()
            opt.zero_grad()

This module only adds the small helpers used above (it needs no import of accelerate itself).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

from ..optimizer import FlatLoRA
from ._common import find_flatlora, set_total_steps

__all__ = ["unwrap_flatlora", "perturbed", "count_optimizer_steps", "set_total_steps"]


def unwrap_flatlora(optimizer: Any) -> FlatLoRA:
    """The :class:`FlatLoRA` behind an optimizer returned by ``accelerator.prepare`` (or the FlatLoRA itself)."""
    flat = find_flatlora(optimizer)
    if flat is None:
        raise TypeError(f"{type(optimizer).__name__} does not wrap a FlatLoRA: pass FlatLoRA(...) to accelerator.prepare.")
    return flat


@contextlib.contextmanager
def perturbed(optimizer: Any) -> Iterator[FlatLoRA]:
    """``with perturbed(prepared_opt):`` -- ``FlatLoRA.perturbed()`` reached through accelerate's wrapper."""
    with unwrap_flatlora(optimizer).perturbed() as flat:
        yield flat


def count_optimizer_steps(accelerator: Any, dataloader: Any, epochs: int = 1) -> int:
    """Optimizer steps of ``epochs`` passes over a *prepared* ``dataloader`` with ``accelerator``'s accumulation.

    Uses the per-process length of the prepared loader (each process takes the same number of
    optimizer steps; the length of the dataset on one rank before sharding would overcount by
    the world size) and ``accelerator.gradient_accumulation_steps``. accelerate synchronises at
    the end of each pass over the loader (``sync_with_dataloader=True``, its default), so a short
    last window is one more step: ``ceil(len(loader) / accumulation)`` per epoch.
    """
    accumulation = int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1)
    plugin_kwargs = getattr(getattr(accelerator, "gradient_state", None), "plugin_kwargs", None) or {}
    try:
        batches = len(dataloader)
    except TypeError:  # an iterable dataset: no length before the run
        raise TypeError(
            f"count_optimizer_steps needs a dataloader with a length; {type(dataloader).__name__} has none (an iterable "
            "dataset?). Count the run's optimizer steps yourself and pass FlatLoRA(..., total_steps=...) or "
            "set_total_steps(opt, steps)."
        ) from None
    if plugin_kwargs.get("sync_with_dataloader", True):
        steps = math.ceil(batches / accumulation) * int(epochs)
    else:  # the accumulation window runs across epoch boundaries
        steps = batches * int(epochs) // accumulation
    if steps <= 0:
        raise ValueError(f"{batches} batches x {epochs} epochs with accumulation {accumulation} give no optimizer step.")
    return steps
