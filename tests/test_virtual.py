"""Virtual mode: the base weights are never written; same noise and gradients as in-place mode."""

from __future__ import annotations

import copy
import gc
import io
import os
import pickle
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
import transformers
from conftest import assert_frozen_unchanged, batch, bits, frozen_weights, make_mlp
from torch import nn

from flatlora_optim import FlatLoRA, lora_parameters


def _pair(model, **kwargs):
    """The same model twice, one wrapped in in-place mode, one in virtual mode, same seed."""
    twin = copy.deepcopy(model)
    kwargs.setdefault("rho", 0.2)
    kwargs.setdefault("schedule", "constant")
    kwargs.setdefault("seed", 5)

    def make(m, mode):
        params = [p for p in m.parameters() if p.requires_grad]
        return FlatLoRA(torch.optim.SGD(params, lr=0.05), m, mode=mode, **kwargs)

    return (model, make(model, "inplace")), (twin, make(twin, "virtual"))


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _assert_same(a, b):
    # CPU: both modes run the same ops on the same W + e, so the results agree to the last bit;
    # the tolerance allows for a BLAS that reorders sums (1e-6 relative).
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def _llama(bias: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, attention_bias=bias, mlp_bias=bias)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_lora_linear_same_losses_and_grads_as_inplace(dtype, bias, accumulate):
    (m1, o1), (m2, o2) = _pair(make_mlp(seed=1, dtype=dtype, bias=bias))
    for step in range(2):
        losses = []
        for opt, model in [(o1, m1), (o2, m2)]:
            total = 0.0
            for micro in range(accumulate):
                x, y = batch(10 * step + micro, dtype=dtype)
                with opt.perturbed():
                    loss = nn.functional.cross_entropy(model(x).float(), y)
                loss.backward()
                total += loss.item()
            losses.append(total)
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
        _assert_same(_grads(m1), _grads(m2))
        o1.step(), o2.step()
        o1.zero_grad(), o2.zero_grad()


PEFT_CASES = [(torch.float32, True, 1), (torch.float32, False, 2), (torch.bfloat16, True, 2), (torch.bfloat16, False, 1)]


@pytest.mark.parametrize("dtype, bias, accumulate", PEFT_CASES)
def test_peft_llama_same_losses_and_grads_as_inplace(dtype, bias, accumulate):
    (m1, o1), (m2, o2) = _pair(_llama(bias).to(dtype))
    gen = torch.Generator().manual_seed(0)
    micro = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(accumulate)]
    losses = []
    for opt, model in [(o1, m1), (o2, m2)]:
        total = 0.0
        for ids in micro:
            with opt.perturbed():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            total += loss.item()
        losses.append(total)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    _assert_same(_grads(m1), _grads(m2))


def test_gpt2_conv1d_same_grads_as_inplace():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = transformers.GPT2LMHeadModel(config)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    (m1, o1), (m2, o2) = _pair(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for opt, m in [(o1, m1), (o2, m2)]:
        with opt.perturbed():
            m(input_ids=ids, labels=ids).loss.backward()
    _assert_same(_grads(m1), _grads(m2))


def test_weights_are_never_written():
    model = make_mlp(seed=2)
    before = frozen_weights(model)
    versions = {n: p._version for n, p in model.named_parameters()}
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant", mode="virtual")
    for step in range(3):
        with opt.perturbed():
            assert_frozen_unchanged(model, before)  # even inside the block
            loss = nn.functional.cross_entropy(model(batch(step)[0]), batch(step)[1])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert {n: p._version for n, p in model.named_parameters() if not p.requires_grad} == {
        n: v for n, v in versions.items() if not dict(model.named_parameters())[n].requires_grad
    }
    assert_frozen_unchanged(model, before)


def test_noise_scale_is_a_constant_for_autograd():
    """d(loss)/dB through the row norms would differ from the hand-perturbed reference grads."""
    model = make_mlp(seed=3)
    twin = copy.deepcopy(model)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.5, schedule="constant", mode="virtual")
    inplace = FlatLoRA(torch.optim.SGD(list(lora_parameters(twin)), lr=0.1), twin, rho=0.5, schedule="constant")
    with inplace.perturbed():
        noisy = {n: m.weight.detach().clone() for n, m in twin.named_modules() if hasattr(m, "lora_A")}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in reference.named_modules():
            if n in noisy:
                m.weight.copy_(noisy[n])
    x, y = batch(0)
    nn.functional.cross_entropy(reference(x), y).backward()
    with opt.perturbed():
        nn.functional.cross_entropy(model(x), y).backward()
        scales = [p.std for p in opt._perturbations]
    _assert_same(_grads(reference), _grads(model))
    assert len(scales) == 3 and all(s is not None and not s.requires_grad and s.grad_fn is None for s in scales)


