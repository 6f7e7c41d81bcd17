"""Every LoRA flavour: rows, fan-in and adapters found by introspection; the realised per-row noise
std matches sigma/sqrt(n) * ||W_i + sum_a s_a (B_a A_a)_i|| computed by hand from that flavour's own
tensors; restore is bitwise exact.

Statistics (all tests): seed 0, rho 0.1, schedule "constant"; every row has n >= 1024 samples. The
sample std of n Gaussian draws has relative standard error 1/sqrt(2n), so each row's ratio
realised/expected must be within 6/sqrt(2n) (6 standard errors, <= 13.3% at n = 1024) and the mean
ratio over rows within 4/sqrt(2 n m). Each test also checks that the adapters change the expected
stds by more than that tolerance, so a flavour that ignored them (or used the wrong rows) would fail.
"""

from __future__ import annotations

import math
import warnings

import loralib
import peft
import pytest
import torch
from conftest import bits
from torch import nn
from torchtune_standin import torchtune_classes

from flatlora_optim import FlatLoRA, LoRALayerInfo, describe_targets, discover_targets, format_targets, register_lora_layer
from flatlora_optim import targets as targets_module

RHO = 0.1


def _randomise(model: nn.Module, seed: int = 0, lora_scale: float = 0.5) -> None:
    """Base weights with very different row norms; adapters large enough to matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 and "magnitude" not in name:
                continue
            if "lora" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * lora_scale)
            elif "magnitude" not in name:
                rows = torch.logspace(-1.5, 0.5, p.shape[0]).view(-1, *([1] * (p.dim() - 1)))
                p.copy_(torch.randn(p.shape, generator=gen) * rows)


def _trainable(model: nn.Module):
    return [p for p in model.parameters() if p.requires_grad]


def _check_noise(opt: FlatLoRA, target, w_rows: torch.Tensor, delta_rows: torch.Tensor, to_rows) -> torch.Tensor:
    """Perturb once: compare the realised row stds with the hand formula; check bitwise restore.

    ``w_rows``/``delta_rows``: m x n float64 from the flavour's own tensors; ``to_rows`` maps the stored
    weight to the m x n row view (by hand, independently of the library). Returns the realised noise."""
    weight = target.weight
    before = bits(weight)
    clean = to_rows(weight.detach().double().clone())
    with opt.perturbed():
        noisy = to_rows(weight.detach().double().clone())
    assert torch.equal(bits(weight), before), "restore is not bitwise exact"
    eps = noisy - clean
    m, n = eps.shape
    assert (m, n) == tuple(target.shape) == tuple(w_rows.shape)
    assert torch.equal(clean, w_rows)  # the row view is the flavour's own weight, rows = output units
    expected = RHO * (w_rows + delta_rows).norm(dim=1) / math.sqrt(n)
    ratio = eps.std(dim=1) / expected
    tol = 6 / math.sqrt(2 * n)
    assert (ratio - 1).abs().max() < tol, ratio
    assert abs(ratio.mean().item() - 1) < 4 / math.sqrt(2 * n * m)
    without_adapters = RHO * w_rows.norm(dim=1) / math.sqrt(n)
    assert ((without_adapters / expected - 1).abs() > 2 * tol).any(), "test is not sensitive to the adapters"
    return eps


def _only_target(opt: FlatLoRA):
    assert len(opt.targets) == 1, [t.name for t in opt.targets]
    return opt.targets[0]


# ---------------------------------------------------------------------------- peft


class _Convs(nn.Module):
    def __init__(self, dim: int, groups: int = 1):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        kernel = {1: 9, 2: 5, 3: (3, 5, 5)}[dim]
        channels = {1: 128, 2: 48, 3: 16}[dim]
        self.conv = conv(channels, 8, kernel, groups=groups, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_peft_conv_rows_are_output_channels(dim):
    model = peft.get_peft_model(_Convs(dim), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv"]))
    _randomise(model)
    opt = FlatLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, rho=RHO, schedule="constant", seed=0)
    target = _only_target(opt)
    layer = target.module
    W = layer.get_base_layer().weight.detach().double()
    A = layer.lora_A["default"].weight.detach().double()  # r x in x k...
    B = layer.lora_B["default"].weight.detach().double()  # out x r x 1...
    # by hand: the kernel of B(A(x)) is sum_j B[o, j] A[j]
    delta = 2.0 * torch.einsum("or,r...->o...", B.flatten(1), A)
    torch.testing.assert_close(delta, layer.get_delta_weight("default").double(), rtol=1e-5, atol=1e-6)  # peft agrees
    assert target.flavour == "peft-conv" and target.shape == (8, W[0].numel())
    _check_noise(opt, target, W.flatten(1), delta.flatten(1), lambda w: w.flatten(1))


def test_peft_grouped_conv_is_refused_clearly():
    model = peft.get_peft_model(_Convs(2, groups=4), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv"]))
    with pytest.raises(ValueError, match="grouped convolution \\(groups=4\\)"):
        FlatLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, total_steps=5)


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(2048, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, ids):
        return self.out(self.emb(ids))


def test_peft_embedding_rows_are_embedding_dimensions():
    model = peft.get_peft_model(_Embed(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb"]))
    _randomise(model)
    opt = FlatLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, rho=RHO, schedule="constant", seed=0)
    target = _only_target(opt)
    layer = target.module
    W = layer.get_base_layer().weight.detach().double()  # V x d
    A = layer.lora_embedding_A["default"].detach().double()  # r x V
    B = layer.lora_embedding_B["default"].detach().double()  # d x r
    torch.testing.assert_close((2.0 * B @ A).t(), layer.get_delta_weight("default").double(), rtol=1e-5, atol=1e-6)
    assert target.transposed and target.shape == (16, 2048)
    _check_noise(opt, target, W.t(), 2.0 * B @ A, lambda w: w.t())


def test_peft_dora_rows_of_w_plus_sba_and_magnitude_untouched():
    """DoRA: noise std from ||W + sBA|| (not from the magnitude); the magnitude vector keeps its bits; inside the
    block DoRA's forward renormalises W + e + sBA, so every row of the effective weight still has norm m_i."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 12))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True))
    _randomise(model)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.copy_(torch.linspace(0.5, 2.0, 12))
    opt = FlatLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, rho=RHO, schedule="constant", seed=0)
    target = _only_target(opt)
    magnitude = layer.lora_magnitude_vector["default"].weight
    mag_bits = bits(magnitude)
    W = layer.get_base_layer().weight.detach().double()
    delta = 2.0 * layer.lora_B["default"].weight.detach().double() @ layer.lora_A["default"].weight.detach().double()
    _check_noise(opt, target, W, delta, lambda w: w)
    assert torch.equal(bits(magnitude), mag_bits)
    assert describe_targets(opt.targets)[0]["adapters"] == ["default (DoRA)"]
    eye = torch.eye(1024)
    with opt.perturbed():
        bias = layer.get_base_layer().bias
        effective = (model(eye) - bias).detach().t().double()  # rows of the weight the forward uses
        assert not torch.allclose(effective.norm(dim=1), (W + delta).norm(dim=1), rtol=1e-3)
    torch.testing.assert_close(effective.norm(dim=1), magnitude.detach().double(), rtol=1e-4, atol=1e-5)


