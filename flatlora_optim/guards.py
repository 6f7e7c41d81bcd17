"""Guards that are installed only while noise is in the weights.

In-place mode writes ``W + e`` into the frozen weights between ``perturb`` and ``restore``.
Three things must not see those values by accident, and one thing must be known:

* ``state_dict()`` of any module holding a perturbed weight returns a clean copy of it (so a
  checkpoint saved at any moment holds the original weights);
* ``train()`` / ``eval()`` that change the mode of a perturbed layer restore the weights and
  raise (evaluating, or switching dropout, between forward and backward is a bug in in-place mode);
* autograd: every forward of a perturbed layer that builds a graph marks a *pending* backward,
  and the end of the backward pass that consumes it is reported (through a gradient hook on the
  first perturbed output of each graph: the first since the guards went in or since the last
  backward ended; a backward that does not reach that output is not reported, and the weights are
  then restored when the graph is released or at ``step()``), so that restoring can wait
  until the gradient has been computed (restoring earlier would make autograd either raise its
  in-place error or, through ``.data``, silently compute input gradients at the wrong weights).
  A graph dropped without backward is reported too.

All hooks are removed when the weights are restored; the model is then exactly as it was.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .interrupts import interrupts_deferred
from .targets import LoRATarget

__all__ = ["PerturbationGuards"]


class _GraphToken:
    """Stored in a graph node's metadata: its finaliser says the graph was released."""

    __slots__ = ("_callback", "__weakref__")

    def __init__(self, callback: Callable[[], None]):
        self._callback = callback

    def __del__(self) -> None:
        try:
            self._callback()
        except Exception:  # pragma: no cover - never raise from a finaliser
            pass


def _register_state_dict_post_hook(module: nn.Module, hook: Callable[..., Any]) -> RemovableHandle:
    register = getattr(module, "register_state_dict_post_hook", None)
    if register is None:  # torch < 2.5
        return module._register_state_dict_hook(hook)
    return register(hook)


class _ModeGuard:
    """``module.train`` while perturbed: a change of mode is reported first (to restore and raise)."""

    __slots__ = ("module", "on_mode_change", "original")

    def __init__(self, module: nn.Module, on_mode_change: Callable[[bool], None], original: Callable[..., nn.Module]):
        self.module, self.on_mode_change, self.original = module, on_mode_change, original

    def __call__(self, mode: bool = True) -> nn.Module:
        if bool(mode) != self.module.training:
            self.on_mode_change(bool(mode))
        return self.original(self.module, mode)


