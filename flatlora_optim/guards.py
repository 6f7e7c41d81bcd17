"""Guards that are installed only while noise is in the weights.

In-place mode writes ``W + e`` into the frozen weights between ``perturb`` and ``restore``.
Three things must not see those values by accident, and one thing must be known:

* ``state_dict()`` of any module holding a perturbed weight returns a clean copy of it (so a
  checkpoint saved at any moment holds the original weights);
* ``train()`` / ``eval()`` that change the mode of a perturbed layer restore the weights and
  raise (evaluating, or switching dropout, between forward and backward is a bug in in-place mode);
  so do conversions of the model or of a perturbed layer (``to(dtype)``, ``half()``, ``to(device)``...: they
  would carry the noise into the converted weights, where exact restore can no longer undo it);
* autograd: a forward that builds a graph at the noisy weights leaves it *pending*, and the noise
  stays until every pending graph has had a backward or been released, so that restoring waits
  until the gradients have been computed (restoring earlier would make autograd raise its in-place
  error, or, under gradient checkpointing, which runs the forward again inside the backward,
  silently compute gradients at the clean weights). A forward's graph is seen through the wrapped
  model's outputs that require grad (all of them) and the first perturbed layer output since the
  guards went in or since the last backward ended (for a layer called on its own): a gradient hook
  on each says a backward reached it, a token in its graph node's metadata says it was released.
  A backward that reaches none of them leaves the graph pending until it is released or ``step()``.
  Virtual mode takes this part only (its layers stay rerouted while a graph is pending).

All hooks are removed when the weights are restored; the model is then exactly as it was.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .interrupts import interrupts_deferred
from .targets import LoRATarget
from .torch_internals import backward_keeps_graph, current_autograd_node
from .uncopyable import Uncopyable

__all__ = ["PerturbationGuards"]


def _register_always_called(module: nn.Module, hook: Callable[..., None]) -> RemovableHandle:
    """A forward hook that runs also when the forward raises (``always_call``, torch >= 2.1; before, only when it returns)."""
    try:
        return module.register_forward_hook(hook, always_call=True)
    except TypeError:
        return module.register_forward_hook(hook)


class _GraphToken:
    """Stored in a graph node's metadata: its finaliser says that this graph was released."""

    __slots__ = ("_callback", "_key", "__weakref__")

    def __init__(self, callback: Callable[[int], None], key: int):
        self._callback, self._key = callback, key

    def __del__(self) -> None:
        try:
            self._callback(self._key)
        except Exception:  # pragma: no cover - never raise from a finaliser
            pass


class _GradHook:
    """A tracked output's gradient hook: its gradient was computed, so a backward reached that graph."""

    __slots__ = ("_fired", "_key")

    def __init__(self, fired: Callable[[int], None], key: int):
        self._fired, self._key = fired, key

    def __call__(self, grad: torch.Tensor) -> None:
        self._fired(self._key)


def _register_state_dict_post_hook(module: nn.Module, hook: Callable[..., Any]) -> RemovableHandle:
    register = getattr(module, "register_state_dict_post_hook", None)
    if register is None:  # torch < 2.5
        return module._register_state_dict_hook(hook)
    return register(hook)


class _ModeGuard(Uncopyable):
    """``module.train`` while perturbed: a change of mode is reported first (to restore and raise)."""

    __slots__ = ("module", "on_mode_change", "original")

    def __init__(self, module: nn.Module, on_mode_change: Callable[[bool], None], original: Callable[..., nn.Module]):
        self.module, self.on_mode_change, self.original = module, on_mode_change, original

    def __call__(self, mode: bool = True) -> nn.Module:
        if bool(mode) != self.module.training:
            self.on_mode_change(bool(mode))
        return self.original(self.module, mode)