def test_eval_state_dict_and_checkpoint_mid_step_are_fine():
    model = make_mlp(seed=4)
    before = frozen_weights(model)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant", mode="virtual")
    x, y = batch(0)
    with opt.perturbed():
        loss = nn.functional.cross_entropy(model(x), y)
        model.eval()  # allowed in virtual mode
        sd = model.state_dict()
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        model.train()
    loss.backward()  # after the block: regenerated noise
    for key, value in before.items():
        assert torch.equal(bits(sd[key]), value)
    saved = torch.load(io.BytesIO(buffer.getvalue()))
    assert saved["opt"]["flatlora"]["mode"] == "virtual"
    assert all(torch.equal(bits(saved["model"][k]), v) for k, v in before.items())
    assert all(p.grad is not None for p in lora_parameters(model))


def test_unwrapping_leaves_the_model_exactly_as_it_was():
    model = make_mlp(seed=6)
    x, _ = batch(0)
    expected = model(x)
    keys = list(model.state_dict())
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant", mode="virtual")
    with opt.perturbed():
        noisy = model(x)
        with opt.perturbed():  # nested: same draw, one patch
            assert torch.equal(model(x), noisy)
        assert torch.equal(model(x), noisy)
        assert "base_forward" in model[0].__dict__
    assert not torch.equal(noisy, expected)
    # after the block, the graph that `noisy` carries still waits for its backward: as in-place mode keeps its weights
    # perturbed, the layers stay rerouted (gradient checkpointing reruns them inside that backward)
    assert torch.equal(model(x), noisy) and "base_forward" in model[0].__dict__
    del noisy
    gc.collect()  # the graph is released without a backward: the patches go
    assert all("base_forward" not in m.__dict__ and "forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model(x), expected)
    assert list(model.state_dict()) == keys
    pickle.loads(pickle.dumps(model))


def test_torch_compile_is_refused_clearly():
    model = make_mlp()
    compiled = torch.compile(model)
    with pytest.raises(ValueError, match="torch.compile"):
        FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), compiled, rho=0.1, schedule="constant", mode="virtual")


def test_compiling_the_model_after_wrapping_is_refused_at_its_forward():
    # the construction-time check cannot see a model compiled later: the rerouted forward must refuse
    # under dynamo's tracing rather than run with noise drawn outside the compiled graph
    model = make_mlp()
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.1, schedule="constant", mode="virtual")
    compiled = torch.compile(model, backend="eager")
    x, _ = batch()
    with pytest.raises(RuntimeError, match="cannot run under torch.compile"), opt.perturbed():
        compiled(x)
    assert not opt.is_perturbed
    assert all("base_forward" not in m.__dict__ and "forward" not in m.__dict__ for m in model.modules())


def test_unsupported_layer_kind_is_refused_clearly():
    from flatlora_optim.optimizer import _check_virtual
    from flatlora_optim.targets import LoRATarget

    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Custom(4, 4))
    target = LoRATarget("0", model[0], "custom", model[0], "weight")
    with pytest.raises(ValueError, match="cannot reroute.*Custom.*mode='inplace'"):
        _check_virtual(model, [target])
    with pytest.raises(ValueError, match="mode"):
        FlatLoRA(torch.optim.SGD(list(lora_parameters(make_mlp())), lr=0.1), make_mlp(), rho=0.1, schedule="constant", mode="lazy")


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from torch import nn
    from flatlora_optim import FlatLoRA, inject_lora, lora_parameters
    mode = sys.argv[1]
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(12)])
    inject_lora(model, [str(i) for i in range(12)], r=4, alpha=8)
    x = torch.randn(4, 1024)
    def step(opt):
        if opt is None:
            model(x).square().mean().backward()
        else:
            with opt.perturbed():
                model(x).square().mean().backward()
    opt = None if mode == "plain" else FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.1, schedule="constant", mode=mode)
    step(opt)  # warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(opt)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and MALLOC_MMAP_THRESHOLD_ are Linux/glibc")
