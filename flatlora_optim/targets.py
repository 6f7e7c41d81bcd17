"""Discovery: find the LoRA-bearing modules of a model by introspection.

A *target* is one frozen base weight that Flat-LoRA perturbs, seen as a 2-D ``m x n`` matrix
whose rows are output units (the paper's "filters") and whose ``n`` columns are the fan-in,
together with the low-rank adapters ``(A, B, scaling)`` that are currently added to it in the
forward pass. The noise of row ``i`` is scaled by ``||W_i + sum_a s_a (B_a A_a)_i||``.

Each LoRA implementation ("flavour") is one small :class:`Flavour`: a test that says whether a
module is of that kind, and a function that describes it as a :class:`LoRATarget`. The built-in
flavours live in :mod:`flatlora_optim.flavours` (peft, loralib, torchtune, this package's own
``LoRALinear``); a user adds one with :func:`register_lora_layer` (a describe function returning
a :class:`LoRALayerInfo`) or, with full control, :func:`register_flavour`.
See ``docs/flavours.md``.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from .devices import made_current
from .interrupts import interrupts_deferred
from .sharding import is_dtensor, local, row_range
from .shared_memory import check_shared_memory

__all__ = [
    "Adapter",
    "LoRATarget",
    "LoRALayerInfo",
    "Flavour",
    "TargetsLike",
    "discover_targets",
    "held_views",
    "register_flavour",
    "register_lora_layer",
    "packed_weight_reason",
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
        flavour: which LoRA implementation it is (``"peft"``, ``"peft-conv"``, ``"loralib"``...).
        owner: the module that holds the frozen weight as a parameter.
        param_name: the weight's attribute name on ``owner`` (usually ``"weight"``).
        transposed: True when the stored weight is ``n x m`` (GPT-2 ``Conv1D``, peft
            ``fan_in_fan_out=True``, embeddings); rows are then its columns.

    A weight with more than two dimensions (a convolution kernel ``out x in/groups x k...``) is
    seen as ``out x (in/groups * prod(k))`` through ``weight.view(out, -1)``, which shares the
    weight's storage; a non-contiguous kernel cannot be viewed so and is refused by :meth:`check`.
    """

    name: str
    module: nn.Module
    flavour: str
    owner: nn.Module
    param_name: str
    transposed: bool = False
    _adapters: Callable[[], List[Adapter]] = field(default=lambda: [], repr=False)
    _check: Callable[[], None] = field(default=lambda: None, repr=False)
    _state: Callable[[], Optional[tuple]] = field(default=lambda: None, repr=False, compare=False)
    """The flavour's part of :meth:`state_key`: a tuple of plain values (ids, shapes, flags) that changes whenever
    :meth:`check` or :meth:`adapters` could answer differently; None where the flavour cannot say."""
    _held: Optional[Tuple[torch.Tensor, torch.Tensor, bool, Tuple[int, int]]] = field(default=None, init=False, repr=False, compare=False)
    """``(weight, rows, sharded, row_range)`` while :func:`held_views` holds them (see there)."""
    aliases: List[LoRATarget] = field(default_factory=list, repr=False, compare=False)
    """Other LoRA layers of the model whose base weight is this very tensor (tied weights): discovery takes the
    weight once, here, and lists them, so that the guards cover them too (``train()``)."""
    _pinned: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    """An FSDP2 weight's sharded parameter while its noise is in it: FSDP2 may register its unsharded copy in its place
    meanwhile (``set_reshard_after_backward(False)``), and the restore must reach the shard."""
    tied: List[Tuple[nn.Module, str, str]] = field(default_factory=list, repr=False, compare=False)
    """Every other place in the model that holds this very parameter, LoRA layer or not (a tied ``lm_head``):
    ``(module, attribute, qualified name)``. ``state_dict()`` while perturbed is made clean under those names too,
    and virtual mode refuses such a weight (it reroutes the target's product only)."""

    def layers(self) -> List[LoRATarget]:
        """This target and its :attr:`aliases`: every LoRA layer that computes with this weight."""
        return [self, *self.aliases]

    @property
    def weight(self) -> torch.Tensor:
        """The frozen weight parameter, as stored.

        When ``torch.nn.utils.parametrize`` is active on it (peft ``ParamWrapper`` registers one
        during its forward), this is the stored original, not the parametrised value.
        """
        if self._held is not None:
            return self._held[0]
        live = self.live_weight()
        if self._pinned is not None and live is not self._pinned and not is_dtensor(live):
            return self._pinned  # FSDP2 registered its unsharded copy meanwhile: the noise went into the shard
        return live

    def live_weight(self) -> torch.Tensor:
        """The parameter registered on the owner right now (see :attr:`weight`)."""
        # read nn.Module's registries directly: this runs several times per layer and step, and
        # ``getattr`` of a missing submodule goes through a raised and caught AttributeError
        parametrizations = self.owner._modules.get("parametrizations")
        if parametrizations is not None and self.param_name in parametrizations:
            return parametrizations[self.param_name].original
        parameter = self.owner._parameters.get(self.param_name)
        return parameter if parameter is not None else getattr(self.owner, self.param_name)

    def rows_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (laid out like the weight) as the ``m x n`` row view; a view, never a copy.

        For an FSDP2 (DTensor) weight this is this rank's rows (see :mod:`flatlora_optim.sharding`).
        """
        if type(tensor) is not nn.Parameter:  # (a plain parameter is no DTensor: skip the check, it runs every step)
            tensor = local(tensor)
        if self.transposed:
            return tensor.t()
        if tensor.dim() > 2:
            return tensor.view(tensor.shape[0], -1)
        return tensor

    def rows(self) -> torch.Tensor:
        """The weight as an ``m x n`` view (output rows x fan-in); writes go to the parameter."""
        if self._held is not None:
            return self._held[1]
        return self.rows_of(self.weight)

    def adapters(self) -> List[Adapter]:
        """The adapters that the module's forward adds to this weight right now."""
        return self._adapters()

    def state_key(self) -> Optional[tuple]:
        """A value that changes whenever :meth:`check`, :meth:`adapters`, :attr:`weight`, :meth:`rows` or
        :meth:`row_range` could give another answer: the weight parameter's identity and layout (``weight.data = ...``
        keeps the parameter but not its storage), and the flavour's state (active, disabled and merged adapters, the
        adapters' parameters and layouts, their scalings). None where it cannot be told cheaply (a flavour without
        one, a parametrised or FSDP2-sharded weight): such a target is read anew at every step.

        An id may be reused by a new object once the old one is freed; the key also holds the storage address, layout and
        type, compared by value. What :class:`~flatlora_optim.steady.SteadyReads` hands out again either holds its objects
        (the adapters' factors) or depends only on those values (the layer table's addresses; the weights are kept by weak
        reference and read anew once freed)."""
        flavour_state = self._state()
        if flavour_state is None or self._pinned is not None or "parametrizations" in self.owner._modules:
            return None
        weight = self.owner._parameters.get(self.param_name)
        if weight is None or (type(weight) is not nn.Parameter and is_dtensor(weight)):
            return None
        # the storage address stands for the device too: device and host allocations never share an address
        return (id(weight), weight.data_ptr(), weight.shape, weight.stride(), weight.dtype, flavour_state)

    def check(self) -> None:
        """Raise a ``ValueError`` if the target cannot be perturbed in its current state."""
        self._check()
        weight = self.weight
        if weight.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"Target {self.name!r} has a {weight.dtype} base weight (packed or quantized?); Flat-LoRA in-place mode "
                f"perturbs only {', '.join(str(d) for d in _FLOAT_DTYPES)} weights. Exclude it with targets=..."
            )
        if weight.dim() < 2 or (self.transposed and weight.dim() != 2):
            raise ValueError(f"Target {self.name!r} has a {weight.dim()}-D weight; this flavour expects a 2-D weight.")
        if weight.dim() > 2 and not weight.is_contiguous():
            raise ValueError(
                f"Target {self.name!r} has a non-contiguous {weight.dim()}-D weight: its rows cannot be viewed as "
                "out x fan-in without a copy (channels_last?). Call model.to(memory_format=torch.contiguous_format)."
            )
        if weight.device.type == "meta":
            raise ValueError(
                f"Target {self.name!r} has its weight on the meta device (offloaded or not yet materialised); "
                "load the model onto one device before wrapping it with FlatLoRA."
            )

    @property
    def shape(self) -> torch.Size:
        """``(m, n)``: output rows (held by this process) and fan-in."""
        return self.rows().shape

    @property
    def sharded(self) -> bool:
        """True for an FSDP2 (DTensor) weight: this process holds only some of its rows."""
        if self._held is not None:
            return self._held[2]
        return is_dtensor(self.weight)

    def row_range(self) -> Tuple[int, int]:
        """``(first global row held here, global number of rows)`` of the row view."""
        if self._held is not None:
            return self._held[3]
        if not self.sharded:
            return 0, self.rows().shape[0]
        return row_range(self.weight)  # FSDP2 shards dim 0: rows (transposed weights are refused)


