"""A real bitsandbytes 4-bit base layer (CPU): skipped with one warning naming it, never written, training runs."""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
from conftest import bits
from torch import nn

from flatlora_optim import FlatLoRA


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    quantized = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    quantized.weight = bnb.nn.Params4bit(model[0].weight.data.clone(), requires_grad=False, quant_type="nf4")
    quantized.bias = model[0].bias
    model[0] = quantized.to("cpu")  # quantises (packs) the weight
    return peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))


def test_real_bnb_4bit_layer_is_skipped_with_one_warning_and_left_untouched():
    model = _model()
    packed = model.base_model.model[0].base_layer.weight
    assert packed.dtype == torch.uint8  # really packed
    before = bits(model.base_model.model[2].base_layer.weight)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = FlatLoRA(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), model, rho=0.1, schedule="constant")
    messages = [str(w.message) for w in caught if "quantized or packed" in str(w.message)]
    assert len(messages) == 1 and "base_model.model.0" in messages[0] and "Linear4bit" in messages[0]
    assert [t.name for t in opt.targets] == ["base_model.model.2"]
    packed_before = packed.detach().clone()
    x = torch.randn(3, 64)
    with opt.perturbed():
        assert not torch.equal(bits(model.base_model.model[2].base_layer.weight), before)  # the float layer is perturbed
        loss = model(x).square().mean()
    loss.backward()
    opt.step()
    assert torch.equal(packed.detach(), packed_before)
    assert torch.equal(bits(model.base_model.model[2].base_layer.weight), before)


def test_only_quantized_layers_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match="only 1 LoRA layer.*quantized or packed.*base_model.model.0.*Nothing is left to perturb"):
        FlatLoRA(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model, rho=0.1, schedule="constant", targets=["0"])
