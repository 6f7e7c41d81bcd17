"""Which :class:`~flatlora_optim.FlatLoRA` wrapper has its noise in a weight right now.

Two in-place wrappers on one model would each restore against what they wrote: ``a.perturb(); b.perturb();
a.restore()`` leaves ``b``'s noise and part of ``a``'s in the weights (silently with backup restore). A wrapper
claims its targets' weights for as long as its noise is in them, and a second one is refused before it writes.
Entries hold weak references only, so a dropped wrapper or model frees its claims.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Tuple

from .targets import LoRATarget

__all__ = ["claim", "release"]

_HOLDERS: Dict[int, Tuple[weakref.ref, weakref.ref]] = {}  # id(weight) -> (weight, the wrapper whose noise is in it)


def claim(holder: Any, targets: List[LoRATarget]) -> None:
    """Record ``holder`` as the wrapper whose noise goes into ``targets``' weights, or raise ``RuntimeError`` (nothing
    recorded) when another live wrapper's noise is in one of them."""
    for target in targets:
        entry = _HOLDERS.get(id(target.weight))
        if entry is None:
            continue
        weight, other = entry[0](), entry[1]()
        if weight is None or other is None:
            del _HOLDERS[id(target.weight)]  # a dropped weight (its id reused) or wrapper
        elif weight is target.weight and other is not holder:
            raise RuntimeError(
                f"The weight of {target.name} holds the noise of another FlatLoRA wrapper ({other!r}). Two wrappers on one "
                "model must not perturb at the same time: each restores against what it wrote. Use one wrapper, or let the "
                "other restore (its block ends, its backward runs or its step() is called) first."
            )
    for target in targets:
        _HOLDERS[id(target.weight)] = (weakref.ref(target.weight), weakref.ref(holder))


def release(holder: Any, targets: List[LoRATarget]) -> None:
    """``holder``'s noise is out of ``targets``' weights."""
    for target in targets:
        entry = _HOLDERS.get(id(target.weight))
        if entry is not None and entry[1]() in (holder, None):
            del _HOLDERS[id(target.weight)]
