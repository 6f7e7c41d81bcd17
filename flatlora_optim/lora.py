"""A small LoRA layer for users without peft, and helpers to add it to a model.

``LoRALinear`` computes ``y = x W^T + b + scaling * (dropout(x) A^T) B^T`` with ``W`` and ``b``
frozen, ``A`` (``r x in``) initialised like peft (Kaiming-uniform) and ``B`` (``out x r``) zero,
so a freshly injected model computes exactly what it computed before.
"""

from __future__ import annotations

import math
import re
from typing import Iterator, List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear", "inject_lora", "lora_parameters"]


class LoRALinear(nn.Module):
    """``nn.Linear`` plus a trainable low-rank update ``(alpha / r) * B @ A``.

    Args:
        base: the linear layer to adapt; its ``weight`` and ``bias`` parameters are reused
            (not copied) and frozen.
        r: adapter rank (> 0).
        alpha: scaling numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout probability applied to the adapter's input.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}.")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"Invalid LoRA rank r={r!r}: expected a positive int.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Invalid dropout {dropout!r}: expected a probability in [0, 1).")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.alpha / r
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen product ``x W^T + b`` (virtual mode reroutes this method while perturbed)."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if self.merged:
            return result
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return result + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``, the update in the weight's shape."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into ``weight`` (for inference); ``unmerge`` takes it out again."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged update from ``weight`` (not bitwise exact in floating point)."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _matches(name: str, target_modules: Union[str, Sequence[str]]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject_lora(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]],
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    freeze_base: bool = True,
) -> nn.Module:
    """Replace the matching ``nn.Linear`` submodules of ``model`` by :class:`LoRALinear`, in place.

    ``target_modules`` follows peft: a list matches module names or their last components
    (``["q_proj", "v_proj"]``), a single string is a regular expression matched against the whole
    qualified name. With ``freeze_base`` every parameter that is not a LoRA ``A``/``B`` is frozen.
    Returns ``model``. Raises ``ValueError`` if nothing matched.
    """
    replaced: List[str] = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not _matches(name, target_modules):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, r=r, alpha=alpha, dropout=dropout))
        replaced.append(name)
    if not replaced:
        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        raise ValueError(f"inject_lora: target_modules={target_modules!r} matched no nn.Linear; the model's Linear layers are {linears[:20]}.")
    if freeze_base:
        lora_ids = {id(p) for p in lora_parameters(model)}
        for p in model.parameters():
            if id(p) not in lora_ids:
                p.requires_grad_(False)
    return model


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable adapter parameters of every :class:`LoRALinear` in ``model``."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            yield module.lora_A
            yield module.lora_B
