"""Discovery: find the LoRA-bearing modules of a model by introspection.

A *target* is one frozen base weight that Flat-LoRA perturbs, seen as a 2-D ``m x n`` matrix
whose rows are output units (the paper's "filters") and whose ``n`` columns are the fan-in,
together with the low-rank adapters ``(A, B, scaling)`` that are currently added to it in the
forward pass. The noise of row ``i`` is scaled by ``||W_i + sum_a s_a (B_a A_a)_i||``.

Each LoRA implementation ("flavour") is one small :class:`Flavour`: a test that says whether a
module is of that kind, and a function that describes it as a :class:`LoRATarget`. Adding a
flavour is adding one such pair to the registry (see :func:`register_flavour`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

__all__ = [
    "Adapter",
    "LoRATarget",
    "Flavour",
    "TargetsLike",
    "discover_targets",
    "register_flavour",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class Adapter:
    """One active low-rank update ``scaling * B @ A`` in the row orientation of its target.

    ``A`` is ``r x n`` (n = fan-in) and ``B`` is ``m x r`` (m = output rows).
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float


@dataclass
class LoRATarget:
    """A frozen weight to perturb and the adapters that currently act on it.

    Attributes:
        name: qualified module name in the model (as in ``model.named_modules()``).
        module: the LoRA-bearing module (the one discovery matched).
        flavour: which LoRA implementation it is (``"peft"``, ``"flatlora"``, ``"plain"``...).
        owner: the module that holds the frozen weight as a parameter.
        param_name: the weight's attribute name on ``owner`` (usually ``"weight"``).
        transposed: True when the stored weight is ``n x m`` (GPT-2 ``Conv1D``, peft
            ``fan_in_fan_out=True``); rows are then its columns.
    """

    name: str
    module: nn.Module
    flavour: str
    owner: nn.Module
    param_name: str
    transposed: bool = False
    _adapters: Callable[[], List[Adapter]] = field(default=lambda: [], repr=False)
    _check: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen weight parameter, as stored."""
        return getattr(self.owner, self.param_name)

    def rows(self) -> torch.Tensor:
        """The weight as an ``m x n`` view (output rows x fan-in); writes go to the parameter."""
        weight = self.weight
        return weight.t() if self.transposed else weight

    def adapters(self) -> List[Adapter]:
        """The adapters that the module's forward adds to this weight right now."""
        return self._adapters()

    def check(self) -> None:
        """Raise a ``ValueError`` if the target cannot be perturbed in its current state."""
        self._check()
        weight = self.weight
        if weight.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"Target {self.name!r} has a {weight.dtype} base weight (packed or quantized?); Flat-LoRA in-place mode "
                f"perturbs only {', '.join(str(d) for d in _FLOAT_DTYPES)} weights. Exclude it with targets=..."
            )
        if weight.dim() != 2:
            raise ValueError(f"Target {self.name!r} has a {weight.dim()}-D weight; this flavour expects a 2-D Linear weight.")
        if weight.device.type == "meta":
            raise ValueError(
                f"Target {self.name!r} has its weight on the meta device (offloaded or not yet materialised); "
                "load the model onto one device before wrapping it with FlatLoRA."
            )

    @property
    def shape(self) -> torch.Size:
        """``(m, n)``: output rows and fan-in."""
        return self.rows().shape