def test_peft_rslora_scaling_is_alpha_over_sqrt_r():
    model = nn.Sequential(nn.Linear(1024, 16))
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=8, target_modules=["0"], use_rslora=True))
    _randomise(model, lora_scale=0.3)
    opt = FlatLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, rho=RHO, schedule="constant", seed=0)
    target = _only_target(opt)
    layer = target.module
    s = 8 / math.sqrt(16)  # by hand, not module.scaling
    delta = s * layer.lora_B["default"].weight.detach().double() @ layer.lora_A["default"].weight.detach().double()
    _check_noise(opt, target, layer.get_base_layer().weight.detach().double(), delta, lambda w: w)


def test_peft_only_active_adapters_count_and_disabled_count_none():
    model = nn.Sequential(nn.Linear(1024, 16))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), adapter_name="first")
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    model.add_adapter("third", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["0"]))
    _randomise(model)
    layer = model.base_model.model[0]
    layer.set_adapter(["first", "third"])
    for p in layer.parameters():  # set_adapter changes requires_grad; train a and c
        p.requires_grad_(False)
    opt = FlatLoRA(torch.optim.SGD([layer.lora_A["first"].weight, layer.lora_A["third"].weight], lr=0.1), model, rho=RHO, schedule="constant")
    target = _only_target(opt)
    assert [a.name for a in target.adapters()] == ["first", "third"]

    def delta(name, s):
        return s * layer.lora_B[name].weight.detach().double() @ layer.lora_A[name].weight.detach().double()

    W = layer.get_base_layer().weight.detach().double()
    _check_noise(opt, target, W, delta("first", 2.0) + delta("third", 4.0), lambda w: w)
    with model.disable_adapter():
        assert target.adapters() == []
        with opt.perturbed():
            noisy = target.weight.detach().double().clone()
        ratio = (noisy - W).std(dim=1) / (RHO * W.norm(dim=1) / math.sqrt(1024))
        assert (ratio - 1).abs().max() < 6 / math.sqrt(2 * 1024)



