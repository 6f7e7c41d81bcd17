"""Refuse a LoRA layer that computes again, inside a backward, for a graph built while the noise was in.

Gradient checkpointing runs each checkpointed block's forward again inside ``backward()``. Flat-LoRA keeps its
noise on until every graph it saw built at the noise has had its backward, so those reruns see ``W + e``. Some graphs
it cannot see: under reentrant checkpointing (``use_reentrant=True``, transformers 4's default) a checkpointed
block builds no graph while it runs, and when the loop calls a submodule of the model given to ``FlatLoRA`` (or
checkpoints around its call) no output of that model carries the graph either. The noise then comes off at the
block's end, and a backward after the block reruns those layers at the clean weights: the LoRA gradients mix the
clean and the noisy weights, silently. A second backward through a checkpointed graph (``retain_graph=True``) in
virtual mode does the same.

:class:`CleanRerunWatch` closes that hole. When the noise comes off where such a rerun may follow (at a block's end
or a ``restore()``, and at the end of a backward that kept its graph), a global forward pre-hook goes in until the
next draw or ``step()``. It refuses a LoRA layer that computes while the autograd engine runs a node built while the
noise was in (the node's sequence number lies in the step's window of them), before the layer computes. Graphs
built after the noise came off (a loss at the clean weights before the step) rerun as usual, and in the common loop
(forward in the block, backward after it, no graph kept) the hook never goes in.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils.hooks import RemovableHandle

__all__ = ["CleanRerunWatch"]

_current_autograd_node = getattr(torch._C, "_current_autograd_node", None)
"""The autograd node the engine is running on this thread (``None`` outside a backward)."""
_peek_sequence_nr = getattr(torch._C._autograd, "_get_sequence_nr", None)
"""The sequence number the next autograd node this thread creates will get (thread-local, increasing)."""
_keeps_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
_WATCHABLE = _current_autograd_node is not None and _peek_sequence_nr is not None
"""A torch without these (none the project supports lacks them) gets no watch."""


def _rerun_refusal(name: str) -> str:
    return (
        f"The LoRA layer {name!r} computed again inside backward(), for a graph built at Flat-LoRA's noisy weights, after "
        "the noise had come off: gradient checkpointing reran it at the clean weights, so the LoRA gradients would mix "
        "clean and noisy weights. Flat-LoRA cannot see such a graph under reentrant checkpointing (use_reentrant=True) "
        "when the loop calls a submodule of the model given to FlatLoRA or checkpoints around the call of that model, "
        "nor a second backward through a checkpointed graph. Run backward() inside the `with opt.perturbed():` block, "
        "use non-reentrant checkpointing (use_reentrant=False), or give FlatLoRA the model the loop calls; run one "
        "backward per forward. The weights are clean; this backward's gradients are incomplete (zero them before going on)."
    )


class _RerunCheck:
    """The global forward pre-hook: raises for a watched layer that computes inside a backward, for a node built
    in ``[first, end)`` (sequence numbers)."""

    __slots__ = ("names", "compiled", "first", "end")

    def __init__(self, names: Dict[int, str]):
        self.names = names
        self.compiled: Dict[int, Optional[str]] = {}  # id of a torch.compile wrapper -> a watched layer inside it, if any
        self.first = 0
        self.end = 0

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        name = self.names.get(id(module))
        if name is None and type(module).__name__ == "OptimizedModule":  # torch.compile(submodule): its layers get no call
            name = self._inside_compiled(module)
        if name is None:
            return
        node = _current_autograd_node()
        if node is not None and self.first <= node._sequence_nr() < self.end:
            raise RuntimeError(_rerun_refusal(name))

    def _inside_compiled(self, module: nn.Module) -> Optional[str]:
        key = id(module)
        if key not in self.compiled:
            inner = getattr(module, "_orig_mod", None)
            found = [self.names[id(m)] for m in inner.modules() if id(m) in self.names] if isinstance(inner, nn.Module) else []
            self.compiled[key] = found[0] if found else None
        return self.compiled[key]


class CleanRerunWatch:
    """Watches the LoRA layers for a rerun inside a backward of a graph built at the noise (see the module docstring).

    The window of sequence numbers is taken on the thread that put the noise in: :meth:`noise_in` when the noise goes
    in, :meth:`noise_out_here` where the caller lets it go (a block's end, ``restore()``). Graphs built on other
    threads are not told apart (their numbers are another thread's).

    Args:
        owner: the ``FlatLoRA`` wrapper; when it is collected the watch is taken off (held weakly, through
            ``weakref.finalize``).
        layers: ``(name, module)`` of every module that computes with a perturbed weight (LoRA layers and their aliases).
    """

    def __init__(self, owner: object, layers: Iterable[Tuple[str, nn.Module]]):
        self._check = _RerunCheck({id(module): name for name, module in layers})
        self._handle: Optional[RemovableHandle] = None
        self._thread: Optional[int] = None
        self._first = 0
        self._end: Optional[int] = None
        weakref.finalize(owner, self.disarm)  # the modules' ids stay meaningful while the wrapper holds the modules

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def noise_in(self) -> None:
        """A draw went in: the graphs built from now on, until :meth:`noise_out_here`, are built at the noise."""
        self.disarm()
        if _WATCHABLE:
            self._thread = threading.get_ident()
            self._first = _peek_sequence_nr()
            self._end = None

    def noise_out_here(self) -> None:
        """The caller lets the noise go (it may stay until a pending backward ends): the window closes here, if this is
        the thread that put it in and it is not closed yet."""
        if self._end is None and self._thread == threading.get_ident():
            self._end = self._check.end = _peek_sequence_nr()

    def arm(self) -> None:
        """The noise came off before the step, where a rerun of a graph built at it may follow: from now on, until
        :meth:`disarm`, such a rerun raises. Not at the end of a backward that freed its graph (nothing can rerun)."""
        if not _WATCHABLE or self._thread is None or self._handle is not None:
            return
        if torch._C._current_graph_task_id() != -1 and _keeps_graph is not None and not _keeps_graph():
            return  # the end of a backward (retain_graph=False): its graph is gone, and the others were seen
        self.noise_out_here()
        self._check.first = self._first
        self._check.end = self._end if self._end is not None else 1 << 64  # (closed on another thread: every later node)
        self._handle = register_module_forward_pre_hook(self._check)

    def disarm(self) -> None:
        """The next draw or the step came: reruns are the loop's business again."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
