"""``restore="host"``: put the weights back from a copy in host memory, layer by layer during the backward.

The frozen weights do not change from one step to the next, so one copy of them, taken once in host
memory (pinned, on CUDA), restores every perturbed weight bitwise by a plain copy: nothing is held on
the device, and no record is computed. On CUDA the copy back is a DMA transfer over PCIe (a copy engine,
no SM time), queued on a stream of its own; :class:`EarlyRestore` queues each layer's as soon as the
backward pass is done with that layer's weight, so that the transfers run while the backward computes
the layers before it. Measured on an H200 (1 B Llama, ``benchmarks/step_time.py``): see docs/benchmarks.md.

When the copy is taken again: :class:`HostCopies` remembers each weight's version counter after the
restore; a weight written since (``load_state_dict``, an in-place op on the parameter, a new tensor) is
copied anew before its noise goes in. A write through ``weight.data`` does not move the parameter's
version counter and is not seen, nor is a ``torch.distributed`` collective into the weights (peft's
``merge_adapter``/``unmerge_adapter`` write through ``.data``): after one, call :meth:`FlatLoRA.refresh_host_copies`.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .torch_internals import backward_keeps_graph, current_autograd_node, graph_task_id, is_compiling
from .uncopyable import Uncopyable

__all__ = ["HostCopies", "EarlyRestore", "copy_stream"]


def _host_like(rows: torch.Tensor) -> torch.Tensor:
    """An empty host tensor with ``rows``' shape and strides (pinned when ``rows`` is on CUDA): a copy between the two
    is then one DMA transfer, without a staging buffer or a copy kernel."""
    return torch.empty_like(rows, device="cpu", pin_memory=rows.is_cuda)  # keeps dense strides, else contiguous


_COPY_STREAMS: Dict[torch.device, Any] = {}


def copy_stream(device: torch.device) -> Any:
    """The side stream that host-to-device restores of ``device`` are queued on (one per device, made on first use)."""
    stream = _COPY_STREAMS.get(device)
    if stream is None:
        stream = _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return stream


class _HostCopy:
    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor, version: int):
        self.tensor, self.version = tensor, version


def _view_key(rows: torch.Tensor) -> tuple:
    return (rows.data_ptr(), tuple(rows.shape), rows.stride(), rows.dtype, rows.device)


class HostCopies:
    """A host copy of each weight, kept from step to step and taken again when the weight was written meanwhile."""

    def __init__(self) -> None:
        self._copies: Dict[tuple, _HostCopy] = {}
        self.taken = 0  # copies taken (device to host), for tests and diagnostics

    def copies_for(self, rows: Sequence[torch.Tensor]) -> List[_HostCopy]:
        """The host copy of every view in ``rows`` (clean weights), taken now where there is none or it is stale.

        Copies of weights not in ``rows`` are dropped (their host memory freed). After writing a copy back, set its
        ``version`` to the view's (the write moved it)."""
        keys = [_view_key(r) for r in rows]
        kept = {key: self._copies[key] for key in keys if key in self._copies}
        self._copies = kept
        out = []
        for key, view in zip(keys, rows):
            entry = kept.get(key)
            if entry is None or entry.version != view._version:
                if entry is None:
                    entry = kept[key] = _HostCopy(_host_like(view), -1)
                entry.tensor.copy_(view)  # blocking: the noise goes in only after the copy is taken
                entry.version = view._version
                self.taken += 1
            out.append(entry)
        return out

    def forget(self) -> None:
        """Drop every copy: the next perturb takes them anew (after a write the version counter does not see)."""
        self._copies = {}


def write_back(rows: torch.Tensor, host: torch.Tensor, stream: Optional[Any]) -> None:
    """Copy ``host`` into ``rows``: on CUDA queued on ``stream`` after the work queued so far on the current stream
    (the backward kernels that read the noisy weight), without waiting; elsewhere at once."""
    if stream is None:
        rows.copy_(host)
        return
    stream.wait_stream(torch.cuda.current_stream(rows.device))
    with torch.cuda.stream(stream):
        rows.copy_(host, non_blocking=True)


class _UseHook:
    """A hook of one use of a weight (``owner._reached(use)`` / ``owner._input_done(use)``), holding its owner weakly:
    the tensors it sits on keep no graph or restorer alive through it."""

    __slots__ = ("owner", "use", "input_done")

    def __init__(self, owner: weakref.ReferenceType, use: int, input_done: bool):
        self.owner, self.use, self.input_done = owner, use, input_done

    def __call__(self, grad: torch.Tensor) -> None:
        owner = self.owner()
        if owner is not None:
            (owner._input_done if self.input_done else owner._reached)(self.use)


class _ForwardHook(Uncopyable):
    """Forward hook of a module that computes with layer ``layer``'s weight: records the use."""

    __slots__ = ("owner", "layer")

    def __init__(self, owner: weakref.ReferenceType, layer: int):
        self.owner, self.layer = owner, layer

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        owner = self.owner()
        if owner is not None:
            owner._used(self.layer, args, output)


