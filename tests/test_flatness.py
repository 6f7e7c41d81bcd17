"""The flatness meter: the known answer on a toy problem, the paper's noise, exact restore, no global RNG."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import assert_frozen_unchanged, batch, frozen_weights, make_mlp
from torch import nn

from flatlora_optim import LoRALinear
from flatlora_optim.flatness import FlatnessResult, measure_flatness, plot_flatness

N_IN, N_EXAMPLES = 64, 16


def _regression_toy(null_scale: float) -> tuple:
    """A one-output linear model that fits 16 points in 64-D exactly; ``null_scale`` adds an
    invisible (null-space) component to its full weight, put in the LoRA part ``sBA``.

    Both solutions have training loss 0. Under the paper's noise, ``e ~ N(0, sigma^2/n ||w||^2 I)``
    on the full weight ``w = W + sBA``, the expected MSE increase is known in closed form:
    ``sigma^2 / n * ||w||^2 * mean_k ||x_k||^2``, so the one with the large null-space
    component (large ||w||) is the sharp one, by a known factor.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_EXAMPLES, N_IN, generator=gen)
    w_fit = torch.linalg.lstsq(x, torch.randn(N_EXAMPLES, 1, generator=gen)).solution.t()  # min-norm fit, 1 x 64
    null_basis = torch.linalg.svd(x, full_matrices=True).Vh[N_EXAMPLES:]  # rows orthogonal to every x_k
    null_dir = null_basis[0:1]
    layer = LoRALinear(nn.Linear(N_IN, 1, bias=False), r=1, alpha=1.0)
    with torch.no_grad():
        layer.weight.copy_(w_fit)
        layer.lora_A.copy_(null_dir)
        layer.lora_B.fill_(null_scale)  # sBA = null_scale * null_dir (scaling = alpha / r = 1)
    model = nn.Sequential(layer)
    with torch.no_grad():
        y = model(x)  # the targets are the model's own outputs: training loss exactly 0
    full = w_fit + null_scale * null_dir

    def loss_fn(m: nn.Module) -> float:
        return float(nn.functional.mse_loss(m(x), y))

    expected_per_sigma2 = float(full.square().sum()) / N_IN * float(x.square().sum(dim=1).mean())
    return model, loss_fn, expected_per_sigma2


def test_sharp_solution_ranks_above_flat_one_by_the_known_factor():
    radii = [0.0, 0.05, 0.1, 0.2]
    results, expected = {}, {}
    for name, scale in (("flat", 0.0), ("sharp", 3.0)):
        model, loss_fn, per_sigma2 = _regression_toy(scale)
        results[name] = measure_flatness(model, loss_fn, radii, draws=1000, seed=3)
        expected[name] = per_sigma2
        assert results[name].base_loss < 1e-10  # both fit the data
    flat, sharp = results["flat"], results["sharp"]
    assert flat.mean_increase[0] == 0.0 and sharp.mean_increase[0] == 0.0
    for k, radius in enumerate(radii[1:], start=1):
        assert sharp.mean_increase[k] > 5 * flat.mean_increase[k] > 0
        # 1000 draws: the relative standard error of each mean is below 5%; 20% is over 4 standard errors
        for name in ("flat", "sharp"):
            assert results[name].mean_increase[k] == pytest.approx(radius**2 * expected[name], rel=0.20)
    # the same draws at every radius (common random numbers): a quadratic loss scales exactly as sigma^2
    assert sharp.mean_increase[3] / sharp.mean_increase[2] == pytest.approx(4.0, rel=1e-3)
    assert [len(row) for row in sharp.losses] == [1000] * 4 and sharp.draws == 1000


