"""The LoRA gradient is the gradient of L(W + sBA + e) for the drawn e, backward inside or after the block."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, clone_model, make_mlp
from torch import nn

from flatlora_optim import FlatLoRA, LoRALinear, lora_parameters


def _noisy_weights(model: nn.Module, opt: FlatLoRA) -> dict:
    with opt.perturbed():
        return {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _reference_grads(model: nn.Module, noisy: dict, x, y) -> list:
    """Grads of a copy whose base weights were set to W + e by hand (no Flat-LoRA involved)."""
    ref = clone_model(model)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if name in noisy:
                m.weight.copy_(noisy[name])
    nn.functional.cross_entropy(ref(x), y).backward()
    return [p.grad.clone() for p in lora_parameters(ref)]


@pytest.mark.parametrize("where", ["inside", "after", "explicit", "closure"])
def test_lora_grads_equal_grads_at_hand_perturbed_weights(where):
    model = make_mlp(seed=3)
    x, y = batch(1)
    x.requires_grad_(True)  # input grads too: they flow through the (perturbed) base weights
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.0), model, rho=0.3, schedule="constant", seed=11)
    noisy = _noisy_weights(model, opt)
    expected = _reference_grads(model, noisy, x.detach().requires_grad_(True), y)

    def loss_fn():
        return nn.functional.cross_entropy(model(x), y)

    if where == "inside":
        with opt.perturbed():
            loss_fn().backward()
    elif where == "after":
        with opt.perturbed():
            loss = loss_fn()
        assert opt.is_perturbed  # kept until the backward below has used the noisy weights
        loss.backward()
        assert not opt.is_perturbed
    elif where == "explicit":
        opt.perturb()
        loss = loss_fn()
        opt.restore()
        loss.backward()
    else:

        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        grads_holder = []
        original_step = opt.base_optimizer.step

        def capture_step(closure=None):
            out = original_step(closure)
            grads_holder.extend(p.grad.clone() for p in lora_parameters(model))
            return out

        opt.base_optimizer.step = capture_step
        opt.step(closure)
        got = grads_holder
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
        return
    got = [p.grad for p in lora_parameters(model)]
    assert not opt.is_perturbed
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_grads_differ_from_clean_grads():
    """Guard against a vacuous pass: the noise must actually change the gradient."""
    model = make_mlp(seed=3)
    x, y = batch(1)
    clean = clone_model(model)
    nn.functional.cross_entropy(clean(x), y).backward()
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.0), model, rho=0.3, schedule="constant")
    with opt.perturbed():
        nn.functional.cross_entropy(model(x), y).backward()
    assert any(not torch.allclose(a.grad, b.grad) for a, b in zip(lora_parameters(model), lora_parameters(clean)))


def test_forced_restore_before_backward_raises_autograd_error():
    model = make_mlp(seed=3)
    x, y = batch(1)
    x.requires_grad_(True)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.0), model, rho=0.3, schedule="constant")
    opt.perturb()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.restore(force=True)
    with pytest.raises(RuntimeError, match="after they were restored"):
        loss.backward()


def test_gradient_accumulation_equals_sum_of_micro_batch_grads_at_one_draw():
    model = make_mlp(seed=4)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.0), model, rho=0.2, schedule="constant")
    noisy = _noisy_weights(model, opt)
    micro = [batch(s, n=4) for s in range(3)]
    ref = clone_model(model)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if name in noisy:
                m.weight.copy_(noisy[name])
    for x, y in micro:
        nn.functional.cross_entropy(ref(x), y).backward()
    for x, y in micro:
        with opt.perturbed():
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    for g, e in zip(lora_parameters(model), lora_parameters(ref)):
        torch.testing.assert_close(g.grad, e.grad, rtol=0, atol=0)