def on_device_of(targets: Sequence[LoRATarget]) -> ContextManager[Any]:
    """Make the targets' CUDA device the current one for the block (see :mod:`flatlora_optim.devices`); the
    targets share one device (checked before)."""
    return made_current(targets[0].weight.device) if targets else contextlib.nullcontext()


class held_views:
    """Within the block, each target's weight, row view, sharding and row range are read once.

    A step reads these several times per layer (the row stds, the noise pass, the record: 14 weight
    lookups per layer on the 1 B Llama), and each read walks the owner's parameter and parametrization
    registries and builds a new view.
    Nothing that runs inside the block replaces a weight, so the values read on entry stay
    right; on exit the targets read live again. Nesting is allowed (the outer block holds).
    """

    def __init__(self, targets: Sequence[LoRATarget], reads: Any = None):
        self.targets = [t for t in targets if t._held is None]
        self.reads = reads if len(self.targets) == len(targets) else None  # a SteadyReads: the last step's values, while unchanged

    def __enter__(self) -> None:
        kept = self.reads.get("held") if self.reads is not None else None
        try:
            weights = [ref() for ref, _ in kept] if kept is not None else []
            if kept is not None and all(weight is not None for weight in weights):
                for target, weight, (_, ranges) in zip(self.targets, weights, kept):
                    target._held = (weight, target.rows_of(weight), False, ranges)  # a kept target is never sharded (no state key)
                return
            for target in self.targets:
                weight = target.weight
                sharded = is_dtensor(weight)
                rows = target.rows_of(weight)
                target._held = (weight, rows, sharded, row_range(weight) if sharded else (0, rows.shape[0]))
            if self.reads is not None and not any(target._held[2] for target in self.targets):
                # the weights by weak reference, their row views made again at each step: kept views or parameters would
                # hold storage the model let go of (model.to() moves a parameter's .data; a transposed view stays behind)
                self.reads.keep("held", [(weakref.ref(target._held[0]), target._held[3]) for target in self.targets])
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        with interrupts_deferred():  # a target left held would read stale values for good
            for target in self.targets:
                target._held = None


