"""The noise is the paper's: per-row std sigma/sqrt(n)*||W_i + sBA_i||, mean 0, rows independent."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlora_optim import FlatLoRA, LoRALinear, lora_parameters
from flatlora_optim.noise import chunk_bounds, layer_key, noise_seed, row_norms, rows_per_chunk
from flatlora_optim.targets import Adapter


def _layer(m: int, n: int, r: int = 8, seed: int = 0, dtype=torch.float32) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(n, m, bias=False)
    layer = LoRALinear(base, r=r, alpha=16)
    with torch.no_grad():
        # rows with very different norms, so a per-matrix scale would fail the test
        row_scale = torch.logspace(-2, 1, m)[:, None]
        layer.weight.copy_(torch.randn(m, n, generator=gen) * row_scale)
        layer.lora_A.copy_(torch.randn(r, n, generator=gen) * 0.3)
        layer.lora_B.copy_(torch.randn(m, r, generator=gen) * 0.3)
    return nn.Sequential(layer.to(dtype))


def _realised_noise(model: nn.Module, opt: FlatLoRA) -> tuple[torch.Tensor, torch.Tensor]:
    layer = model[0]
    clean = layer.weight.detach().to(torch.float64).clone()
    with opt.perturbed():
        noisy = layer.weight.detach().to(torch.float64).clone()
        regenerated = opt.regenerate_noise("0").to(torch.float64)
    return noisy - clean, regenerated


def _expected_std(layer: LoRALinear, sigma: float) -> torch.Tensor:
    full = layer.weight.detach().double() + layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    return sigma * full.norm(dim=1) / full.shape[1] ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_row_std_matches_formula(dtype):
    """Seed 0, 64 rows x 4096: each row's sample std is within 6% (about 5.4 standard errors at n=4096; 8% for bf16)
    of sigma/sqrt(n)*||W_i + sBA_i||, and the mean over rows of the ratio within 1%."""
    model = _layer(64, 4096, dtype=dtype)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.1, schedule="constant", seed=0)
    eps, _ = _realised_noise(model, opt)
    expected = _expected_std(model[0], 0.1)
    ratio = eps.std(dim=1) / expected
    tol = 0.06 if dtype == torch.float32 else 0.08
    assert (ratio - 1).abs().max() < tol, ratio
    assert abs(ratio.mean().item() - 1) < 0.01
    # mean ~ 0: |row mean| below 5 standard errors of the mean
    assert ((eps.mean(dim=1) / (expected / 4096**0.5)).abs() < 5).all()


def test_rows_are_uncorrelated_and_gaussian():
    """Seed 0: |corr| between any two rows < 5/sqrt(n); standardised kurtosis within 3 +- 0.15."""
    model = _layer(32, 4096)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.05, schedule="constant", seed=0)
    eps, _ = _realised_noise(model, opt)
    z = eps / eps.std(dim=1, keepdim=True)
    corr = torch.corrcoef(z)
    off_diagonal = corr - torch.eye(32, dtype=corr.dtype)
    assert off_diagonal.abs().max() < 5 / 4096**0.5
    kurtosis = (z**4).mean().item()
    assert abs(kurtosis - 3) < 0.15


def test_adapter_changes_the_scale():
    """The std follows ||W + sBA||, not ||W||: a large adapter makes the noise larger."""
    model = _layer(16, 2048)
    with torch.no_grad():
        model[0].lora_B.mul_(20)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.1, schedule="constant")
    eps, _ = _realised_noise(model, opt)
    with_adapter = _expected_std(model[0], 0.1)
    without_adapter = 0.1 * model[0].weight.detach().double().norm(dim=1) / 2048**0.5
    ratio = eps.std(dim=1) / with_adapter
    assert (ratio - 1).abs().max() < 0.1
    assert ((with_adapter / without_adapter - 1).abs() > 0.3).any()


def test_regenerated_noise_matches_what_was_added():
    """One layer's noise regenerated alone equals the realised W~ - W up to the rounding of W + e."""
    model = _layer(48, 300)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.1, schedule="constant")
    eps, regenerated = _realised_noise(model, opt)
    # |fl(W + e) - (W + e)| <= half an ulp of the result <= eps_32 * (|W| + |e|)
    bound = torch.finfo(torch.float32).eps * (model[0].weight.detach().double().abs() + regenerated.abs())
    assert ((eps - regenerated).abs() <= bound).all()
    assert (eps - regenerated).abs().max() < 1e-3 * regenerated.abs().max()


