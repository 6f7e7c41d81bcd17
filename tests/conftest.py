"""Shared fixtures: tiny LoRA models built in code (no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatlora_optim import inject_lora, lora_parameters

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float64: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (so that NaN payloads and -0.0 compare exactly)."""
    return t.detach().contiguous().view(INT_VIEW[t.dtype]).clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float32, width: int = 32, bias: bool = True, r: int = 4) -> nn.Module:
    """A 3-layer MLP with LoRALinear on every Linear; B is random so W + sBA != W."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, width, bias=bias), nn.Tanh(), nn.Linear(width, width, bias=bias), nn.Tanh(), nn.Linear(width, 5, bias=bias))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    inject_lora(model, ["0", "2", "4"], r=r, alpha=2 * r)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.to(dtype)


def frozen_weights(model: nn.Module) -> dict:
    return {n: bits(p) for n, p in model.named_parameters() if not p.requires_grad}


def assert_frozen_unchanged(model: nn.Module, before: dict) -> None:
    after = frozen_weights(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed"


def batch(seed: int = 0, n: int = 16, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=gen).to(dtype), torch.randint(0, 5, (n,), generator=gen)


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