@dataclass(frozen=True)
class Flavour:
    """A LoRA implementation discovery knows: ``matches(module)`` and ``describe(name, module)``.

    ``explicit_only`` flavours (a plain ``nn.Linear`` without adapters) are used only for modules
    the user names in ``targets=``. A flavour with ``claims_submodules=False`` lets discovery
    look inside the matched module for further targets (nested peft ``ParamWrapper``).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    describe: Callable[[str, nn.Module], LoRATarget]
    explicit_only: bool = False
    claims_submodules: bool = True


_REGISTRY: List[Flavour] = []


def register_flavour(flavour: Flavour, *, first: bool = True) -> None:
    """Teach discovery a new LoRA layer type. ``first`` puts it before the built-in ones."""
    if first:
        _REGISTRY.insert(0, flavour)
    else:
        _REGISTRY.append(flavour)


# ---------------------------------------------------------------------------- custom layers


AdapterLike = Union[Adapter, Tuple[torch.Tensor, torch.Tensor, float]]


@dataclass
class LoRALayerInfo:
    """What a describe function returns for one custom LoRA layer (see :func:`register_lora_layer`).

    Attributes:
        weight: the frozen base weight: an ``nn.Parameter`` held by the layer or one of its
            submodules, or its dotted name inside the layer (``"base.weight"``).
        adapters: the low-rank updates the forward adds to the weight *now*, in row orientation:
            ``Adapter(name, A, B, scaling)`` or ``(A, B, scaling)`` tuples with ``A`` ``r x n``
            (fan-in ``n``) and ``B`` ``m x r`` (``m`` output rows). Empty when the adapters are
            disabled: the noise then follows ``W`` alone.
        transposed: the weight is stored ``n x m`` (``fan_in_fan_out``); rows are its columns.
        merged: the update is merged into the weight: perturbing would be wrong, so Flat-LoRA
            raises a ``ValueError`` asking to unmerge.
        problem: any other reason the layer cannot be perturbed now (raised as ``ValueError``).
    """

    weight: Union[torch.Tensor, str]
    adapters: Sequence[AdapterLike] = ()
    transposed: bool = False
    merged: bool = False
    problem: Optional[str] = None


def _locate_parameter(module: nn.Module, weight: Union[torch.Tensor, str]) -> Tuple[nn.Module, str]:
    if isinstance(weight, str):
        owner_path, _, param_name = weight.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if param_name not in owner._parameters:
            raise ValueError(f"{type(module).__name__} has no parameter {weight!r}.")
        return owner, param_name
    for _, sub in module.named_modules():
        for param_name, param in sub._parameters.items():
            if param is weight:
                return sub, param_name
    raise ValueError(
        f"The weight returned for {type(module).__name__} is not a parameter of that module or of its submodules; "
        "return the nn.Parameter itself (or its dotted name) so that Flat-LoRA can write into it."
    )


def _as_adapters(items: Sequence[AdapterLike]) -> List[Adapter]:
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Adapter):
            out.append(item)
        else:
            A, B, scaling = item
            out.append(Adapter(f"adapter{i}" if len(items) > 1 else "default", A, B, float(scaling)))
    return out


def register_lora_layer(
    cls: Union[type, Tuple[type, ...]],
    describe: Callable[[nn.Module], LoRALayerInfo],
    *,
    name: Optional[str] = None,
) -> Flavour:
    """Give your own LoRA module class Flat-LoRA, without patching the library.

    ``describe(module)`` returns a :class:`LoRALayerInfo`: the frozen weight, the adapters its
    forward adds right now in row orientation (``A``: ``r x fan_in``, ``B``: ``out x r``, scaling),
    whether the weight is stored transposed, and whether the update is merged. It is called once
    at discovery and again at every perturbation (so that disabling or switching adapters is seen).
    Instances of ``cls`` (subclasses included) are then found by discovery before the built-in
    flavours. Returns the registered :class:`Flavour`. Example in ``docs/flavours.md``.
    """
    flavour_name = name or (cls.__name__ if isinstance(cls, type) else "custom")

    def matches(module: nn.Module) -> bool:
        return isinstance(module, cls)

    def describe_target(module_name: str, module: nn.Module) -> LoRATarget:
        info = describe(module)
        owner, param_name = _locate_parameter(module, info.weight)

        def adapters() -> List[Adapter]:
            current = describe(module)
            return [] if current.merged else _as_adapters(current.adapters)

        def check() -> None:
            current = describe(module)
            if current.merged:
                raise ValueError(
                    f"The LoRA update of {module_name!r} ({type(module).__name__}) is merged into its base weight; unmerge it before training with Flat-LoRA."
                )
            if current.problem:
                raise ValueError(f"{module_name!r} ({type(module).__name__}): {current.problem}")

        return LoRATarget(module_name, module, flavour_name, owner, param_name, bool(info.transposed), adapters, check)

    flavour = Flavour(flavour_name, matches, describe_target)
    register_flavour(flavour)
    return flavour


# ---------------------------------------------------------------------------- packed weights

_PACKED_LAYER_NAMES = {
    "Linear4bit",
    "Linear8bitLt",
    "LinearNF4",
    "LinearFP4",
    "Params4bit",
    "QuantLinear",
    "TritonV2QuantLinear",
    "ExllamaQuantLinear",
    "ExllamaV2QuantLinear",
    "MarlinQuantLinear",
    "WQLinear_GEMM",
    "WQLinear_GEMV",
    "WQLinear_Exllama",
    "WQLinear_ExllamaV2",
    "HQQLinear",
    "HQQLinearLoRA",
    "EetqLinear",
    "QuantizedLinear",
    "QLinear",
    "AqlmLinear",
    "QuantizedLinearLayer",
    "FP8Linear",
}
_PACKED_TENSOR_NAMES = {
    "Params4bit",
    "Int8Params",
    "NF4Tensor",
    "AffineQuantizedTensor",
    "LinearActivationQuantizedTensor",
    "Float8Tensor",
    "QBytesTensor",
    "QTensor",
    "MarlinQBitsTensor",
}
_PACKED_PACKAGES = ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "eetq", "optimum.quanto", "aqlm", "torchao")


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's layers), told by name: its weight is stored inputs x
    outputs, the transpose of ``nn.Linear``'s (transformers need not be imported)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def packed_weight_reason(module: nn.Module) -> Optional[str]:
    """Why ``module``'s base weight is quantized/packed (so cannot take noise in place), or ``None``.

    Detection needs none of the quantization packages: the base layer's class name and package,
    a missing float ``weight`` next to a ``qweight``, the weight's tensor subclass, or a non-float
    dtype. The base layer is ``module.get_base_layer()`` when the module has one (peft).
    """
    base = module
    get_base = getattr(module, "get_base_layer", None)
    if callable(get_base):
        try:
            base = get_base()
        except Exception:  # pragma: no cover - a broken wrapper: let the flavour report it
            base = module
    cls = type(base)
    if cls.__name__ in _PACKED_LAYER_NAMES or cls.__module__.startswith(_PACKED_PACKAGES):
        return f"{cls.__name__} base layer"
    if getattr(module, "_quantize_base", False):  # torchtune quantize_base=True (NF4)
        return "quantize_base=True"
    weight = base._parameters.get("weight") if isinstance(base, nn.Module) else None
    if weight is None:
        if hasattr(base, "qweight"):
            return f"{cls.__name__} with packed qweight"
        return None
    tensor_cls = type(weight)
    if tensor_cls.__name__ in _PACKED_TENSOR_NAMES or hasattr(weight, "quant_state"):
        return f"{tensor_cls.__name__} weight"
    if weight.dtype not in _FLOAT_DTYPES:
        return f"{weight.dtype} weight"
    return None


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
    return (lambda name, module: id(module) in modules or any(_named_in(name, s) for s in suffixes)), modules


def _flavour_of(module: nn.Module, explicit: bool) -> Optional[Flavour]:
    for flavour in _REGISTRY:
        if flavour.explicit_only and not explicit:
            continue
        if flavour.matches(module):
            return flavour
    return None


def _unsupported_kind(module: nn.Module) -> Optional[str]:
    """A label when ``module`` is a LoRA layer of a kind no flavour handles (warned about, skipped)."""
    from .flavours import unsupported_kind

    return unsupported_kind(module)


def _searched() -> str:
    parts = ["peft LoRA Linear/Embedding/Conv/ParamWrapper" + ("" if "peft" in sys.modules else " [peft not imported]")]
    parts.append("loralib" + ("" if "loralib" in sys.modules else " [not imported]"))
    parts.append("torchtune LoRALinear/DoRALinear" + ("" if "torchtune" in sys.modules else " [not imported]"))
    parts.append("flatlora_optim.LoRALinear")
    custom = [f.name for f in _REGISTRY if f.name not in _BUILTIN_NAMES]
    if custom:
        parts.append("registered: " + ", ".join(custom))
    return ", ".join(parts)


def _find_tied(model: nn.Module, found: List[LoRATarget]) -> None:
    """Fill each target's ``tied``: the other modules of ``model`` holding its weight parameter itself."""
    by_weight = {id(t.weight): t for t in found}
    for module_name, module in model.named_modules():
        for attribute, parameter in module._parameters.items():
            target = by_weight.get(id(parameter)) if parameter is not None else None
            if target is not None and target.weight is parameter and not (module is target.owner and attribute == target.param_name):
                target.tied.append((module, attribute, f"{module_name}.{attribute}" if module_name else attribute))