@dataclass(frozen=True)
class Flavour:
    """A LoRA implementation discovery knows: ``matches(module)`` and ``describe(name, module)``.

    ``explicit_only`` flavours (a plain ``nn.Linear`` without adapters) are used only for modules
    the user names in ``targets=``.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    describe: Callable[[str, nn.Module], LoRATarget]
    explicit_only: bool = False


_REGISTRY: List[Flavour] = []


def register_flavour(flavour: Flavour, *, first: bool = True) -> None:
    """Teach discovery a new LoRA layer type. ``first`` puts it before the built-in ones."""
    if first:
        _REGISTRY.insert(0, flavour)
    else:
        _REGISTRY.append(flavour)


# ---------------------------------------------------------------------------- built-in flavours


def _describe_flatlora(name: str, module: nn.Module) -> LoRATarget:
    def adapters() -> List[Adapter]:
        if module.merged:
            return []
        return [Adapter("default", module.lora_A, module.lora_B, float(module.scaling))]

    def check() -> None:
        if module.merged:
            raise ValueError(
                f"The LoRA update of {name!r} is merged into its base weight: training a merged adapter gives it no "
                "gradient and Flat-LoRA would perturb W+sBA as if it were frozen. Call module.unmerge() before training."
            )

    return LoRATarget(name, module, "flatlora", module, "weight", False, adapters, check)


def _is_flatlora(module: nn.Module) -> bool:
    from .lora import LoRALinear

    return isinstance(module, LoRALinear)


def _peft_linear_class() -> Optional[type]:
    # peft is optional: a model built with peft has imported it, so there is nothing to import
    # (and nothing to pay) when it is absent from sys.modules.
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - a peft without the LoRA tuner
        return None
    return Linear


def _peft_lora_layer_class() -> Optional[type]:
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # pragma: no cover
        return None
    return LoraLayer


def _is_peft_linear(module: nn.Module) -> bool:
    cls = _peft_linear_class()
    return cls is not None and isinstance(module, cls)


def _describe_peft_linear(name: str, module: nn.Module) -> LoRATarget:
    base = module.get_base_layer()
    transposed = bool(getattr(module, "fan_in_fan_out", False))

    def active() -> List[str]:
        if module.disable_adapters:
            return []
        return [a for a in module.active_adapters if a in module.lora_A]

    def adapters() -> List[Adapter]:
        if module.merged:
            return []
        return [Adapter(a, module.lora_A[a].weight, module.lora_B[a].weight, float(module.scaling[a])) for a in active()]

    def check() -> None:
        if module.merged:
            raise ValueError(
                f"peft adapter(s) {module.merged_adapters} of {name!r} are merged into the base weight; the LoRA "
                "parameters get no gradient while merged. Call model.unmerge_adapter() (or layer.unmerge()) before training."
            )
        variants = getattr(module, "lora_variant", {})
        use_dora = getattr(module, "use_dora", {})
        for a in active():
            if use_dora.get(a, False) or a in variants:
                raise ValueError(
                    f"Adapter {a!r} of {name!r} is a LoRA variant (DoRA or similar), which Flat-LoRA does not support yet; "
                    "exclude this layer with targets=... or use plain LoRA."
                )

    return LoRATarget(name, module, "peft", base, "weight", transposed, adapters, check)


def _is_plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def _describe_plain_linear(name: str, module: nn.Module) -> LoRATarget:
    return LoRATarget(name, module, "plain", module, "weight", False)


register_flavour(Flavour("plain", _is_plain_linear, _describe_plain_linear, explicit_only=True))
register_flavour(Flavour("peft", _is_peft_linear, _describe_peft_linear))
register_flavour(Flavour("flatlora", _is_flatlora, _describe_flatlora))


# ---------------------------------------------------------------------------- discovery

TargetsLike = Union[None, str, Sequence[Union[str, nn.Module]], Callable[[str, nn.Module], bool]]


def _selector(targets: TargetsLike) -> Tuple[Optional[Callable[[str, nn.Module], bool]], Set[int]]:
    """Turn ``targets=`` into (a name filter over LoRA layers, ids of explicitly given modules).

    peft's conventions: one string is a regex matched against the whole name, a list matches
    names or their last components. Module objects in the list are taken as given, even a plain
    frozen ``nn.Linear`` without adapters (an override).
    """
    if targets is None:
        return None, set()
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return (lambda name, module: pattern.fullmatch(name) is not None), set()
    if callable(targets) and not isinstance(targets, nn.Module):
        return targets, set()  # type: ignore[return-value]
    items = list(targets) if not isinstance(targets, nn.Module) else [targets]
    if not items or not all(isinstance(s, (str, nn.Module)) for s in items):
        raise ValueError(
            f"Invalid targets {targets!r}: expected a regex string, a non-empty list of module names, name suffixes or "
            "modules, or a callable(name, module) -> bool."
        )
    suffixes = [s for s in items if isinstance(s, str)]
    modules = {id(m) for m in items if isinstance(m, nn.Module)}
    return (lambda name, module: id(module) in modules or any(name == s or name.endswith("." + s) for s in suffixes)), modules


def _flavour_of(module: nn.Module, explicit: bool) -> Optional[Flavour]:
    for flavour in _REGISTRY:
        if flavour.explicit_only and not explicit:
            continue
        if flavour.matches(module):
            return flavour
    return None


def discover_targets(model: nn.Module, targets: TargetsLike = None) -> List[LoRATarget]:
    """Return the weights Flat-LoRA should perturb, in ``model.named_modules()`` order.

    With ``targets=None`` every LoRA-bearing module is taken. A regex string, a list of names
    or suffixes, or a callable ``(name, module) -> bool`` restricts the choice to the LoRA layers
    it selects; module objects in the list override it: they are taken even when they are a
    plain frozen ``nn.Linear`` (its noise is then scaled by its own row norms).
    Raises ``ValueError`` with what was searched for when nothing is found.
    """
    selector, explicit_modules = _selector(targets)
    found: List[LoRATarget] = []
    unsupported: Dict[str, List[str]] = {}
    claimed: List[str] = []
    lora_layer_cls = _peft_lora_layer_class()
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in claimed):
            continue  # the base layer inside a LoRA wrapper is described by the wrapper
        if selector is not None and not selector(name, module):
            continue
        flavour = _flavour_of(module, explicit=id(module) in explicit_modules)
        if flavour is None:
            if lora_layer_cls is not None and isinstance(module, lora_layer_cls):
                unsupported.setdefault(type(module).__name__, []).append(name)
            continue
        found.append(flavour.describe(name, module))
        claimed.append(name)
    if unsupported and not found:
        kinds = ", ".join(f"{k} ({len(v)}, e.g. {v[0]!r})" for k, v in unsupported.items())
        raise ValueError(f"Found only LoRA layer kinds Flat-LoRA does not support yet: {kinds}. Linear LoRA layers are supported.")
    if unsupported:
        import warnings

        kinds = ", ".join(f"{k} x{len(v)}" for k, v in unsupported.items())
        warnings.warn(f"Flat-LoRA skips LoRA layers of unsupported kinds: {kinds}; their base weights are not perturbed.", stacklevel=3)
    if not found:
        searched = "peft LoRA Linear (incl. GPT-2 Conv1D)" + ("" if "peft" in sys.modules else " [peft not imported]")
        searched += ", flatlora_optim.LoRALinear"
        if selector is not None:
            raise ValueError(
                f"targets={targets!r} selected no LoRA layer (nor a plain nn.Linear) in {type(model).__name__}: searched "
                f"{sum(1 for _ in model.named_modules())} modules for {searched}. Check the names against model.named_modules()."
            )
        raise ValueError(
            f"No LoRA layers found in {type(model).__name__}: searched {sum(1 for _ in model.named_modules())} modules for "
            f"{searched}. Add adapters first (peft.get_peft_model(...) or flatlora_optim.inject_lora(model, [...], r=8, alpha=16)), "
            "or pass frozen Linear modules to perturb with targets=[module, ...]."
        )
    return found
