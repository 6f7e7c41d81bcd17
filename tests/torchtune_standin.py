"""A faithful local stand-in for torchtune 0.6.1's ``LoRALinear`` and ``DoRALinear``.

torchtune 0.6.1 installs here only with an older torchao (0.11) and ~20 extra packages, and an
installed torchao changes what ``import peft`` does; so the tests use this stand-in when
``torchtune`` is not importable. It reproduces what Flat-LoRA reads and what the forward computes
(``torchtune/modules/peft/lora.py`` and ``dora.py`` of torchtune 0.6.1, without NF4 quantization):
parameters ``weight`` (out x in, *not* frozen by the layer), ``bias``, ``lora_a``/``lora_b``
(``nn.Linear``), ``disabled``; ``LoRALinear`` has ``rank``/``alpha`` and no ``scaling``,
``DoRALinear`` has ``scaling`` and ``magnitude``. It was checked against the real classes
(same parameter names and shapes, same outputs, same discovered targets and noise) with
torchtune 0.6.1 + torchao 0.11.0 in an isolated directory.
"""

from __future__ import annotations

import math
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha, dropout=0.0, use_bias=False, quantize_base=False):
        super().__init__()
        self.in_dim, self.out_dim, self.rank, self.alpha, self.use_bias = in_dim, out_dim, rank, alpha, use_bias
        self._quantize_base = quantize_base
        linear = nn.Linear(in_dim, out_dim, bias=use_bias)
        self.disabled = False
        self.register_parameter("weight", nn.Parameter(linear.weight))
        self.register_parameter("bias", nn.Parameter(linear.bias) if use_bias else None)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        lora_out = self.lora_a(self.dropout(x))
        lora_out = (self.alpha / self.rank) * self.lora_b(lora_out)
        return out + lora_out


class DoRALinear(nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha, dropout=0.0, use_bias=False, quantize_base=False):
        super().__init__()
        self.in_dim, self.out_dim, self.scaling, self.use_bias = in_dim, out_dim, alpha / rank, use_bias
        self._quantize_base = quantize_base
        linear = nn.Linear(in_dim, out_dim, bias=use_bias)
        self.disabled = False
        self.register_parameter("weight", nn.Parameter(linear.weight))
        self.register_parameter("bias", nn.Parameter(linear.bias) if use_bias else None)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.magnitude = nn.Parameter(torch.empty(out_dim))
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    @torch.no_grad()
    def initialize_dora_magnitude(self):
        base_weight = self.weight.to(self.lora_a.weight.dtype)
        lora_weight = self.lora_b.weight @ self.lora_a.weight
        self.magnitude.copy_(self._get_weight_norm(base_weight, lora_weight))

    def _get_weight_norm(self, weight, lora_weight):
        weight = weight + self.scaling * lora_weight
        return torch.linalg.norm(weight, dim=1).to(weight.dtype)

    def forward(self, x):
        base_out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return base_out
        x = self.dropout(x)
        lora_out = self.lora_b(self.lora_a(x))
        x_eye = torch.eye(self.lora_a.weight.shape[1], device=self.lora_a.weight.device, dtype=x.dtype)
        lora_weight = self.lora_b(self.lora_a(x_eye)).T
        weight_norm = self._get_weight_norm(self.weight.to(x.dtype), lora_weight.detach()).detach()
        mag_norm_scale = (self.magnitude / weight_norm).view(1, -1)
        dora_out = (mag_norm_scale - 1) * base_out + mag_norm_scale * lora_out * self.scaling
        return dora_out + base_out


def torchtune_classes(monkeypatch):
    """``(LoRALinear, DoRALinear, is_real)``: the real torchtune classes when importable, else the
    stand-in, installed under torchtune's module paths in ``sys.modules`` for the test's duration."""
    try:
        from torchtune.modules.peft import DoRALinear as RealDoRA
        from torchtune.modules.peft import LoRALinear as RealLoRA

        return RealLoRA, RealDoRA, True
    except Exception:
        pass
    lora = types.ModuleType("torchtune.modules.peft.lora")
    dora = types.ModuleType("torchtune.modules.peft.dora")
    lora.LoRALinear, dora.DoRALinear = LoRALinear, DoRALinear
    monkeypatch.setitem(sys.modules, "torchtune", types.ModuleType("torchtune"))
    monkeypatch.setitem(sys.modules, "torchtune.modules.peft.lora", lora)
    monkeypatch.setitem(sys.modules, "torchtune.modules.peft.dora", dora)
    return LoRALinear, DoRALinear, False