def discover_targets(model: nn.Module, targets: TargetsLike = None) -> List[LoRATarget]:
    """Return the weights Flat-LoRA should perturb, in ``model.named_modules()`` order.

    With ``targets=None`` every LoRA-bearing module is taken. A regex string, a list of names
    or suffixes, or a callable ``(name, module) -> bool`` restricts the choice to the LoRA layers
    it selects; module objects in the list override it: they are taken even when they are a
    plain frozen ``nn.Linear`` (its noise is then scaled by its own row norms).

    LoRA layers whose base weight is quantized or packed (bitsandbytes, GPTQ, AWQ, NF4, any
    non-float weight) are skipped with one warning naming them; LoRA layers of kinds no flavour
    handles are skipped with one warning; a weight shared with an earlier target (tied weights)
    is taken once. Raises ``ValueError`` with what was searched for when nothing is found.
    """
    selector, explicit_modules = _selector(targets)
    found: List[LoRATarget] = []
    unsupported: Dict[str, List[str]] = {}
    packed: List[Tuple[str, str]] = []
    shared: List[Tuple[str, str]] = []
    empty: List[str] = []
    weights: Dict[int, LoRATarget] = {}
    claimed: List[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in claimed):
            continue  # the base layer inside a LoRA wrapper is described by the wrapper
        if selector is not None and not selector(name, module):
            continue
        flavour = _flavour_of(module, explicit=id(module) in explicit_modules)
        if flavour is None:
            kind = _unsupported_kind(module)
            if kind is not None:
                reason = packed_weight_reason(module)
                if reason is not None:
                    packed.append((name, reason))
                else:
                    unsupported.setdefault(kind, []).append(name)
                claimed.append(name)
            continue
        if flavour.claims_submodules:
            claimed.append(name)
        reason = packed_weight_reason(module)
        if reason is not None:
            packed.append((name, reason))
            continue
        target = flavour.describe(name, module)
        if target.weight.dtype not in _FLOAT_DTYPES:
            packed.append((name, f"{target.weight.dtype} weight"))
            continue
        if target.weight.numel() == 0:  # no element to perturb, and sigma / sqrt(fan-in) has no value at fan-in 0
            empty.append(name)
            continue
        first = weights.get(id(target.weight))
        if first is not None:
            shared.append((name, first.name))
            first.aliases.append(target)
            continue
        weights[id(target.weight)] = target
        found.append(target)
    _find_tied(model, found)
    if empty:
        message = f"Flat-LoRA skips LoRA layers with empty base weights (no element to perturb): {empty[:8]}."
        if not found:
            raise ValueError(message + " Nothing is left to perturb.")
        warnings.warn(message, stacklevel=3)
    if packed:
        listed = ", ".join(f"{n!r} ({why})" for n, why in packed[:8]) + (f" and {len(packed) - 8} more" if len(packed) > 8 else "")
        message = (
            f"Flat-LoRA skips {len(packed)} LoRA layer(s) whose base weights are quantized or packed: {listed}. "
            "In-place mode cannot add noise to packed weights; their adapters train without Flat-LoRA noise."
        )
        if not found:
            raise ValueError(message.replace("skips", "found only") + " Nothing is left to perturb.")
        warnings.warn(message, stacklevel=3)
    if shared:
        listed = ", ".join(f"{n!r} (same weight as {f!r})" for n, f in shared)
        warnings.warn(f"Flat-LoRA perturbs a shared (tied) weight once: skipped {listed}.", stacklevel=3)
    if unsupported and not found:
        kinds = ", ".join(f"{k} ({len(v)}, e.g. {v[0]!r})" for k, v in unsupported.items())
        raise ValueError(f"Found only LoRA layer kinds Flat-LoRA does not support yet: {kinds}. See docs/flavours.md.")
    if unsupported:
        kinds = ", ".join(f"{k} x{len(v)}" for k, v in unsupported.items())
        warnings.warn(f"Flat-LoRA skips LoRA layers of unsupported kinds: {kinds}; their base weights are not perturbed.", stacklevel=3)
    if not found:
        searched = _searched()
        if selector is not None:
            raise ValueError(
                f"targets={targets!r} selected no LoRA layer (nor a plain nn.Linear) in {type(model).__name__}: searched "
                f"{sum(1 for _ in model.named_modules())} modules for {searched}. Check the names against model.named_modules()."
            )
        raise ValueError(
            f"No LoRA layers found in {type(model).__name__}: searched {sum(1 for _ in model.named_modules())} modules for "
            f"{searched}. Add adapters first (peft.get_peft_model(...) or flatlora_optim.inject_lora(model, [...], r=8, alpha=16)), "
            "register your own layer with flatlora_optim.register_lora_layer(cls, describe), "
            "or pass frozen Linear modules to perturb with targets=[module, ...]."
        )
    _warn_unmatched_names(targets, [t.name for t in found] + [a.name for t in found for a in t.aliases] + empty
                          + [n for n, _ in packed] + [n for names in unsupported.values() for n in names])
    check_shared_memory(found)
    return found


def _named_in(name: str, entry: str) -> bool:
    """Whether a ``targets=`` list entry names module ``name``: the whole name, or its last components."""
    return name == entry or name.endswith("." + entry)


def _warn_unmatched_names(targets: TargetsLike, selected: List[str]) -> None:
    """Warn about the names in a ``targets=`` list that selected no LoRA layer (a misspelt ``"v_prj"`` would otherwise
    leave its layers without noise, silently, as long as another entry matches something)."""
    if targets is None or isinstance(targets, (str, nn.Module)) or callable(targets):
        return
    unmatched = [entry for entry in targets if isinstance(entry, str) and not any(_named_in(n, entry) for n in selected)]
    if unmatched:
        warnings.warn(
            f"targets entries {unmatched} selected no LoRA layer (misspelt, or naming modules without adapters; a module "
            f"without adapters is perturbed when passed as the module object itself). Selected: {selected[:6]}"
            f"{' ...' if len(selected) > 6 else ''}.",
            stacklevel=4,
        )


from .flavours import BUILTIN_NAMES as _BUILTIN_NAMES  # noqa: E402  (registers the built-in flavours)
