"""torchtune: ``LoRALinear`` (and its ``QATLoRALinear`` subclass) and ``DoRALinear``.

The layer holds the weight itself (``out x in``), ``lora_a`` (``r x in``) and ``lora_b``
(``out x r``) as ``nn.Linear``; ``LoRALinear`` has no ``scaling`` attribute (its forward uses
``alpha / rank``), ``DoRALinear`` has one. ``disabled=True`` counts no adapter. torchtune does
not freeze the base weight: do it yourself (``torchtune.modules.peft.set_trainable_params``),
otherwise FlatLoRA warns. ``quantize_base=True`` (NF4) is skipped as a packed weight.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from torch import nn

from ..targets import Adapter, Flavour, LoRATarget, register_flavour

NAMES = frozenset({"torchtune", "torchtune-dora"})


def _cls(module_name: str, class_name: str) -> Optional[type]:
    if "torchtune" not in sys.modules:
        return None
    return getattr(sys.modules.get(module_name), class_name, None)


def _is_lora(module: nn.Module) -> bool:
    cls = _cls("torchtune.modules.peft.lora", "LoRALinear")
    return cls is not None and isinstance(module, cls)


def _is_dora(module: nn.Module) -> bool:
    cls = _cls("torchtune.modules.peft.dora", "DoRALinear")
    return cls is not None and isinstance(module, cls)


def scaling_of(module: nn.Module) -> float:
    """``module.scaling`` when present (DoRALinear), else ``alpha / rank`` as LoRALinear's forward computes it."""
    scaling = getattr(module, "scaling", None)
    if scaling is None:
        scaling = module.alpha / module.rank
    return float(scaling)


def _describe(flavour: str):
    def describe(name: str, module: nn.Module) -> LoRATarget:
        def adapters() -> List[Adapter]:
            if module.disabled or getattr(module, "merged", False):
                return []
            return [Adapter("default", module.lora_a.weight, module.lora_b.weight, scaling_of(module))]

        def check() -> None:
            if getattr(module, "merged", False):
                raise ValueError(f"torchtune layer {name!r} is marked merged; unmerge it before training with Flat-LoRA.")

        return LoRATarget(name, module, flavour, module, "weight", False, adapters, check)

    return describe


register_flavour(Flavour("torchtune-dora", _is_dora, _describe("torchtune-dora")))
register_flavour(Flavour("torchtune", _is_lora, _describe("torchtune")))
