"""Refuse a LoRA layer that computes again, inside a backward, for a graph built while the noise was in.

Gradient checkpointing runs each checkpointed block's forward again inside ``backward()``. Flat-LoRA keeps its
noise on until every graph it saw built at the noise has had its backward, so those reruns see ``W + e``. Some graphs
it cannot see: under reentrant checkpointing (``use_reentrant=True``, transformers 4's default) a checkpointed
block builds no graph while it runs, and when the loop calls a submodule of the model given to ``FlatLoRA`` (or
checkpoints around its call) no output of that model carries the graph either. The noise then comes off at the
block's end, and a backward after the block reruns those layers at the clean weights: the LoRA gradients mix the
clean and the noisy weights, silently. A second backward through a checkpointed graph (``retain_graph=True``) in
virtual mode does the same.

:class:`CleanRerunWatch` closes that hole. Each draw of a step opens a window of autograd sequence numbers (the
nodes the thread that put the noise in creates while the noise is in, up to where the caller last let it go). When
the noise comes off where a rerun of such a graph may follow -- a layer computed without grad at the noise (a
checkpoint the guards could not track), the layer whose output is tracked computed again outside a call of the model
and outside a backward (a second forward of a submodule, untracked), no layer's hook ran at all where torch.compile
built code (which may run the layers without their hooks), or a backward through a tracked graph kept it
(``retain_graph=True``) -- a global forward pre-hook goes in until the next draw or the step. It refuses a LoRA
layer, or a ``torch.compile`` wrapper of a module holding one, that computes while the autograd engine runs a node of
one of the step's windows, before the layer computes. Graphs built after the noise came off (a loss at the clean
weights before the step) rerun as usual, reruns while the noise is in again (a second block of the step: the same
draw) are not watched, and in the common loops (forward in the block, backward after it, one forward per block, no
reentrant checkpointing) the hook never goes in.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, Iterable, List, Optional, Tuple

from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils.hooks import RemovableHandle

from .torch_internals import can_see_autograd_nodes, current_autograd_node, is_compiling, peek_sequence_nr

__all__ = ["CleanRerunWatch"]

_MAX_WINDOWS = 4096
"""Windows kept between two steps (a draw each, after the noise came off where a rerun may follow): beyond, the oldest
go, so that a loop that never steps (perturb/restore alone) does not pile them up. A step of more draws that keeps the
first one's graph for a backward after the last is not watched for that graph."""
_WATCHABLE = can_see_autograd_nodes() and peek_sequence_nr is not None
"""A torch without these gets no watch."""


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
    """The global forward pre-hook: raises for a watched layer that computes inside a backward, for a node whose sequence
    number lies in one of ``windows`` (``[first, end)`` pairs: the step's graphs built at the noise)."""

    __slots__ = ("names", "compiled", "windows")

    def __init__(self, names: Dict[int, str]):
        self.names = names
        self.compiled: Dict[int, Optional[str]] = {}  # id of a torch.compile wrapper -> a watched layer inside it, if any
        self.windows: List[Tuple[int, int]] = []

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        if is_compiling():  # traced while armed (an evaluation compiled before the step): not part of the graph
            return
        name = self.names.get(id(module))
        # torch.compile(submodule): the compiled code calls its layers without hooks (by class name: no torch._dynamo import)
        if name is None and type(module).__name__ == "OptimizedModule":
            name = self._inside_compiled(module)
        if name is None:
            return
        node = current_autograd_node()
        if node is not None:
            number = node._sequence_nr()
            if any(first <= number < end for first, end in self.windows):
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

    Sequence numbers are per thread: the windows are the numbers of the thread that put the noise in, so a graph
    built on another thread is not watched (and a node another thread numbered, a rerun's own nested checkpoint on
    CUDA's backward thread, could fall in a window by chance).

    Args:
        owner: the ``FlatLoRA`` wrapper; when it is collected the watch is taken off (held weakly, through
            ``weakref.finalize``).
        layers: ``(name, module)`` of every module that computes with a perturbed weight (LoRA layers and their aliases).
    """

    def __init__(self, owner: object, layers: Iterable[Tuple[str, nn.Module]]):
        self._check = _RerunCheck({id(module): name for name, module in layers})
        self._handle: Optional[RemovableHandle] = None
        self._thread: Optional[int] = None
        self._open: Optional[Tuple[int, Optional[int]]] = None  # the window of the draw in place: (first, last let-go)
        weakref.finalize(owner, self.disarm)  # the modules' ids stay meaningful while the wrapper holds the modules

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def noise_in(self) -> None:
        """A draw went in: graphs built from now on are built at the noise (a rerun meanwhile sees it: no watch)."""
        self.disarm()
        if _WATCHABLE:
            self._thread = threading.get_ident()
            self._open = (peek_sequence_nr(), None)

    def let_go_here(self) -> None:
        """The caller lets the noise go (a block's end, ``restore()``; it may stay for a pending backward, and a later
        block of the step may take it again): the window reaches this far, if this is the thread that put it in."""
        if self._open is not None and self._thread == threading.get_ident():
            self._open = (self._open[0], peek_sequence_nr())

    def arm(self) -> None:
        """The noise came off where a rerun of a graph built at it may follow: until the next draw or the step, such a
        rerun raises. The draw's window closes here (where it was last let go, or, let go on no thread that can tell,
        at every later number)."""
        if self._open is None:
            return
        first, end = self._open
        self._open = None
        windows = self._check.windows
        windows.append((first, end if end is not None else 1 << 64))
        if len(windows) > _MAX_WINDOWS:  # a loop that never steps (perturb/restore alone): keep the latest draws'
            del windows[0]
        if self._handle is None:
            self._handle = register_module_forward_pre_hook(self._check)

    def disarm(self) -> None:
        """Take the hook out (the noise is in again, or the wrapper was collected); the step's windows stay."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def step_ended(self) -> None:
        """The step came: no graph of it may be rerun for this wrapper's sake any more."""
        self.disarm()
        self._open = None
        self._check.windows.clear()