def test_virtual_peak_memory_is_about_one_layer():
    """12 layers of 4 MiB: virtual mode's extra peak stays below 3 layers' bytes (one W+e, its noise block, slack)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    rise = {}
    for mode in ["plain", "virtual"]:
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
        rise[mode] = float(out.stdout.split()[-1])
    layer = 1024 * 1024 * 4
    assert rise["virtual"] - rise["plain"] < 3 * layer, rise


def test_peft_llama_under_bf16_autocast_same_grads_as_inplace():
    """bf16 autocast over an fp32 model: virtual mode's layers form W + e in autocast's forward and again in
    backward; the gradients are in-place mode's."""
    (m1, o1), (m2, o2) = _pair(_llama())
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for opt, model in [(o1, m1), (o2, m2)]:
        for step in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with opt.perturbed():
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            losses.append(loss.item())
            if step == 0:
                opt.step()
                opt.zero_grad()
    assert losses[:2] == pytest.approx(losses[2:], rel=1e-6)
    _assert_same(_grads(m1), _grads(m2))


def _checkpointed_grads(mode, checkpointing, loss_from="loss"):
    """LoRA grads of one Flat-LoRA step on the tiny Llama (backward after the block), with transformers' gradient
    checkpointing off, reentrant (its default) or non-reentrant; ``mode=None``: plain LoRA. ``loss_from="logits"``:
    only the logits leave the block (the returned output, its ``.loss`` with it, is dropped) and the loss is taken
    from them after it."""
    model = _llama()
    model.train()
    if checkpointing != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    def loss_of(ids):
        if loss_from == "loss":
            return model(input_ids=ids, labels=ids).loss
        logits = model(input_ids=ids, labels=ids).logits
        return logits

    def finish(value):
        if loss_from == "loss":
            return value
        return nn.functional.cross_entropy(value[:, :-1].reshape(-1, value.shape[-1]), ids[:, 1:].reshape(-1))

    if mode is None:
        finish(loss_of(ids)).backward()
        return _grads(model)
    opt = FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05), model, mode=mode, rho=0.2,
                   schedule="constant", seed=5)
    before = frozen_weights(model)
    with opt.perturbed():
        value = loss_of(ids)
    finish(value).backward()  # checkpointing runs the layers' forward again in here: the noise must still be on
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)
    return _grads(model)


@pytest.mark.parametrize("mode", ["inplace", "virtual"])
@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("loss_from", ["loss", "logits"])
def test_gradient_checkpointing_gives_the_grads_at_the_noisy_weights(mode, checkpointing, loss_from):
    """Under gradient checkpointing the backward reruns each block's forward. Those reruns must see W + e: the
    LoRA grads equal those of the same step without checkpointing, not plain LoRA's. (Before the fix, reentrant
    checkpointing -- transformers 4's default -- silently gave grads partly at the clean weights in both modes, and
    virtual mode failed with a CheckpointError under non-reentrant checkpointing.)"""
    got = _checkpointed_grads(mode, checkpointing, loss_from)
    _assert_same(got, _checkpointed_grads(mode, "off", loss_from))
    plain = _checkpointed_grads(None, "off", loss_from)
    assert any(not torch.allclose(g, p, rtol=1e-4, atol=1e-6) for g, p in zip(got, plain))


def test_autocast_entered_inside_the_block_gives_both_modes_the_same_noise():
    """Virtual mode draws a layer's row stds at its first forward; under the caller's bfloat16 autocast they once came
    from bf16 products (stds 0.24% and LoRA grads 0.85% off in-place mode's). The library's work runs without it."""
    (a, opt_a), (b, opt_b) = _pair(make_mlp(seed=3, width=32), rho=0.3)
    x, y = batch(0)
    results = []
    for model, opt in ((a, opt_a), (b, opt_b)):
        with opt.perturbed():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = nn.functional.cross_entropy(out.float(), y)
            stds = [p.scales().clone() for p in opt._perturbations]
        loss.backward()
        results.append((loss.detach(), stds, _grads(model)))
    assert torch.equal(results[0][0], results[1][0])
    _assert_same(results[0][1], results[1][1])
    _assert_same(results[0][2], results[1][2])


