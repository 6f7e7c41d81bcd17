"""Refuse a LoRA layer that computes again inside a backward after the step's noise came off.

Gradient checkpointing runs each checkpointed block's forward again inside ``backward()``. Flat-LoRA keeps its
noise on until every graph it saw built at the noise has had its backward, so those reruns see ``W + e``. Some graphs
it cannot see: under reentrant checkpointing (transformers' default) a checkpointed block builds no graph while it
runs, and when the loop calls a submodule of the model given to ``FlatLoRA`` (or checkpoints around its call) no
output of that model carries the graph either. The noise then comes off at the block's end, and a backward after the
block reruns those layers at the clean weights: the LoRA gradients mix the clean and the noisy weights, silently. A
second backward through a checkpointed graph (``retain_graph=True``) in virtual mode does the same.

:class:`CleanRerunWatch` closes that hole. From the moment the noise comes off until the next draw or ``step()``, a
global forward pre-hook looks for a LoRA layer that computes while the autograd engine runs a node (a rerun inside a
backward) and raises, with what to do, before the layer computes. Outside that window nothing is registered, so
module calls keep torch's hook-free fast path; inside it a training loop runs only its backward and the optimizer
step, where no module is called unless something reruns.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils.hooks import RemovableHandle

__all__ = ["CleanRerunWatch"]

_current_autograd_node = getattr(torch._C, "_current_autograd_node", None)
"""The autograd node the engine is running on this thread (``None`` outside a backward). A torch without it (none
the project supports lacks it) gets no watch."""


def _rerun_refusal(name: str) -> str:
    return (
        f"The LoRA layer {name!r} computed again inside backward() after Flat-LoRA's noise had come off: gradient "
        "checkpointing reran it at the clean weights, so the LoRA gradients would mix clean and noisy weights. This "
        "happens under reentrant checkpointing (use_reentrant=True, transformers' default) when the loop calls a "
        "submodule of the model given to FlatLoRA or checkpoints around the call of that model, and with a second "
        "backward through a checkpointed graph. Run backward() inside the `with opt.perturbed():` block, use "
        "non-reentrant checkpointing (use_reentrant=False), or give FlatLoRA the model the loop calls; run one backward "
        "per forward. The weights are clean; this step's gradients are incomplete (zero them before going on)."
    )


class _RerunCheck:
    """The global forward pre-hook: raises for a watched layer that computes inside a backward."""

    __slots__ = ("names",)

    def __init__(self, names: Dict[int, str]):
        self.names = names

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        name = self.names.get(id(module))
        if name is not None and _current_autograd_node() is not None:
            raise RuntimeError(_rerun_refusal(name))


class CleanRerunWatch:
    """Watches the LoRA layers for a rerun inside a backward while the noise is off (see the module docstring).

    Args:
        owner: the ``FlatLoRA`` wrapper; when it is collected the watch is taken off (held weakly, through
            ``weakref.finalize``).
        layers: ``(name, module)`` of every module that computes with a perturbed weight (LoRA layers and their aliases).
    """

    def __init__(self, owner: object, layers: Iterable[Tuple[str, nn.Module]]):
        self._check = _RerunCheck({id(module): name for name, module in layers})
        self._handle: Optional[RemovableHandle] = None
        weakref.finalize(owner, self.disarm)  # the modules' ids stay meaningful while the wrapper holds the modules

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def arm(self) -> None:
        """The noise came off before the step: from now on a layer rerun inside a backward raises."""
        if self._handle is None and _current_autograd_node is not None:
            self._handle = register_module_forward_pre_hook(self._check)

    def disarm(self) -> None:
        """The next draw or the step came: reruns are the loop's business again."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