def test_peft_factors_are_the_live_parameters_and_a_parametrised_factor_its_value():
    # the factors are read from the module registries on the hot path; a parametrised factor (weight norm,
    # say) is no plain parameter there and must still be what the forward uses
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    model = nn.Sequential(nn.Linear(64, 16))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    _randomise(model)
    layer = model.base_model.model[0]
    opt = FlatLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, rho=RHO, schedule="constant")
    target = _only_target(opt)
    (adapter,) = target.adapters()
    assert adapter.A is layer.lora_A["default"].weight and adapter.B is layer.lora_B["default"].weight and adapter.scaling == 2.0
    parametrize.register_parametrization(layer.lora_A["default"], "weight", Doubled())
    (adapter,) = target.adapters()
    assert torch.equal(adapter.A, 2 * layer.lora_A["default"].parametrizations.weight.original)
    assert adapter.B is layer.lora_B["default"].weight

def test_peft_merged_conv_and_embedding_are_refused():
    model = peft.get_peft_model(_Embed(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb"]))
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        FlatLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, total_steps=5)


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1024, 12)

    def forward(self, x):
        return self.lin(x)


def test_peft_target_parameters_param_wrapper():
    model = peft.get_peft_model(_Two(), peft.LoraConfig(r=4, lora_alpha=8, target_parameters=["lin.weight"]))
    _randomise(model)
    opt = FlatLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, rho=RHO, schedule="constant", seed=0)
    target = _only_target(opt)
    assert target.flavour == "peft-param" and target.param_name == "weight"
    layer = target.module
    W = layer.get_base_layer().weight.detach().double()
    delta = 2.0 * layer.lora_B["default"].weight.detach().double() @ layer.lora_A["default"].weight.detach().double()
    _check_noise(opt, target, W, delta, lambda w: w)
    before = bits(target.weight)
    x = torch.randn(3, 1024)
    with opt.perturbed():  # the forward parametrises the weight; noise is in the stored original
        out = model(x)
        expected = x @ (target.weight.detach() + delta.float()).t() + layer.get_base_layer().bias
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        out.sum().backward()
    opt.step()
    assert torch.equal(bits(target.weight), before)


def test_peft_target_parameters_on_a_conv1d_weight_is_refused_clearly():
    """A transformers ``Conv1D`` stores its weight inputs x outputs: through ``target_parameters`` its rows are input
    units, and the noise went along the wrong axis, silently. The same layer through ``target_modules`` is handled."""
    from transformers.pytorch_utils import Conv1D

    class GPT2Like(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_proj = Conv1D(32, 64)

        def forward(self, x):
            return self.c_proj(x)

    model = peft.get_peft_model(GPT2Like(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=["c_proj.weight"]))
    with pytest.raises(ValueError, match="Conv1D weight through target_parameters.*target_modules"):
        FlatLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, rho=RHO, schedule="constant")
    model = peft.get_peft_model(GPT2Like(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_proj"], fan_in_fan_out=True))
    opt = FlatLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, rho=RHO, schedule="constant")
    assert _only_target(opt).shape == (32, 64)  # rows: the output units


class _QuantStandIn(nn.Module):
    """Stands in for bitsandbytes' Linear4bit (detected by class name; bitsandbytes is not needed)."""

    def __init__(self, n, m):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(m, n), requires_grad=False)  # float before .cuda() quantizes it
        self.in_features, self.out_features = n, m

    def forward(self, x):
        return x @ self.weight.t()


_QuantStandIn.__name__ = "Linear4bit"


class _QuantModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(64, 64)
        self.k = nn.Linear(64, 64)
        self.v = nn.Linear(64, 64)