def _dora_model():
    from peft import LoraConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 5)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    torch.manual_seed(0)
    return get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_dora=True))


def test_dora_layers_are_refused_by_virtual_mode():
    """DoRA reads its base weight directly for its row norms, where virtual mode's rerouting would leave it the clean
    W (once silently: the loss and grads were those of a half-perturbed model)."""
    model = _dora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="cannot reroute 2 layer.*DoRA.*mode='inplace'"):
        FlatLoRA(torch.optim.SGD(params, lr=0.1), model, rho=0.3, schedule="constant", mode="virtual")
    FlatLoRA(torch.optim.SGD(params, lr=0.1), model, rho=0.3, schedule="constant", mode="inplace")  # in-place takes DoRA


def test_dora_switched_on_after_construction_is_refused_at_the_block():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    model.add_adapter("dora", LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=True))
    opt = FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model, rho=0.3,
                   schedule="constant", mode="virtual")
    model.set_adapter("dora")
    before = frozen_weights(model)
    with pytest.raises(ValueError, match="DoRA"):
        with opt.perturbed():
            pass
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)


def test_a_tied_weight_is_refused_by_virtual_mode():
    """Virtual mode reroutes the layer that took the shared weight, not the others computing with it (once silently:
    they saw the clean weight where in-place mode gives every sharer W + e)."""
    from flatlora_optim import inject_lora

    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    model[2].weight = model[0].weight
    inject_lora(model, ["0", "2"], r=2, alpha=4)
    with pytest.warns(UserWarning, match="shared"), pytest.raises(ValueError, match="tied weights.*mode='inplace'"):
        FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant", mode="virtual")