class _ConversionGuard(Uncopyable):
    """``module._apply`` while perturbed (what ``to()``, ``half()``, ``float()``, ``cuda()``... call): a conversion that
    would replace the perturbed weights (another type, device or memory format, ``to_empty``) is reported first (to
    restore and raise). It is told by what ``fn`` makes of a small tensor like each such weight: the tensor itself
    (``Tensor.to`` and its kin return their input when nothing changes) passes."""

    __slots__ = ("module", "on_conversion", "original", "kinds")

    def __init__(self, module: nn.Module, on_conversion: Callable[[], None], original: Callable[..., nn.Module],
                 kinds: List[Tuple[torch.dtype, torch.device, int]]):
        self.module, self.on_conversion, self.original, self.kinds = module, on_conversion, original, kinds

    def __call__(self, fn: Callable[[torch.Tensor], Any], *args: Any, **kwargs: Any) -> nn.Module:
        if any(_converts(fn, *kind) for kind in self.kinds):
            self.on_conversion()
        return self.original(self.module, fn, *args, **kwargs)


def _converts(fn: Callable[[torch.Tensor], Any], dtype: torch.dtype, device: torch.device, dims: int) -> bool:
    """Whether ``fn`` (a ``Module._apply`` function) replaces a tensor of ``dtype`` on ``device`` with ``dims``
    dimensions of 2 (another type, device or memory format: ``Module.to`` converts formats of 4-D and 5-D tensors
    only), or fails on one: then the conversion is refused as well."""
    probe = torch.empty((2,) * dims, dtype=dtype, device=device)
    try:
        return fn(probe) is not probe
    except Exception:
        return True


class _SharedCopies:
    """``clean_weight(target)``, one copy per target and ``state_dict()`` call: the names of a tied weight in one
    state dict get one tensor, as they do outside the block (safetensors keeps one of names that share storage, and
    refuses to load a checkpoint that has both), while each call gets copies of its own (a caller may change its
    copies in place). A call is told by its destination dict, which every module of the call writes into."""

    __slots__ = ("clean_weight", "destination", "copies")

    def __init__(self, clean_weight: Callable[[LoRATarget], torch.Tensor]):
        self.clean_weight = clean_weight
        self.destination: Optional[weakref.ReferenceType] = None
        self.copies: Dict[int, torch.Tensor] = {}

    def __call__(self, target: LoRATarget, destination: Dict[str, Any]) -> torch.Tensor:
        if self.destination is None or self.destination() is not destination:
            self.destination, self.copies = weakref.ref(destination), {}
        copy = self.copies.get(id(target))
        if copy is None:
            copy = self.copies[id(target)] = self.clean_weight(target)
        return copy