def test_noise_is_the_papers_per_row_noise_of_w_plus_sba():
    """Inside the loss the weight is W + e with row std sigma/sqrt(n)*||W_i + s(BA)_i||, BA included."""
    gen = torch.Generator().manual_seed(1)
    layer = LoRALinear(nn.Linear(512, 8, bias=False), r=2, alpha=4.0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 512, generator=gen) * torch.logspace(-2, 0, 8)[:, None])
        layer.lora_B.copy_(torch.randn(8, 2, generator=gen))
        layer.lora_A.copy_(torch.randn(2, 512, generator=gen) * 0.3)
    w0 = layer.weight.detach().clone()
    full = w0 + layer.delta_weight().detach()
    seen = []

    def loss_fn(m: nn.Module) -> float:
        seen.append((m[0].weight.detach() - w0).double())
        return 0.0

    measure_flatness(nn.Sequential(layer), loss_fn, [0.1], draws=3, seed=5)
    noise = torch.cat(seen[1:], dim=1)  # the first call is the clean base loss
    assert seen[0].abs().max() == 0
    expected = 0.1 / math.sqrt(512) * full.double().norm(dim=1)
    # 3 x 512 samples per row: the std estimate is within ~2.5% (1 s.e.); 12% is ~5 s.e.
    assert torch.allclose(noise.std(dim=1), expected, rtol=0.12)
    assert not torch.allclose(expected, 0.1 / math.sqrt(512) * w0.double().norm(dim=1), rtol=0.12)  # BA matters here


def test_restores_bitwise_keeps_global_rng_and_mode():
    model = make_mlp(seed=2)
    model.train()
    before = frozen_weights(model)
    x, y = batch(seed=2)
    rng = torch.get_rng_state()

    def loss_fn(m: nn.Module) -> float:
        assert not m.training  # eval_mode=True
        return float(nn.functional.cross_entropy(m(x), y))

    model[1].eval()  # a submodule the caller keeps in eval mode (a frozen BatchNorm, say) stays so
    result = measure_flatness(model, loss_fn, [0.0, 0.1, 0.3], draws=3, seed=7)
    assert_frozen_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model[1].training, "the modes were not put back module by module"
    assert result.targets == ["0", "2", "4"]
    assert result.mean_increase[2] > result.mean_increase[1] > 0  # a random MLP: larger noise, larger loss
    again = measure_flatness(model, loss_fn, [0.0, 0.1, 0.3], draws=3, seed=7)
    other = measure_flatness(model, loss_fn, [0.0, 0.1, 0.3], draws=3, seed=8)
    assert again.losses == result.losses  # same seed, same draws
    assert other.losses[1] != result.losses[1]
    json.dumps(result.to_dict())


def test_exception_in_the_loss_restores_the_weights():
    model = make_mlp(seed=3)
    before = frozen_weights(model)
    x, _ = batch(seed=3)
    calls = []

    def loss_fn(m: nn.Module) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return float(m(x).square().mean())

    with pytest.raises(RuntimeError, match="boom"):
        measure_flatness(model, loss_fn, [0.2], draws=5, restore="backup")
    assert_frozen_unchanged(model, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"draws": 0}, "draws"), ({"radii": [-0.1]}, "radii"), ({"radii": []}, "radii"), ({"restore": "subtract"}, "subtract"), ({"seed": -1}, "seed")],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_flatness(make_mlp(), lambda m: 0.0, **kwargs)


def test_no_lora_layers_raises():
    with pytest.raises(ValueError, match="No LoRA layers"):
        measure_flatness(nn.Sequential(nn.Linear(3, 3)), lambda m: 0.0)


def test_matplotlib_is_imported_only_by_the_plot(tmp_path):
    code = "import sys, flatlora_optim.flatness; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    curves = {
        "a": FlatnessResult([0.0, 0.1], 1.0, [[1.0, 1.0], [1.2, 1.4]], 0),
        "b": FlatnessResult([0.0, 0.1], 1.0, [[1.0, 1.0], [1.05, 1.1]], 0),
    }
    assert curves["a"].mean_increase == pytest.approx([0.0, 0.3]) and curves["a"].increase_at(0.1) == pytest.approx(0.3)
    path = tmp_path / "flat.png"
    fig = plot_flatness(curves, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes[0].lines) >= 2
