"""peft LoRA layers: ``Linear`` (incl. GPT-2 ``Conv1D``), ``Embedding``, ``Conv1d/2d/3d``, ``ParamWrapper``.

Common to all: the adapters counted are the active ones (``set_adapter([...])``) that exist on
the layer, none while adapters are disabled (``with model.disable_adapter():``); rsLoRA needs
nothing special (peft's ``scaling[a]`` is already ``alpha/sqrt(r)``); merged adapters and LoRA
variants other than DoRA and MiCA are refused with a ``ValueError`` at construction and before
every perturbation. DoRA: the noise goes into ``W`` with row stds from ``||W + sBA||`` (peft's
own ``lora_B.weight @ lora_A.weight`` in the same orientation), the magnitude vector is not
touched; DoRA's forward then renormalises ``W + e + sBA`` by its (perturbed) row norm.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..targets import Adapter, Flavour, LoRATarget, is_conv1d, register_flavour

NAMES = frozenset({"peft", "peft-embedding", "peft-conv", "peft-param"})

# Variants whose forward adds scaling * B @ A to the weight (DoRA renormalises that sum per row).
_SUPPORTED_VARIANTS = {
    "DoraLinearVariant",
    "DoraEmbeddingVariant",
    "DoraConv1dVariant",
    "DoraConv2dVariant",
    "DoraConv3dVariant",
    "MiCALinearVariant",
    "MiCAEmbeddingVariant",
}


def _peft_classes() -> Dict[str, type]:
    # peft is optional: a model built with peft has imported it, so there is nothing to import
    # (and nothing to pay) when it is absent from sys.modules.
    if "peft" not in sys.modules:
        return {}
    try:
        from peft.tuners.lora import layer
    except ImportError:  # pragma: no cover - a peft without the LoRA tuner
        return {}
    names = ("LoraLayer", "Linear", "Embedding", "_ConvNd", "ParamWrapper")
    return {n: getattr(layer, n) for n in names if hasattr(layer, n)}


def _isinstance(module: nn.Module, class_name: str) -> bool:
    cls = _peft_classes().get(class_name)
    return cls is not None and isinstance(module, cls)


def variant_label(module: nn.Module, adapter: str) -> Optional[str]:
    """``"DoRA"``, ``"MiCA"``, another variant's class name, or ``None`` for plain LoRA."""
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is None:
        return "DoRA" if getattr(module, "use_dora", {}).get(adapter, False) else None
    name = type(variant).__name__
    if name.startswith("Dora"):
        return "DoRA"
    if name.startswith("MiCA"):
        return "MiCA"
    return name


def _peft_target(
    name: str,
    module: nn.Module,
    flavour: str,
    owner: nn.Module,
    param_name: str,
    transposed: bool,
    factors: Callable[[str], Adapter],
    adapter_dict: nn.Module,
    extra_check: Optional[Callable[[], None]] = None,
    factors_state: Optional[Callable[[str], Optional[tuple]]] = None,
) -> LoRATarget:
    def active() -> List[str]:
        if module.disable_adapters:
            return []
        return [a for a in module.active_adapters if a in adapter_dict]

    def adapters() -> List[Adapter]:
        if module.merged:
            return []
        return [factors(a) for a in active()]

    def check() -> None:
        if module.merged:
            raise ValueError(
                f"peft adapter(s) {module.merged_adapters} of {name!r} are merged into the base weight; the LoRA "
                "parameters get no gradient while merged. Call model.unmerge_adapter() (or layer.unmerge()) before training; "
                "after merge_and_unload(), which takes the adapters out of the model, build a new optimizer and FlatLoRA for "
                "the model it returned."
            )
        for a in active():
            label = variant_label(module, a)
            if label is not None and label not in ("DoRA", "MiCA"):
                raise ValueError(
                    f"Adapter {a!r} of {name!r} is the LoRA variant {label}, whose forward is not W + sBA; Flat-LoRA "
                    "supports plain LoRA, rsLoRA, DoRA and MiCA. Exclude this layer with targets=... ."
                )
        if extra_check is not None:
            extra_check()

    def state() -> Optional[tuple]:
        """What ``check()`` and ``adapters()`` read, as plain values (see ``LoRATarget.state_key``): peft's flags from the
        layer's instance dict (a peft without them: None, read anew each step), and each active adapter's factors."""
        if factors_state is None or extra_check is not None:
            return None
        flags = module.__dict__
        active, disabled, merged = flags.get("_active_adapter"), flags.get("_disable_adapters"), flags.get("merged_adapters")
        if not isinstance(disabled, bool) or not isinstance(merged, list) or not isinstance(active, (str, list)):
            return None
        names = (active,) if isinstance(active, str) else tuple(active)
        variants, dora = flags.get("lora_variant", {}), flags.get("use_dora", {})
        factors_now = []
        for a in names:
            if a in adapter_dict._modules:
                factors = factors_state(a)
                if factors is None:
                    return None
                factors_now.append((a, factors, type(variants.get(a)), dora.get(a)))
        return (disabled, tuple(merged), names, *factors_now)

    return LoRATarget(name, module, flavour, owner, param_name, transposed, adapters, check, state)


# ---------------------------------------------------------------------------- Linear


def _weight_of(layers: nn.Module, adapter: str) -> torch.Tensor:
    """``layers[adapter].weight``, read from the module registries: this runs for every layer at every step, and
    ``getattr`` of a submodule or parameter goes through ``nn.Module.__getattr__``'s slow path. A parametrised
    weight (``torch.nn.utils.parametrize``) is not a plain parameter and is read through ``getattr``."""
    layer = layers._modules[adapter]
    weight = layer._parameters.get("weight")
    return weight if weight is not None else layer.weight