def test_quantized_peft_layers_are_skipped_with_one_warning_naming_them():
    model = peft.get_peft_model(_QuantModel(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "v"]))
    layers = model.base_model.model
    layers.q.base_layer.weight = nn.Parameter(torch.zeros(64, 64, dtype=torch.uint8), requires_grad=False)  # packed 4-bit
    layers.k.base_layer = _QuantStandIn(64, 64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        targets = discover_targets(model)
    messages = [str(w.message) for w in record if "packed" in str(w.message)]
    assert len(messages) == 1, messages
    assert "'base_model.model.q' (torch.uint8 weight)" in messages[0] and "'base_model.model.k' (Linear4bit base layer)" in messages[0]
    assert [t.name for t in targets] == ["base_model.model.v"]


# ---------------------------------------------------------------------------- loralib


class _LoralibModel(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer


def _loralib_opt(layer):
    model = _LoralibModel(layer)
    loralib.mark_only_lora_as_trainable(model)
    _randomise(model)
    opt = FlatLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, rho=RHO, schedule="constant", seed=0)
    return model, opt, _only_target(opt)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_loralib_linear(fan_in_fan_out):
    layer = loralib.Linear(1024, 12, r=4, lora_alpha=8, fan_in_fan_out=fan_in_fan_out)
    model, opt, target = _loralib_opt(layer)
    W = layer.weight.detach().double()
    rows = W.t() if fan_in_fan_out else W
    _check_noise(opt, target, rows, 2.0 * layer.lora_B.double() @ layer.lora_A.double(), (lambda w: w.t()) if fan_in_fan_out else (lambda w: w))


def test_loralib_embedding():
    layer = loralib.Embedding(2048, 16, r=4, lora_alpha=8)
    model, opt, target = _loralib_opt(layer)
    delta = 2.0 * layer.lora_B.detach().double() @ layer.lora_A.detach().double()  # d x V; loralib adds delta^T to W
    _check_noise(opt, target, layer.weight.detach().double().t(), delta, lambda w: w.t())


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_loralib_merged_linear(fan_in_fan_out):
    layer = loralib.MergedLinear(1024, 24, r=4, lora_alpha=8, enable_lora=[True, False, True], fan_in_fan_out=fan_in_fan_out)
    model, opt, target = _loralib_opt(layer)
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()  # A: 8 x 1024, B: 16 x 4
    delta = torch.zeros(24, 1024, dtype=torch.float64)
    delta[0:8] = 2.0 * B[0:8] @ A[0:4]  # q slice, group 0
    delta[16:24] = 2.0 * B[8:16] @ A[4:8]  # v slice, group 1; k (rows 8..16) has no adapter
    W = layer.weight.detach().double()
    _check_noise(opt, target, W.t() if fan_in_fan_out else W, delta, (lambda w: w.t()) if fan_in_fan_out else (lambda w: w))


def test_loralib_conv2d():
    layer = loralib.Conv2d(48, 8, kernel_size=5, r=2, lora_alpha=4)
    model, opt, target = _loralib_opt(layer)
    delta = (2.0 * layer.lora_B.detach().double() @ layer.lora_A.detach().double()).view(layer.conv.weight.shape)  # loralib's own rule
    assert target.shape == (8, 48 * 25)
    _check_noise(opt, target, layer.conv.weight.detach().double().flatten(1), delta.flatten(1), lambda w: w.flatten(1))


def test_loralib_eval_merges_and_is_refused():
    layer = loralib.Linear(64, 8, r=4, lora_alpha=8)
    model, opt, target = _loralib_opt(layer)
    model.eval()  # loralib merges sBA into the weight
    with pytest.raises(ValueError, match="merges on model.eval\\(\\)\\); call model.train\\(\\)"):
        FlatLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, total_steps=5)


# ---------------------------------------------------------------------------- torchtune


def test_torchtune_lora_and_dora_linear(monkeypatch):
    """torchtune (the real package when importable, otherwise tests/torchtune_standin.py): scaling alpha/rank by hand
    (LoRALinear has no scaling attribute), the base weight is not frozen by torchtune (FlatLoRA warns until it is)."""
    LoRALinear, DoRALinear, _ = torchtune_classes(monkeypatch)
    model = nn.Sequential(LoRALinear(1024, 12, rank=4, alpha=8.0), DoRALinear(1024, 12, rank=4, alpha=4.0))
    _randomise(model)
    model[1].initialize_dora_magnitude()
    params = [p for n, p in model.named_parameters() if "lora" in n or "magnitude" in n]
    with pytest.warns(UserWarning, match="require grad"):
        FlatLoRA(torch.optim.SGD(params, lr=0.1), model, total_steps=5)
    for layer in model:
        layer.weight.requires_grad_(False)
    opt = FlatLoRA(torch.optim.SGD(params, lr=0.1), model, rho=RHO, schedule="constant", seed=0)
    assert [t.flavour for t in opt.targets] == ["torchtune", "torchtune-dora"]
    for target, s in zip(opt.targets, [8.0 / 4, 4.0 / 4]):
        layer = target.module
        delta = s * layer.lora_b.weight.detach().double() @ layer.lora_a.weight.detach().double()
        _check_noise(opt, target, layer.weight.detach().double(), delta, lambda w: w)
    model[0].disabled = True
    assert opt.targets[0].adapters() == []


