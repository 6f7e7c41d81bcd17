"""loralib (microsoft/LoRA): ``Linear``, ``Embedding``, ``MergedLinear``, ``Conv1d/2d/3d``.

loralib layers hold one adapter (``lora_A``, ``lora_B``, ``scaling = alpha / r``) and no
disable switch. Their ``eval()`` merges the update into the weight (``merge_weights=True``) and
``train()`` subtracts it again: a merged layer is refused (call ``model.train()``), and while the
weights are perturbed a mode change is caught by Flat-LoRA's guards.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional

import torch
from torch import nn

from ..targets import Adapter, Flavour, LoRATarget, register_flavour

NAMES = frozenset({"loralib", "loralib-embedding", "loralib-merged", "loralib-conv"})


def _cls(name: str) -> Optional[type]:
    layers = sys.modules.get("loralib.layers")
    return getattr(layers, name, None) if layers is not None else None


def _has_adapter(module: nn.Module) -> bool:
    return getattr(module, "r", 0) > 0 and isinstance(getattr(module, "lora_A", None), torch.Tensor)


def _matcher(class_name: str) -> Callable[[nn.Module], bool]:
    def matches(module: nn.Module) -> bool:
        cls = _cls(class_name)
        return cls is not None and isinstance(module, cls) and _has_adapter(module)

    return matches


def _target(
    name: str,
    module: nn.Module,
    flavour: str,
    owner: nn.Module,
    transposed: bool,
    factors: Callable[[], Adapter],
    extra_check: Optional[Callable[[], None]] = None,
) -> LoRATarget:
    def adapters() -> List[Adapter]:
        return [] if module.merged else [factors()]

    def check() -> None:
        if module.merged:
            raise ValueError(
                f"loralib layer {name!r} has its update merged into the weight (loralib merges on model.eval()); call "
                "model.train() before training with Flat-LoRA."
            )
        if extra_check is not None:
            extra_check()

    return LoRATarget(name, module, flavour, owner, "weight", transposed, adapters, check)


def _describe_linear(name: str, module: nn.Module) -> LoRATarget:
    # weight out x in (or in x out with fan_in_fan_out); lora_A r x in, lora_B out x r.
    def factors() -> Adapter:
        return Adapter("default", module.lora_A, module.lora_B, float(module.scaling))

    return _target(name, module, "loralib", module, bool(module.fan_in_fan_out), factors)


def _describe_embedding(name: str, module: nn.Module) -> LoRATarget:
    # weight V x d; lora_A r x V, lora_B d x r; delta = (B @ A)^T * s: rows = embedding dims (see docs).
    def factors() -> Adapter:
        return Adapter("default", module.lora_A, module.lora_B, float(module.scaling))

    return _target(name, module, "loralib-embedding", module, True, factors)


def _describe_merged(name: str, module: nn.Module) -> LoRATarget:
    # lora_A is (r*k) x in, lora_B (out/len * k) x r for the k enabled groups; group g's rows of the
    # delta are B_g @ A_g, scattered to the enabled output rows (lora_ind). In the row view that is
    # one adapter: A (r*k x in) and a block-structured B (out x r*k), zero outside enabled rows.
    def factors() -> Adapter:
        r = module.r
        k = sum(module.enable_lora)
        with torch.no_grad():
            B = module.lora_B.detach()
            per_group = B.shape[0] // k
            rows = module.lora_ind.nonzero().flatten()
            full = B.new_zeros(module.lora_ind.numel(), r * k)
            for g in range(k):
                full[rows[g * per_group : (g + 1) * per_group], g * r : (g + 1) * r] = B[g * per_group : (g + 1) * per_group]
        return Adapter("default", module.lora_A, full, float(module.scaling))

    return _target(name, module, "loralib-merged", module, bool(module.fan_in_fan_out), factors)


def _conv_factorisation(module: nn.Module):
    """``(j, why_not)``: each output row of ``(B @ A).view(W.shape)`` is ``j`` consecutive rows of ``B @ A``."""
    weight = module.conv.weight
    out = weight.shape[0]
    row_len = weight[0].numel()
    P, M = module.lora_B.shape[0], module.lora_A.shape[1]
    if module.conv.groups != 1:
        return 0, f"groups={module.conv.groups}: loralib reshapes B @ A across output channels, so the update does not factor per filter"
    if P * M != weight.numel() or row_len % M or P != out * (row_len // M):
        return 0, f"lora_B @ lora_A is {P} x {M}, which does not reshape to the kernel {tuple(weight.shape)} row by row"
    return row_len // M, None


def _describe_conv(name: str, module: nn.Module) -> LoRATarget:
    # loralib: W + (B @ A).view(W.shape) * s, with B (out*k) x (r*k), A (r*k) x (in*k). Row o of the
    # flattened kernel is j = k consecutive rows of B @ A laid end to end, so in the row view
    # W.view(out, in*k*k) the update is B.view(out, j*r*k) @ blockdiag(A, ..., A) (j copies).
    def factors() -> Adapter:
        j, _ = _conv_factorisation(module)
        A = module.lora_A.detach()
        A_rows = torch.block_diag(*([A] * j)) if j > 1 else A
        return Adapter("default", A_rows, module.lora_B.detach().reshape(module.conv.weight.shape[0], -1), float(module.scaling))

    def extra_check() -> None:
        _, why = _conv_factorisation(module)
        if why is not None:
            raise ValueError(f"loralib conv layer {name!r} cannot be perturbed filter-wise: {why}. Exclude it with targets=... .")

    return _target(name, module, "loralib-conv", module.conv, False, factors, extra_check)


def _conv_matches(module: nn.Module) -> bool:
    cls = _cls("ConvLoRA")
    return cls is not None and isinstance(module, cls) and _has_adapter(module)


register_flavour(Flavour("loralib-conv", _conv_matches, _describe_conv))
register_flavour(Flavour("loralib-merged", _matcher("MergedLinear"), _describe_merged))
register_flavour(Flavour("loralib-embedding", _matcher("Embedding"), _describe_embedding))
register_flavour(Flavour("loralib", _matcher("Linear"), _describe_linear))


def unsupported_kind(module: nn.Module) -> Optional[str]:
    base = _cls("LoRALayer")
    if base is not None and isinstance(module, base) and _has_adapter(module):
        return f"loralib.{type(module).__name__}"
    return None
