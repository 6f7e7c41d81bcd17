"""Virtual mode: compute with ``W + e`` without ever writing ``W``.

Inside ``perturbed()``, the base product of every target (``x W^T + b`` of an ``nn.Linear``, a
GPT-2 ``Conv1D`` or a :class:`~flatlora_optim.LoRALinear`) is routed through
:class:`NoisyLinearFunction`. Its forward forms ``fl(W + e)`` for that one layer (block by block,
with the same kernel and seeds as in-place mode, so both modes see the same values), uses it and
frees it. Its backward regenerates ``W + e`` from the seeds instead of keeping it. Peak extra memory
is one layer's ``W + e``, whatever the depth of the model; there is nothing to restore, so
``backward()`` after the block, ``model.eval()``, ``state_dict()`` and checkpoints are correct at any
moment.

The per-row noise scale (``sigma / sqrt(n) * ||W_i + sBA_i||``) is computed once when the block
is entered and is a constant for autograd, as in the paper: no gradient flows from the loss into
``A`` or ``B`` through the row norms.

Interception replaces ``forward`` (``base_forward`` for ``LoRALinear``) on the module instance for
the duration of the block. When the block ends with a graph still waiting for its backward, the layers
stay rerouted until that backward ends or the graph is released, as in-place mode keeps its weights
perturbed: gradient checkpointing runs the layers' forward again inside the backward, and those reruns
must see the block's noise (a forward without grad meanwhile, an evaluation, is the model's own). Afterwards the
model is exactly the model that was built.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .lora import LoRALinear
from .perturbation import Perturber, TargetPerturbation
from .targets import LoRATarget, is_conv1d
from .torch_internals import is_compiling
from .uncopyable import Uncopyable

__all__ = ["NoisyLinearFunction", "VirtualPatches", "interception_point", "virtual_refusal", "INTERCEPTABLE"]

INTERCEPTABLE = "nn.Linear (and subclasses that keep its forward), transformers Conv1D (GPT-2), flatlora_optim.LoRALinear"


class NoisyLinearFunction(torch.autograd.Function):
    """``y = x (W + e)^T + b`` with ``W + e`` formed in forward and regenerated in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], perturber: Perturber, p: TargetPerturbation) -> torch.Tensor:
        former = perturber.former(p, weight)  # forms W + e of this weight: the backward forms the same, even after a conversion
        noisy = former()  # m x n, rows = output units, whatever the storage
        ctx.former, ctx.p = former, p
        # x is needed only for a trainable base weight's gradient (as in F.linear); the weight is
        # saved for autograd's version check, so writing it before backward raises.
        ctx.save_for_backward(x if weight.requires_grad else None, weight, bias)
        return F.linear(x, noisy.to(x.dtype) if noisy.dtype != x.dtype else noisy, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight, bias = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            noisy = ctx.former()
            grad_x = grad_out @ noisy.to(grad_out.dtype)
            del noisy
        if ctx.needs_input_grad[1]:  # a trainable base weight: its gradient at W + e is x-only
            rows_grad = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
            grad_weight = (rows_grad.t() if ctx.p.target.transposed else rows_grad).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(bias.dtype)
        return grad_x, grad_weight, grad_bias, None, None


def reads_base_weight(target: LoRATarget) -> bool:
    """Whether the LoRA layer reads its base weight outside the base product (DoRA: the row norms of
    ``W + sBA``), where virtual mode's rerouting would leave it the clean ``W``."""
    if target.flavour == "torchtune-dora":
        return True
    if target.flavour.startswith("peft"):  # checked at every block: the active names only, no adapter factors built
        from .flavours.peft_flavours import variant_label

        module = target.module
        active = [] if getattr(module, "disable_adapters", False) else getattr(module, "active_adapters", [])
        return any(variant_label(module, name) == "DoRA" for name in active)
    return False


def virtual_refusal(target: LoRATarget) -> Optional[str]:
    """Why virtual mode cannot take ``target`` (for the error message), or None."""
    if target.tied:
        return f"{target.name} shares its base weight with {[name for *_, name in target.tied][:3]} (tied weights)"
    if reads_base_weight(target):
        return f"{target.name} is a DoRA layer, which reads its base weight directly for its row norms"
    if interception_point(target) is None:
        return f"{type(target.owner).__name__} ({target.name}) is not a layer it handles ({INTERCEPTABLE})"
    return None


def interception_point(target: LoRATarget) -> Optional[Tuple[nn.Module, str]]:
    """Where virtual mode reroutes ``target``'s base product: ``(module, method name)``, or None."""
    owner = target.owner
    if isinstance(owner, LoRALinear):
        return owner, "base_forward"
    if isinstance(owner, nn.Linear) and type(owner).forward is nn.Linear.forward:
        return owner, "forward"
    if is_conv1d(owner):
        return owner, "forward"
    return None


class _NoisyForward(Uncopyable):
    """The rerouted base product of one target, put in its module's ``__dict__`` in place of the class's method. An
    object rather than a closure: ``copy.deepcopy`` would share a function with the copy, which would then compute
    with the original module's weight; this one refuses to be copied (:mod:`flatlora_optim.uncopyable`)."""

    __slots__ = ("owner", "plain", "perturber", "p", "armed", "called", "key")

    def __init__(self, owner: nn.Module, attribute: str, perturber: Perturber, p: TargetPerturbation,
                 armed: Callable[[], bool], called: Set[int]):
        self.owner, self.perturber, self.p, self.armed, self.called = owner, perturber, p, armed, called
        self.plain = getattr(type(owner), attribute).__get__(owner, type(owner))
        self.key = id(p.target)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.called.add(self.key)
        if is_compiling():
            raise RuntimeError(
                "FlatLoRA(mode='virtual') cannot run under torch.compile (its forward draws noise from private generators "
                "and reroutes modules at run time). Use mode='inplace', which only writes the weights between compiled calls."
            )
        if not self.armed() and not torch.is_grad_enabled():
            # after the block, while a graph still waits: a forward without grad (an evaluation) builds no graph and
            # is never rerun by checkpointing, so it gets the model's own forward
            return self.plain(x)
        return NoisyLinearFunction.apply(x, self.p.target.weight, self.owner.bias, self.perturber, self.p)


class _Ran(Uncopyable):
    """A forward pre-hook: the LoRA layer ``key`` ran."""

    __slots__ = ("ran", "key")

    def __init__(self, ran: Set[int], key: int):
        self.ran, self.key = ran, key

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.ran.add(self.key)


class VirtualPatches:
    """Reroutes the targets' base products to :class:`NoisyLinearFunction` until :meth:`remove`.

    ``watch``: also note which LoRA layers ran (a forward pre-hook each), so that :meth:`unrouted` can name those
    whose forward never went through the rerouted product: a registered layer that computes with its base weight
    directly (``F.linear(x, self.base.weight)``) would get no noise, silently. The optimizer watches until a
    block has seen the layers run."""

    def __init__(self, perturber: Perturber, perturbations: List[TargetPerturbation], armed: Callable[[], bool] = lambda: True,
                 watch: bool = False):
        self._patched: List[Tuple[nn.Module, str]] = []
        self.called: Set[int] = set()
        self.ran: Set[int] = set()
        self._names = {id(p.target): p.target.name for p in perturbations}
        self._watching: List[RemovableHandle] = []
        try:
            if watch:
                for p in perturbations:
                    self._watching.append(p.target.module.register_forward_pre_hook(_Ran(self.ran, id(p.target))))
            for p in perturbations:
                refusal = virtual_refusal(p.target)  # checked at construction; a target changed since (say, DoRA switched on)
                if refusal is not None:
                    raise ValueError(f"mode='virtual' cannot reroute {refusal}. Use mode='inplace'.")
                module, attribute = interception_point(p.target)  # type: ignore[misc]
                if attribute in module.__dict__:
                    raise RuntimeError(f"{p.target.name}.{attribute} is already rerouted (two FlatLoRA wrappers in virtual mode on one model?).")
                self._patched.append((module, attribute))  # first: remove() must know of every patch
                module.__dict__[attribute] = _NoisyForward(module, attribute, perturber, p, armed, self.called)
        except BaseException:
            self.remove()
            raise

    @property
    def watching(self) -> bool:
        return bool(self._watching)

    def unrouted(self) -> List[str]:
        """The layers that ran without their rerouted product (watched only)."""
        return [name for key, name in self._names.items() if key in self.ran and key not in self.called]

    def stop_watching(self) -> None:
        for handle in self._watching:
            handle.remove()
        self._watching.clear()

    def remove(self) -> None:
        """Put every module back exactly as it was; idempotent."""
        self.stop_watching()
        for module, attribute in self._patched:
            module.__dict__.pop(attribute, None)
        self._patched.clear()
