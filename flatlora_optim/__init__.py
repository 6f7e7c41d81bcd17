"""flatlora_optim: Flat-LoRA as a drop-in wrapper around any LoRA optimizer.

Flat-LoRA (Li et al., ICML 2025) trains LoRA adapters against the expected loss under random
per-row noise on the full weight ``W + sBA``. This package adds that noise to the frozen base
weights inside ``with opt.perturbed():`` and restores them bitwise exactly, without touching the
global RNG. See ``docs/user-guide.md``.
"""

from .claims import restore_weights
from .describe import describe_targets, format_targets
from .lora import LoRALinear, inject_lora, lora_parameters
from .optimizer import FlatLoRA
from .schedule import NoiseSchedule
from .targets import Adapter, Flavour, LoRALayerInfo, LoRATarget, discover_targets, register_flavour, register_lora_layer

__all__ = [
    "FlatLoRA",
    "NoiseSchedule",
    "LoRALinear",
    "inject_lora",
    "lora_parameters",
    "discover_targets",
    "register_flavour",
    "register_lora_layer",
    "LoRALayerInfo",
    "describe_targets",
    "format_targets",
    "Flavour",
    "LoRATarget",
    "Adapter",
    "restore_weights",
]

__version__ = "0.1.0"
