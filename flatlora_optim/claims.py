"""Which :class:`~flatlora_optim.FlatLoRA` wrapper has its noise in a weight right now.

Two in-place wrappers on one model would each restore against what they wrote: ``a.perturb(); b.perturb();
a.restore()`` leaves ``b``'s noise and part of ``a``'s in the weights (silently with backup restore). A wrapper
claims its targets' weights for as long as its noise is in them, and a second one is refused before it writes.
Entries hold weak references only, so a freed wrapper or model frees its claims. A wrapper whose noise is in is not
freed when the user drops it (the hooks on the model that restore it keep it alive): :func:`restore_weights` takes its
noise out without it.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List

from torch import nn

from .targets import LoRATarget

__all__ = ["claim", "release", "restore_weights"]

_HOLDERS: Dict[int, List[Any]] = {}
"""``id(weight) -> [weight, wrapper, holding]`` (weak references, and whether the wrapper's noise is in the weight now).
An entry stays after its release, so that the next step's claim by the same wrapper only sets the flag again instead of
making two weak references per layer and step."""


def _entry(weight: Any) -> Any:
    """The live entry of ``weight``, or None (an entry whose weight or wrapper was dropped is removed: its id may be reused)."""
    entry = _HOLDERS.get(id(weight))
    if entry is None:
        return None
    if entry[0]() is not weight or entry[1]() is None:
        del _HOLDERS[id(weight)]
        return None
    return entry


def claim(holder: Any, targets: List[LoRATarget]) -> None:
    """Record ``holder`` as the wrapper whose noise goes into ``targets``' weights, or raise ``RuntimeError`` (nothing
    recorded) when another live wrapper's noise is in one of them."""
    weights = [target.weight for target in targets]
    entries = [_entry(weight) for weight in weights]
    for target, entry in zip(targets, entries):
        if entry is not None and entry[2] and entry[1]() is not holder:
            raise RuntimeError(
                f"The weight of {target.name} holds the noise of another FlatLoRA wrapper ({entry[1]()!r}). Two wrappers on one "
                "model must not perturb at the same time: each restores against what it wrote. Use one wrapper, or let the "
                "other restore (its block ends, its backward runs or its step() is called) first. If you no longer hold it (an "
                "error between perturb() and restore(), a notebook cell run again), flatlora_optim.restore_weights(model) takes "
                "its noise out."
            )
    for weight, entry in zip(weights, entries):
        if entry is not None and entry[1]() is holder:
            entry[2] = True
        else:
            _HOLDERS[id(weight)] = [weakref.ref(weight, _forget(id(weight))), weakref.ref(holder), True]


def _forget(key: int) -> Any:
    """The callback that drops a weight's entry once the weight is freed (before its id can be reused)."""
    return lambda _: _HOLDERS.pop(key, None)


def release(holder: Any, targets: List[LoRATarget]) -> None:
    """``holder``'s noise is out of ``targets``' weights."""
    for target in targets:
        entry = _HOLDERS.get(id(target.weight))
        if entry is not None and entry[1]() in (holder, None):
            entry[2] = False


def restore_weights(model: nn.Module) -> List[Any]:
    """Take out the noise any :class:`~flatlora_optim.FlatLoRA` wrapper has in ``model``'s weights now, bitwise exactly
    (each holder's ``restore(force=True)``), and return those wrappers (none: an empty list, nothing done).

    For noise whose wrapper you no longer hold: an error between ``perturb()`` and ``restore()``, or a notebook cell
    that raised inside ``perturbed()`` and was run again. Such a wrapper is not freed (the hooks on the model that
    restore it at the end of the pending backward keep it alive), its noise stays in the weights (in virtual mode, in
    every forward), and a new wrapper on the model is refused until it comes out. A backward through a graph built at
    that noise raises afterwards, as after any ``restore(force=True)``.
    """
    holding: List[Any] = []  # every wrapper whose noise is in some weight now, once
    for weight, wrapper, held in list(_HOLDERS.values()):
        holder = wrapper() if held and weight() is not None else None
        if holder is not None and all(holder is not known for known in holding):
            holding.append(holder)
    # those whose LoRA layers are in the model: their claims need not be the model's registered parameters (a weight
    # that is a plain attribute, an FSDP2 shard while the model holds the unsharded copies)
    modules = {id(module) for module in model.modules()}
    holders = [h for h in holding if any(id(layer.module) in modules for t in h.targets for layer in t.layers())]
    for holder in holders:
        holder.restore(force=True)
    return holders