def _linear_factors(module: nn.Module) -> Callable[[str], Adapter]:
    """``A`` (``r x n``) and ``B`` (``m x r``) of a peft Linear-like layer's adapter, with its scaling."""
    lora_A, lora_B = module.lora_A, module.lora_B  # peft adds and deletes adapters inside these two dicts

    def factors(a: str) -> Adapter:
        return Adapter(a, _weight_of(lora_A, a), _weight_of(lora_B, a), float(module.scaling[a]))

    return factors


def _linear_factors_state(module: nn.Module) -> Callable[[str], Optional[tuple]]:
    """What :func:`_linear_factors` reads for an adapter, as plain values (see ``LoRATarget.state_key``): each factor's
    identity and layout (the storage address stands for the device), and the scaling; None for a parametrised factor."""
    lora_A, lora_B = module.lora_A, module.lora_B
    flags = module.__dict__

    def state(a: str) -> Optional[tuple]:
        A = lora_A._modules[a]._parameters.get("weight")
        B = lora_B._modules[a]._parameters.get("weight")
        scaling = flags.get("scaling", {}).get(a)
        if A is None or B is None or scaling is None:
            return None
        # the scaling's value, as the factors read it (a tensor scaling may change in place: peft's scale_layer)
        return (id(A), A.data_ptr(), A.shape, A.stride(), A.dtype, id(B), B.data_ptr(), B.shape, B.stride(), B.dtype, float(scaling))

    return state


def _describe_linear(name: str, module: nn.Module) -> LoRATarget:
    transposed = bool(getattr(module, "fan_in_fan_out", False))
    return _peft_target(name, module, "peft", module.get_base_layer(), "weight", transposed, _linear_factors(module), module.lora_A,
                        factors_state=_linear_factors_state(module))


# ---------------------------------------------------------------------------- Embedding


def _describe_embedding(name: str, module: nn.Module) -> LoRATarget:
    # The stored weight is num_embeddings x embedding_dim. As a Linear on one-hot inputs it is
    # embedding_dim x num_embeddings: rows = embedding dimensions, fan-in = vocabulary. peft's
    # own factors are in that orientation (lora_embedding_A: r x V, lora_embedding_B: d x r;
    # get_delta_weight = (B @ A)^T * s), and so is DoRA's magnitude (one per embedding dim).
    def factors(a: str) -> Adapter:
        return Adapter(a, module.lora_embedding_A[a], module.lora_embedding_B[a], float(module.scaling[a]))

    return _peft_target(name, module, "peft-embedding", module.get_base_layer(), "weight", True, factors, module.lora_embedding_A)


# ---------------------------------------------------------------------------- Conv


def _describe_conv(name: str, module: nn.Module) -> LoRATarget:
    # lora_A is a conv with the base's kernel (r x in x k...), lora_B a 1x1 conv (out x r x 1...):
    # B(A(x)) is the conv with kernel sum_j B[o, j] A[j] = (B.view(out, r) @ A.view(r, -1)).view(W.shape),
    # so in the row view W.view(out, in*k) the update is B.view(out, r) @ A.view(r, in*k).
    base = module.get_base_layer()

    def factors(a: str) -> Adapter:
        A = module.lora_A[a].weight
        B = module.lora_B[a].weight
        return Adapter(a, A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1), float(module.scaling[a]))

    def extra_check() -> None:
        if base.groups > 1:
            raise ValueError(
                f"{name!r} is a grouped convolution (groups={base.groups}) with LoRA: peft's lora_A mixes all "
                f"{base.in_channels} input channels while the base kernel sees in_channels/groups of them, so W + sBA "
                "is not a grouped kernel and the filter-wise noise of the paper is not defined on W. Exclude the layer "
                "with targets=... ."
            )

    return _peft_target(name, module, "peft-conv", base, "weight", False, factors, module.lora_A, extra_check)


# ---------------------------------------------------------------------------- ParamWrapper


def _param_2d(module: nn.Module) -> bool:
    try:
        return module.get_param().dim() == 2 and getattr(module, "num_experts", 1) == 1
    except Exception:  # pragma: no cover
        return False


def _describe_param(name: str, module: nn.Module) -> LoRATarget:
    # target_parameters: the parameter itself (out x in, as nn.Linear) with the adapters of Linear.
    base = module.get_base_layer()
    if is_conv1d(base):
        raise ValueError(
            f"{name!r} adapts a transformers Conv1D weight through target_parameters: that weight is stored inputs x "
            "outputs, so its rows are input units and the paper's per-output-unit noise would go along the wrong axis. "
            "Adapt the layer with target_modules=[...] (peft sets fan_in_fan_out=True for Conv1D), which Flat-LoRA handles."
        )
    return _peft_target(name, module, "peft-param", base, module.parameter_name, False, _linear_factors(module), module.lora_A,
                        factors_state=_linear_factors_state(module))


def _matcher(class_name: str, extra: Optional[Callable[[nn.Module], bool]] = None) -> Callable[[nn.Module], bool]:
    def matches(module: nn.Module) -> bool:
        return _isinstance(module, class_name) and (extra is None or extra(module))

    return matches


register_flavour(Flavour("peft-param", _matcher("ParamWrapper", _param_2d), _describe_param, claims_submodules=False))
register_flavour(Flavour("peft-conv", _matcher("_ConvNd"), _describe_conv))
register_flavour(Flavour("peft-embedding", _matcher("Embedding"), _describe_embedding))
register_flavour(Flavour("peft", _matcher("Linear"), _describe_linear))


def unsupported_kind(module: nn.Module) -> Optional[str]:
    if not _isinstance(module, "LoraLayer"):
        return None
    if _isinstance(module, "ParamWrapper"):
        return "ParamWrapper (3-D expert weights)"
    return type(module).__name__