class _ForwardPreHook(_ForwardHook):
    """Forward pre-hook of such a module: a layer written back early gets its noise back before it computes again."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: Any) -> None:  # type: ignore[override]
        owner = self.owner()
        if owner is not None and owner._done[self.layer]:
            owner._perturb_again(self.layer)


class EarlyRestore:
    """Restores each layer of a step once the backward has finished every use of its weight.

    A use is a forward of a module that computes with the weight while the noise is in (in the ``perturbed()``
    block, or after it before the backward). Each use with grad enabled, an input that requires grad and an
    output with a graph gets two hooks, both on existing tensors (the graph is not changed, so the gradients
    are exactly those of the other restores): one on its output notes which backward pass reached that
    forward's graph; one on its input runs once the input's gradient is complete in a backward pass -- after
    every product with the weight that that pass computes. The use is done when the second runs in the pass
    the first noted, and that pass frees its graph: an input shared with another forward, or reached by another
    loss, does not end a use whose output that pass did not reach, and a pass that keeps its graph
    (``retain_graph=True``, ``create_graph=True``, an input-gradient penalty's ``autograd.grad``) ends no use, since
    a later pass may go through the graph again and needs ``W + e`` there (a layer whose graph is kept and never
    traversed again waits for the step's restore).
    When every use of a layer is done and the noise may come out (``may_restore()``: the ``perturbed()`` block
    has ended and no ``perturb()`` holds it), the layer is restored at once (on CUDA, a copy queued on the side
    stream). Should the layer compute again before the step's restore (a forward after that backward while
    another graph is pending, a micro-batch redone after a backward that raised, a checkpoint's rerun for
    another graph), its noise is put back first: it computes at ``W + e``, as with the other restores. A layer
    with a use that gets no hooks -- its input needs no gradient (the first layer), grad was off (reentrant
    gradient checkpointing reruns that forward in the backward), its input came as a keyword -- waits for the
    restore of the whole step, at the end of the backward. A forward run by a backward (a
    checkpoint's rerun) is not a use: the backward traverses the first forward's graph.

    It relies on the layer reading its weight only in products with its input (``x @ W.T``, a
    convolution of ``x``): true of the LoRA layers discovered (peft, DoRA included; loralib; torchtune).
    """

    def __init__(self, layers: Sequence[Tuple[Sequence[nn.Module], Callable[[], None], Callable[[], None]]], may_restore: Callable[[], bool]):
        """``layers``: per layer, the modules that compute with its weight, what restores it and what puts its noise back."""
        self._restore = [restore for _, restore, _ in layers]
        self._again = [again for _, _, again in layers]
        self._pending = [0] * len(layers)  # uses not done yet
        self._blind = [False] * len(layers)  # a use without hooks: this layer waits for the step's restore
        self._done = [False] * len(layers)
        self._may_restore = may_restore
        self._use_layer: List[int] = []  # per use: its layer
        self._use_pass: List[Optional[int]] = []  # per use: the backward pass that reached its output (None: none yet; -1: done)
        self._me = weakref.ref(self)
        self._handles: List[RemovableHandle] = []  # the modules' forward hooks, then the input hooks (inputs may outlive the step)
        try:
            for k, (modules, *_) in enumerate(layers):
                for module in modules:
                    self._handles.append(module.register_forward_pre_hook(_ForwardPreHook(self._me, k)))
                    self._handles.append(module.register_forward_hook(_ForwardHook(self._me, k)))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Take every hook out (idempotent); the output hooks left on this step's graphs then do nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _used(self, k: int, args: Any, output: Any) -> None:
        if not self._handles or current_autograd_node() is not None:  # a checkpoint's rerun of a forward inside a backward
            return
        x = args[0] if args else None
        # (traced by torch.compile: a hook on a traced input would not run as one here)
        if (is_compiling() or not torch.is_grad_enabled() or graph_task_id() is None or not isinstance(x, torch.Tensor) or not x.requires_grad
                or not isinstance(output, torch.Tensor) or output.grad_fn is None):
            self._blind[k] = True
            return
        use = len(self._use_layer)
        self._use_layer.append(k)
        self._use_pass.append(None)
        output.register_hook(_UseHook(self._me, use, input_done=False))
        self._handles.append(x.register_hook(_UseHook(self._me, use, input_done=True)))
        self._pending[k] += 1

    def _reached(self, use: int) -> None:
        if self._use_pass[use] != -1:
            self._use_pass[use] = graph_task_id()

    def _input_done(self, use: int) -> None:
        if not self._handles or self._use_pass[use] in (None, -1) or self._use_pass[use] != graph_task_id():
            return  # this pass did not reach the use's output, or the use is done already
        if backward_keeps_graph():  # the graph stays: a later pass may compute with this use's weight again
            self._use_pass[use] = None
            return
        self._use_pass[use] = -1
        k = self._use_layer[use]
        self._pending[k] -= 1
        if self._pending[k] or self._blind[k] or self._done[k] or not self._may_restore():
            return
        self._done[k] = True
        self._restore[k]()

    def _perturb_again(self, k: int) -> None:
        if not self._handles:
            return
        self._again[k]()
        self._done[k] = False