class _CleanState:
    """A ``state_dict`` post-hook: the entries of ``group``'s perturbed weights become clean copies."""

    __slots__ = ("group", "clean_weight", "_from_public_api")  # torch marks hooks given to its public registration

    def __init__(self, group: List[LoRATarget], clean_weight: Callable[[LoRATarget], torch.Tensor]):
        self.group, self.clean_weight = group, clean_weight

    def __call__(self, module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for target in self.group:
            key = prefix + target.param_name
            if key in state_dict:
                state_dict[key] = self.clean_weight(target)


def _tensor_with_grad(output: Any, depth: int = 3) -> Optional[torch.Tensor]:
    """The first tensor that requires grad in a module's output: a tensor, or one inside tuples, lists and
    mappings (transformers' ``ModelOutput`` is one), ``depth`` levels down."""
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    if depth == 0:
        return None
    if isinstance(output, Mapping):
        items: Any = output.values()
    elif isinstance(output, (tuple, list)):
        items = output
    else:
        return None
    for item in items:
        found = _tensor_with_grad(item, depth - 1)
        if found is not None:
            return found
    return None


class PerturbationGuards:
    """Installs and removes the while-perturbed hooks on a set of targets.

    Args:
        targets: the perturbed targets.
        clean_weight: ``clean_weight(target)`` returns a clean copy of that target's weight.
        on_forward: called (no arguments) when a perturbed layer's forward builds a graph.
        on_backward_end: called at the end of every backward pass through such a graph.
        on_graph_released: called when such a graph is garbage-collected.
        on_mode_change: called with the new mode before ``train(mode)`` changes a layer's mode;
            it is expected to restore and raise.
        root: the wrapped model: a graph that its output carries counts too (under reentrant gradient
            checkpointing the layers build none while the block runs; their backward reruns them).
        layers: install the per-layer guards (in-place mode); virtual mode takes the ``root`` hook only.
    """

    def __init__(
        self,
        targets: List[LoRATarget],
        clean_weight: Callable[[LoRATarget], torch.Tensor],
        on_forward: Callable[[], None],
        on_backward_end: Callable[[], None],
        on_graph_released: Callable[[], None],
        on_mode_change: Callable[[bool], None],
        root: Optional[nn.Module] = None,
        layers: bool = True,
    ):
        self._handles: List[RemovableHandle] = []
        self._patched_train: List[nn.Module] = []
        self._callback_queued = False
        self._grad_hooked = False  # whether a graph built since the last backward's end carries the gradient hook
        self._on_forward = on_forward
        self._on_backward_end = on_backward_end
        self._on_graph_released = on_graph_released
        # one bound method and one callback for every layer and forward: these objects live through
        # the step, and each one Python's collector tracks brings its next full collection closer
        forward_hook = self._forward_hook
        self._grad_hook_of_all = self._grad_hook
        self._released = self._released_callback()
        # Ctrl-C is held back while hooks go in (one landing between a registration and its bookkeeping
        # would leave a hook that remove() does not know of); whatever ends the install early, including
        # that held-back Ctrl-C, takes out what went in: nobody else gets this object to remove it
        try:
            with interrupts_deferred():
                if layers:
                    self._install(targets, forward_hook, clean_weight, on_mode_change)
                if root is not None:
                    self._handles.append(root.register_forward_hook(self._root_hook))
        except BaseException:
            self.remove()
            raise

    def _install(self, targets: List[LoRATarget], forward_hook: Callable[..., None], clean_weight: Callable[[LoRATarget], torch.Tensor],
                 on_mode_change: Callable[[bool], None]) -> None:
        owners: Dict[int, List[LoRATarget]] = {}
        for target in targets:
            owners.setdefault(id(target.owner), []).append(target)
            self._handles.append(target.module.register_forward_hook(forward_hook))
            self._patch_train(target.module, on_mode_change)
        for group in owners.values():
            self._handles.append(_register_state_dict_post_hook(group[0].owner, _CleanState(group, clean_weight)))

    def remove(self) -> None:
        """Take every hook out; idempotent. Ctrl-C waits until the last one is out."""
        with interrupts_deferred():
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            for module in self._patched_train:
                module.__dict__.pop("train", None)
            self._patched_train.clear()
            self._grad_hook_of_all = None  # a bound method of self: no cycle left behind

    # -- autograd -----------------------------------------------------------------------------

    def _forward_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        # torch calls the hooks of a snapshot of the module's hook dict: an earlier hook of the same forward may
        # have restored the weights and removed the guards (model.eval() in a user's hook, say)
        if not self._handles or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        self._track(output)

    def _root_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        """The wrapped model's own output: under reentrant gradient checkpointing (transformers' default) the layers
        run without grad inside the checkpoint, so only the model's output carries the graph, and its backward
        runs the layers again: the noise must still be in place then (virtual mode: the layers still rerouted)."""
        if not self._handles or not torch.is_grad_enabled():
            return
        tensor = _tensor_with_grad(output)
        if tensor is not None:
            self._track(tensor)

    def _track(self, output: torch.Tensor) -> None:
        """A graph built at the noisy weights: pending until its backward ends or it is released."""
        self._on_forward()
        if not self._grad_hooked:
            # one gradient hook per graph is enough to learn when its backward ends: the first perturbed
            # output after the guards go in, or after a backward ended (the next forward's). A hook on every
            # layer's output cost a registration per layer and step and a Python call per layer in backward
            # (1.8 of 7.7 ms of in-place exact's host work per step, 112 layers, host_time.py --steps)
            self._grad_hooked = True
            output.register_hook(self._grad_hook_of_all)
        node = output.grad_fn
        metadata = getattr(node, "metadata", None)
        if isinstance(metadata, dict):
            metadata.setdefault("flatlora_optim", []).append(_GraphToken(self._released))

    def _released_callback(self) -> Callable[[], None]:
        owner = weakref.ref(self)

        def released() -> None:
            guards = owner()
            if guards is not None and guards._handles:
                guards._on_graph_released()

        return released

    def _grad_hook(self, grad: torch.Tensor) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_finished)

    def _backward_finished(self) -> None:
        self._callback_queued = False
        self._grad_hooked = False  # a later forward's graph gets its own hook
        self._on_backward_end()

    # -- train/eval ---------------------------------------------------------------------------

    def _patch_train(self, module: nn.Module, on_mode_change: Callable[[bool], None]) -> None:
        self._patched_train.append(module)  # first: remove() must know of every patch
        module.__dict__["train"] = _ModeGuard(module, on_mode_change, type(module).train)