def test_row_norm_identity_equals_explicit_norm():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(200, 64, generator=gen)
    adapters = [
        Adapter("a", torch.randn(4, 64, generator=gen), torch.randn(200, 4, generator=gen), 2.0),
        Adapter("b", torch.randn(8, 64, generator=gen), torch.randn(200, 8, generator=gen), 0.5),
    ]
    explicit = (w.double() + sum(a.scaling * a.B.double() @ a.A.double() for a in adapters)).norm(dim=1)
    torch.testing.assert_close(row_norms(w, adapters), explicit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(row_norms(w, []), w.double().norm(dim=1))


def test_row_norms_do_not_overflow_for_large_float32_weights():
    w = torch.full((3, 1000), 1e30)
    assert torch.isfinite(row_norms(w, [])).all()


def test_blocks_depend_only_on_fan_in():
    assert rows_per_chunk(4096) == rows_per_chunk(4096)
    bounds = list(chunk_bounds(50_000, 4096))
    assert bounds[0][1] == 0 and bounds[-1][2] == 50_000
    assert all(b[2] == c[1] for b, c in zip(bounds, bounds[1:]))
    assert len(bounds) > 1


def test_seeds_differ_across_step_layer_block_and_seed():
    base = noise_seed(0, 5, layer_key("a"), 0)
    a, b = layer_key("a"), layer_key("b")
    others = [noise_seed(1, 5, a, 0), noise_seed(0, 6, a, 0), noise_seed(0, 5, b, 0), noise_seed(0, 5, a, 1)]
    assert len({base, *others}) == 5
    assert 0 <= base < 2**63
    assert layer_key("model.layers.0.q_proj") == layer_key("model.layers.0.q_proj")


def test_one_draw_per_step_shared_by_micro_batches():
    model = _layer(16, 64)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.1, schedule="constant")
    draws = []
    for _ in range(3):  # three micro-batches of one optimizer step
        with opt.perturbed():
            draws.append(model[0].weight.detach().clone())
            model(torch.randn(4, 64)).sum().backward()
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[1], draws[2])
    opt.step()
    with opt.perturbed():
        assert not torch.equal(model[0].weight, draws[0])


def test_step_seeds_equal_the_per_block_seeds():
    """The whole-step numpy seed computation gives exactly noise_seed's numbers, in layer-block order."""
    from flatlora_optim.noise import layer_key, noise_seed, noise_seeds

    keys = [layer_key("model.layers.0.q_proj"), layer_key("x"), 2**64 - 1, 0]
    blocks = [3, 1, 5, 2]
    for seed in (0, 1234, 2**63 - 5):
        for step in (0, 7, 10**9):
            expected = [noise_seed(seed, step, key, block) for key, count in zip(keys, blocks) for block in range(count)]
            assert noise_seeds(seed, step, keys, blocks).tolist() == expected


@pytest.mark.parametrize("turned", [False, True], ids=["row-major tiles", "transposed tiles"])
def test_layer_table_describes_every_tile_and_row_once(turned):
    """The grouped kernels' table: tiles cover each row block, bases pack layers one after another; with the
    transposed tiles on, a transposed view takes them."""
    from flatlora_optim.kernels.layer_table import ROWS_PER_PROGRAM, LayerTable, tile_shape, transposed_tiles
    from flatlora_optim.noise import rows_per_chunk

    weights = [torch.zeros(300, 128, dtype=torch.bfloat16), torch.zeros(70, 9000, dtype=torch.float16).t(), torch.zeros(5, 3)]
    with transposed_tiles(turned):
        table = LayerTable(weights)
    assert table.total_rows == 300 + 9000 + 5
    for index, w in enumerate(weights):
        m, n = w.shape
        per_block = rows_per_chunk(n)
        blocks = -(-m // per_block)
        assert table.blocks[index] == blocks
        layer = table.layers[index].tolist()
        tile_rows, tile_cols = tile_shape(layer[13])
        assert tile_rows * tile_cols == 2048
        assert table.tiles[index] == blocks * -(-min(per_block, m) // tile_rows) * -(-n // tile_cols)
        assert layer[:5] == [w.data_ptr(), m, n, w.stride(0), w.stride(1)]
        assert (table.tile_layer == index).sum().item() == table.tiles[index]
        assert (table.rowtile_layer == index).sum().item() == -(-m // ROWS_PER_PROGRAM)
        assert layer[12] == -(-n // tile_cols)
    # codec variants: fan-in a multiple of 8 (bit 0), contiguous 16-byte-aligned rows (bit 1), a transposed view (bit 2,
    # with its own tile: 256 x 8 against 4 x 512, while the transposed tiles are on)
    assert [row[13] for row in table.layers.tolist()] == [3, 4 if turned else 0, 0]
    assert tile_shape(4) == (256, 8) and tile_shape(3) == tile_shape(0) == (4, 512)
    assert table.std_bases == [0, 300, 9300] and table.seed_bases == [0, table.blocks[0], table.blocks[0] + table.blocks[1]]


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False), ("false", False), (" Off ", False), ("no", False)])
def test_the_environment_can_turn_the_transposed_tiles_off(value, on):
    """The codec's transposed tiles are on by default; ``FLATLORA_TRANSPOSED_TILES=0`` (or false, off, no) at import
    turns them off (so that the GPU suite can run without them, and users can go back to the row-major tiles)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FLATLORA_TRANSPOSED_TILES"}
    if value is not None:
        env["FLATLORA_TRANSPOSED_TILES"] = value
    code = ("import torch\nfrom flatlora_optim.kernels.layer_table import TRANSPOSED_TILES, codec_variant\n"
            "print(TRANSPOSED_TILES, codec_variant(torch.zeros(64, 16).t()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(on), str(5 if on else 1)]
