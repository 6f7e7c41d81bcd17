"""This package's own ``LoRALinear`` and a plain frozen ``nn.Linear`` named in ``targets=``."""

from __future__ import annotations

from typing import List

from torch import nn

from ..targets import Adapter, Flavour, LoRATarget, register_flavour

NAMES = frozenset({"flatlora", "plain"})


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
    from ..lora import LoRALinear

    return isinstance(module, LoRALinear)


def _is_plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def _describe_plain_linear(name: str, module: nn.Module) -> LoRATarget:
    return LoRATarget(name, module, "plain", module, "weight", False)


register_flavour(Flavour("plain", _is_plain_linear, _describe_plain_linear, explicit_only=True))
register_flavour(Flavour("flatlora", _is_flatlora, _describe_flatlora))