# ---------------------------------------------------------------------------- custom layers


class MyLoRA(nn.Module):
    """A user's own LoRA layer: y = x W^T + (x U) V * gain, with U: in x r, V: r x out (not peft's orientation)."""

    def __init__(self, n, m, r):
        super().__init__()
        self.base = nn.Linear(n, m, bias=False).requires_grad_(False)
        self.U = nn.Parameter(torch.zeros(n, r))
        self.V = nn.Parameter(torch.zeros(r, m))
        self.gain = 1.5
        self.enabled = True

    def forward(self, x):
        out = self.base(x)
        return out + (x @ self.U @ self.V) * self.gain if self.enabled else out


@pytest.fixture
def registered_mylora():
    before = list(targets_module._REGISTRY)
    flavour = register_lora_layer(
        MyLoRA,
        lambda m: LoRALayerInfo(weight=m.base.weight, adapters=[(m.U.t(), m.V.t(), m.gain)] if m.enabled else []),
    )
    yield flavour
    targets_module._REGISTRY[:] = before


def test_custom_layer_registration(registered_mylora):
    model = nn.Sequential(MyLoRA(1024, 12, 4))
    _randomise(model)
    with torch.no_grad():  # U, V are named without "lora": randomise them by hand
        model[0].U.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        model[0].V.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    opt = FlatLoRA(torch.optim.SGD([model[0].U, model[0].V], lr=0.1), model, rho=RHO, schedule="constant", seed=0)
    target = _only_target(opt)
    assert target.flavour == "MyLoRA" and target.owner is model[0].base
    layer = model[0]
    delta = 1.5 * (layer.U.detach().double() @ layer.V.detach().double()).t()
    _check_noise(opt, target, layer.base.weight.detach().double(), delta, lambda w: w)
    layer.enabled = False
    assert target.adapters() == []


def test_custom_layer_errors_are_clear(registered_mylora):
    register_lora_layer(MyLoRA, lambda m: LoRALayerInfo(weight=torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="not a parameter of that module"):
        discover_targets(nn.Sequential(MyLoRA(8, 4, 2)))
    register_lora_layer(MyLoRA, lambda m: LoRALayerInfo(weight="base.weight", merged=True))
    model = nn.Sequential(MyLoRA(8, 4, 2))
    with pytest.raises(ValueError, match="merged"):
        FlatLoRA(torch.optim.SGD([model[0].U], lr=0.1), model, total_steps=5)


# ---------------------------------------------------------------------------- describe


def test_describe_lists_what_was_found():
    model = peft.get_peft_model(_Embed(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "out"]))
    rows = describe_targets(discover_targets(model))
    assert rows[0] == {
        "name": "base_model.model.emb",
        "flavour": "peft-embedding",
        "weight_shape": (2048, 16),
        "dtype": "float32",
        "rows": 16,
        "fan_in": 2048,
        "view": "transposed",
        "adapters": ["default"],
        "bytes": 2048 * 16 * 4,
    }
    assert rows[1]["flavour"] == "peft" and (rows[1]["rows"], rows[1]["fan_in"]) == (4, 16)
    table = format_targets(discover_targets(model))
    assert "peft-embedding" in table and "16 x 2048" in table and "2 target(s), 128.2 KiB perturbed" in table


def test_state_dict_while_a_conv_weight_is_perturbed_is_clean():
    model = peft.get_peft_model(_Convs(2), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv"]))
    _randomise(model)
    opt = FlatLoRA(torch.optim.SGD(_trainable(model), lr=0.1), model, rho=RHO, schedule="constant")
    clean = bits(opt.targets[0].weight)
    with opt.perturbed():
        state = model.state_dict()
    assert torch.equal(bits(state["base_model.model.conv.base_layer.weight"]), clean)


def test_custom_layer_example_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "custom_lora_layer.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=120).stdout
    assert "MyLoRALinear" in out and "restored bitwise" in out