class _CleanState(Uncopyable):
    """A ``state_dict`` post-hook: the entries of one owner's perturbed weights become clean copies. ``group``
    holds ``(param_name, target)``: the owner's name for the weight, and the target that perturbs it (another
    layer's, for a weight tied to it)."""

    __slots__ = ("group", "clean_weight", "_from_public_api")  # torch marks hooks given to its public registration

    def __init__(self, group: List[Tuple[str, LoRATarget]], clean_weight: _SharedCopies):
        self.group, self.clean_weight = group, clean_weight

    def __call__(self, module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for param_name, target in self.group:
            key = prefix + param_name
            if key in state_dict:
                state_dict[key] = self.clean_weight(target, state_dict)


def _tensors_with_grad(output: Any, depth: int = 3) -> List[torch.Tensor]:
    """Every tensor that requires grad in a module's output: a tensor, or those inside tuples, lists, mappings
    (transformers' ``ModelOutput`` is one) and dataclasses, ``depth`` levels down."""
    if isinstance(output, torch.Tensor):  # a leaf (a parameter, an input handed back) was not built by this forward
        return [output] if output.requires_grad and output.grad_fn is not None else []
    if depth == 0:
        return []
    if isinstance(output, Mapping):
        items: Any = output.values()
    elif isinstance(output, (tuple, list)):
        items = output
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = [getattr(output, f.name, None) for f in dataclasses.fields(output)]
    else:
        return []
    return [tensor for item in items for tensor in _tensors_with_grad(item, depth - 1)]


class _BackwardEnd:
    """Queued on a backward that reached a tracked graph; runs at its end. Only that backward holds it, so while it
    is alive the backward still runs, and a backward that failed (its queued callbacks dropped unrun) frees it."""

    __slots__ = ("_guards", "__weakref__")

    def __init__(self, guards: PerturbationGuards):
        self._guards = guards

    def __call__(self) -> None:
        guards, self._guards = self._guards, None
        if guards is not None:
            guards._backward_finished()


class PerturbationGuards(Uncopyable):
    """Installs and removes the while-perturbed hooks on a set of targets.

    Args:
        targets: the perturbed targets.
        clean_weight: ``clean_weight(target)`` returns a clean copy of that target's weight.
        on_settled: called when a backward that reached such a graph has ended, and when such a graph is
            garbage-collected: the noise may come out once :meth:`pending` says that no graph waits.
        on_mode_change: called with the new mode before ``train(mode)`` changes a layer's mode;
            it is expected to restore and raise.
        on_conversion: called before a conversion (``to(dtype)``, ``half()``, ``to(device)``, another memory format,
            ``to_empty()``...) of the model or of a module holding a perturbed weight replaces that weight; it is expected
            to restore and raise
            (in-place mode; None: conversions are not guarded).
        root: the wrapped model: a graph that its output carries counts too (under reentrant gradient
            checkpointing the layers build none while the block runs; their backward reruns them).
        layers: install the per-layer guards (in-place mode); virtual mode takes the ``root`` hook and the layers'
            forward hooks that track their outputs (a loop that calls a submodule of the model: its graph is seen
            through the first layer output, as in in-place mode), not the train/eval, conversion or state-dict guards.
    """

    def __init__(
        self,
        targets: List[LoRATarget],
        clean_weight: Callable[[LoRATarget], torch.Tensor],
        on_settled: Callable[[], None],
        on_mode_change: Callable[[bool], None],
        root: Optional[nn.Module] = None,
        layers: bool = True,
        on_conversion: Optional[Callable[[], None]] = None,
    ):
        self._handles: List[RemovableHandle] = []
        self._patched: List[Tuple[nn.Module, str]] = []  # (module, attribute) of each guard put in a module's __dict__
        self._queued: Optional[weakref.ReferenceType] = None  # the _BackwardEnd queued on a running backward
        self._grad_hooked = False  # whether a layer output since the last backward's end (or release) is tracked
        # whether a LoRA layer (a target's own module) / the wrapped model computed since the guards went in (a step with
        # neither warns; compiled code built before the hooks calls none of them)
        self.layer_ran = False
        self.model_ran = False
        # whether a graph built here may rerun after the noise came off (see clean_reruns): a layer computed without grad
        # (reentrant checkpointing: the checkpoint's graph is not tracked), the layer whose output is tracked computed
        # again with grad outside a call of the model and outside a backward (a second forward of a submodule: untracked),
        # or a backward kept its graph
        self.rerun_possible = False
        self._tracked_layer: Optional[nn.Module] = None  # the layer whose output is tracked (since the last backward's end)
        # calls of the wrapped model under way: its pre-hook counts up, its forward hook (also run when the forward
        # raises) down; a call whose pre-hooks installed these guards (a draw inside a loop in one block) is not counted
        self._root_running = 0
        self._pending: Dict[int, int] = {}  # a tracked forward's key -> its live graph tokens, until a backward reaches it
        self._strict = layers  # in-place: a backward through a tracked graph after the restore is an error
        self._keys = itertools.count()
        self._on_settled = on_settled
        # one bound method and one callback shared by every tracked output: these objects live through
        # the step, and each one Python's collector tracks brings its next full collection closer
        forward_hook = self._forward_hook
        self._fired = self._grad_fired
        self._released = self._released_callback()
        # Ctrl-C is held back while hooks go in (one landing between a registration and its bookkeeping
        # would leave a hook that remove() does not know of); whatever ends the install early, including
        # that held-back Ctrl-C, takes out what went in: nobody else gets this object to remove it
        try:
            with interrupts_deferred():
                if not layers:
                    self._handles.extend(target.module.register_forward_hook(forward_hook) for target in targets)
                else:
                    self._install(targets, forward_hook, clean_weight, on_mode_change)
                    if root is not None and "train" not in root.__dict__:
                        # first in line: model.eval() is refused before it switches anything (a layer's guard alone
                        # fires midway, with the root and the modules before that layer already switched)
                        self._patch_train(root, on_mode_change)
                    if on_conversion is not None:
                        self._guard_conversions(targets, root, on_conversion)
                if root is not None:
                    self._handles.append(root.register_forward_pre_hook(self._root_pre_hook))
                    self._handles.append(_register_always_called(root, self._root_hook))
        except BaseException:
            self.remove()
            raise

    def _install(self, targets: List[LoRATarget], forward_hook: Callable[..., None], clean_weight: Callable[[LoRATarget], torch.Tensor],
                 on_mode_change: Callable[[bool], None]) -> None:
        owners: Dict[int, Tuple[nn.Module, List[Tuple[str, LoRATarget]]]] = {}
        for target in targets:
            owners.setdefault(id(target.owner), (target.owner, []))[1].append((target.param_name, target))
            for module, attribute, _ in target.tied:  # the same parameter under another name (a tied lm_head, a LoRA alias)
                owners.setdefault(id(module), (module, []))[1].append((attribute, target))
            self._handles.append(target.module.register_forward_hook(forward_hook))
            for layer in target.layers():  # its aliases: LoRA layers that compute with the same (tied) weight
                self._patch_train(layer.module, on_mode_change)
        shared_clean = _SharedCopies(clean_weight)
        for owner, group in owners.values():
            self._handles.append(_register_state_dict_post_hook(owner, _CleanState(group, shared_clean)))

    def remove(self) -> None:
        """Take every hook out; idempotent. Ctrl-C waits until the last one is out."""
        with interrupts_deferred():
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            for module, attribute in self._patched:
                module.__dict__.pop(attribute, None)
            self._patched.clear()
            self._pending.clear()
            self._fired = None  # a bound method of self: no cycle left behind

    # -- autograd -----------------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether a graph built at the noisy weights waits for a backward (neither reached by one nor released)."""
        return bool(self._pending)

    def _forward_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.layer_ran = True
        if not torch.is_grad_enabled() or (module is self._tracked_layer and not self._root_running
                                           and current_autograd_node() is None):  # (a recompute in a backward: no new forward)
            self.rerun_possible = True
        # torch calls the hooks of a snapshot of the module's hook dict: an earlier hook of the same forward may
        # have restored the weights and removed the guards (model.eval() in a user's hook, say)
        if not self._handles or self._grad_hooked or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) \
                or output.grad_fn is None:
            return
        # one layer output per forward is enough (the first since the guards went in, or since a backward ended
        # or a tracked graph was released); the model's own outputs are tracked too (_root_hook). Tracking every
        # layer's output cost a hook per layer and step and a Python call per layer in backward (in-place
        # exact's host work over plain LoRA: 8.2 and 8.6 -> 6.5 and 6.4 ms per step on 2 CPU cores, host_time.py --steps)
        self._grad_hooked = True
        self._tracked_layer = module
        self._track(output)

    def _root_pre_hook(self, module: nn.Module, args: Any) -> None:
        self._root_running += 1

    def _root_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        """The wrapped model's own outputs, each of them: under reentrant gradient checkpointing (transformers 4's
        default) the layers run without grad inside the checkpoint, so only the model's outputs carry the graph,
        and its backward runs the layers again: the noise must still be in place then (virtual mode: the layers
        still rerouted). A loss taken from any one output (``.logits`` with the returned ``.loss`` dropped, say)
        reaches a tracked tensor."""
        self._root_running = max(self._root_running - 1, 0)
        self.model_ran = True
        if not self._handles or not torch.is_grad_enabled():
            return
        tensors = _tensors_with_grad(output)
        if tensors:
            self._track(*tensors)

    def _track(self, *outputs: torch.Tensor) -> None:
        """One forward's graph built at the noisy weights, through its tracked outputs: pending until a backward
        computes the gradient of any of them, or until all of them are released."""
        key = next(self._keys)
        self._pending[key] = 0
        for output in outputs:
            output.register_hook(_GradHook(self._fired, key))
            metadata = getattr(output.grad_fn, "metadata", None)
            if isinstance(metadata, dict):
                metadata.setdefault("flatlora_optim", []).append(_GraphToken(self._released, key))
                self._pending[key] += 1

    def _released_callback(self) -> Callable[[int], None]:
        owner = weakref.ref(self)

        def released(key: int) -> None:
            guards = owner()
            if guards is None or not guards._handles:
                return
            count = guards._pending.get(key)
            if count is not None:
                if count > 1:  # other tracked outputs of that forward are still alive
                    guards._pending[key] = count - 1
                    return
                del guards._pending[key]  # every tracked output of that forward is gone: its graph was released
                guards._grad_hooked = False  # the next forward's first layer output is tracked again
            # (a key already reached by a backward that then failed, before its end ran, comes here too)
            if not guards._awaiting_backward_end():
                # a release inside a backward that reached a tracked output -- the throwaway graph of a
                # checkpoint's rerun, say -- waits for that backward's end, which decides
                guards._on_settled()

        return released

    def _grad_fired(self, key: int) -> None:
        if not self._handles:  # the noise was taken out before this backward
            if self._strict:
                raise RuntimeError(
                    "A backward ran through a graph built at Flat-LoRA's noisy weights after they were restored (a second "
                    "backward with retain_graph=True, or a graph kept from an earlier step): its gradient would be taken at "
                    "other weights than its forward's. Run one backward per forward, before opt.step()."
                )
            return
        self._pending.pop(key, None)
        if not self._awaiting_backward_end():  # once per backward, nested ones (reentrant checkpointing) included
            end = _BackwardEnd(self)
            self._queued = weakref.ref(end)
            torch.autograd.Variable._execution_engine.queue_callback(end)

    def _awaiting_backward_end(self) -> bool:
        return self._queued is not None and self._queued() is not None

    def _backward_finished(self) -> None:
        self._queued = None
        if backward_keeps_graph():
            self.rerun_possible = True
        if not self._handles:  # these guards were removed meanwhile (a graph kept from an earlier step)
            return
        self._grad_hooked = False  # a later forward's graph gets its own tracked output
        self._on_settled()

    # -- train/eval ---------------------------------------------------------------------------

    def _patch_train(self, module: nn.Module, on_mode_change: Callable[[bool], None]) -> None:
        self._patched.append((module, "train"))  # first: remove() must know of every patch
        module.__dict__["train"] = _ModeGuard(module, on_mode_change, type(module).train)

    # -- conversions --------------------------------------------------------------------------

    def _guard_conversions(self, targets: List[LoRATarget], root: Optional[nn.Module], on_conversion: Callable[[], None]) -> None:
        """Guard ``_apply`` of the root (first in line: refused before anything is converted), of every perturbed layer,
        of the module holding its weight and of the modules sharing it (a conversion of a submodule that holds one; of
        a module between the root and the layers, the modules it reaches before them are converted first)."""
        kinds_of: Dict[nn.Module, List[Tuple[torch.dtype, torch.device, int]]] = {} if root is None else {root: []}  # root first
        for target in targets:
            weight = target.weight
            kind = (weight.dtype, weight.device, weight.dim())
            holders = [*(layer.module for layer in target.layers()), target.owner, *(m for m, _, _ in target.tied)]
            for module in holders if root is None else [root, *holders]:
                kinds = kinds_of.setdefault(module, [])
                if kind not in kinds:  # (a module holding two weights of other kinds probes both)
                    kinds.append(kind)
        for module, kinds in kinds_of.items():
            if "_apply" in module.__dict__:  # the user's own (or another wrapper's guard)
                continue
            self._patched.append((module, "_apply"))  # first: remove() must know of every patch
            module.__dict__["_apply"] = _ConversionGuard(module, on_conversion, type(module)._apply, kinds)