def test_a_weight_tied_to_a_plain_module_is_refused_by_virtual_mode():
    """GPT-2's lm_head holds the embedding's parameter: in-place mode gives both W + e, virtual mode would reroute the
    LoRA layer only (losses 3.925 and 4.137 once)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "c_attn"], fan_in_fan_out=True))
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="lm_head shares its base weight with.*wte.*tied"):
        FlatLoRA(torch.optim.SGD(params, lr=0.1), model, rho=0.3, schedule="constant", mode="virtual")


def _registered_layer(calls_base: bool):
    """A registered LoRA layer over an nn.Linear whose forward calls its base module, or reads its weight itself."""
    from flatlora_optim import LoRALayerInfo, register_lora_layer

    class Layer(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base.requires_grad_(False)
            self.U = nn.Parameter(torch.randn(base.in_features, 2) * 0.1)
            self.V = nn.Parameter(torch.randn(2, base.out_features) * 0.1)

        def forward(self, x):
            out = self.base(x) if calls_base else nn.functional.linear(x, self.base.weight, self.base.bias)
            return out + x @ self.U @ self.V

    register_lora_layer(Layer, lambda m: LoRALayerInfo(weight=m.base.weight, adapters=[(m.U.t(), m.V.t(), 1.0)]))
    torch.manual_seed(0)
    return nn.Sequential(Layer(nn.Linear(12, 16)), nn.Tanh(), Layer(nn.Linear(16, 5)))


def test_a_registered_layer_that_reads_its_base_weight_itself_is_refused_at_the_first_block():
    """Virtual mode reroutes the base module's forward; a layer computing F.linear(x, self.base.weight) never calls it
    and once ran without noise, silently. The first block that sees the layers run names it; one that calls its base
    is checked once and then runs without the watch."""
    x, y = batch(0)
    for calls_base in (False, True):
        model = _registered_layer(calls_base)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = FlatLoRA(torch.optim.SGD(params, lr=0.1), model, rho=0.3, schedule="constant", mode="virtual")
        before = frozen_weights(model)
        for _ in range(2):
            if calls_base:
                with opt.perturbed():
                    nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                assert not [m for m in model.modules() if m._forward_pre_hooks], "the watch stayed after a checked block"
            else:
                with pytest.raises(ValueError, match=r"rerouted no product of \['0', '2'\].*self.base\(x\)"):
                    with opt.perturbed():
                        model(x)
                assert not opt.is_perturbed
        assert_frozen_unchanged(model, before)


@pytest.mark.parametrize("mode", ["inplace", "virtual"])
def test_a_loop_that_checkpoints_a_submodule_gets_the_noisy_grads_with_backward_after_the_block(mode):
    """Non-reentrant checkpointing of a submodule the loop calls directly (not the model given to FlatLoRA): virtual
    mode saw no graph through the model's outputs, took its rerouting off at the block's end, and the backward's rerun
    failed with a CheckpointError; it now tracks the first layer output, as in-place mode does."""
    from torch.utils.checkpoint import checkpoint

    def grads(after_block):
        net = nn.Module()
        net.body = make_mlp(seed=3)
        before = frozen_weights(net)
        opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(net)), lr=0.1), net, rho=0.3, schedule="constant", mode=mode)
        x, y = batch(0)
        with opt.perturbed():
            loss = nn.functional.cross_entropy(checkpoint(net.body, x, use_reentrant=False), y)
            if not after_block:
                loss.backward()
        if after_block:
            loss.backward()
        assert not opt.is_perturbed
        assert_frozen_unchanged(net, before)
        return [p.grad.clone() for p in lora_parameters(net)]

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_the_rerouting_check_runs_at_a_step_inside_the_block():
    """The block's end refuses a layer that reads its base weight itself (no noise in virtual mode). With ``step()``
    inside the block the noise came off before the block's end, so in a loop inside one block the check never ran and
    the layers trained without noise, silently."""
    x, y = batch(0)
    model = _registered_layer(calls_base=False)
    opt = FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model, rho=0.3,
                   schedule="constant", mode="virtual")
    with pytest.raises(ValueError, match="rerouted no product"):
        with opt.perturbed():
            for _ in range(3):
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
    assert not opt.is_perturbed and opt.step_count == 0


@pytest.mark.parametrize("convert", ["bfloat16", "half", "double"])
def test_a_conversion_between_forward_and_backward_leaves_the_gradients_those_of_the_forward(convert):
    """Virtual mode allows converting the model while a graph waits (the clean weights are converted). The backward
    formed ``W + e`` from the live, converted weight, and the LoRA gradients changed silently (by 1.7e-2 after
    ``bfloat16()``); plain autograd keeps the weight the forward used, and so does virtual mode now (bitwise)."""
    def grads(conversion):
        model = make_mlp(seed=3)
        opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant", mode="virtual")
        x, y = batch(0)
        x.requires_grad_(True)  # the first layer's input gradient goes through W + e too
        with opt.perturbed():
            loss = nn.functional.cross_entropy(model(x), y)
        if conversion is not None:
            getattr(model, conversion)()
        loss.backward()
        return [p.grad.double() for p in lora_parameters(model)] + [x.grad.double()]

    assert all(torch.equal(got, expected) for got, expected in zip(grads(convert), grads(None)))


def test_after_a_conversion_in_a_step_a_new_forward_forms_w_plus_e_of_the_converted_weight(monkeypatch):
    """The forward before the conversion and its pending backward form ``W + e`` from the weight that forward used; a
    forward after it, in the same step, from the converted weight (as a plain layer would compute with it)."""
    from flatlora_optim.perturbation import Perturber

    formed = []
    original = Perturber.former

    def recording(self, p, weight):
        former = original(self, p, weight)
        return lambda: formed.append(former().dtype) or former()

    monkeypatch.setattr(Perturber, "former", recording)
    model = make_mlp(seed=3)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant", mode="virtual")
    x, y = batch(0)
    opt.perturb()
    loss = nn.functional.cross_entropy(model(x), y)
    model.double()
    model(x.double())
    loss.backward()
    opt.restore()
    # three layers forward in float32, three in float64, then the first forward's backward in float32 (its first layer's
    # input needs no gradient, so two layers form W + e there)
    assert formed == [torch.float32] * 3 + [torch.float64] * 3 + [torch.float32] * 2
