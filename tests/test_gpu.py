"""GPU path (Triton kernel) against the torch path. Runs on a CUDA machine; CI has none and skips.

Run on the device with: python -m pytest -q tests/test_gpu.py
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import assert_standard_normal, bits, normal_sample_report
from torch import nn

from flatlora_optim import FlatLoRA, LoRALinear, lora_parameters
from flatlora_optim.noise import add_noise, kernel_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none (run on the device machine)")


def _model(dtype, rows=512, cols=8192, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = LoRALinear(nn.Linear(cols, rows, bias=True), r=8, alpha=16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, cols, generator=gen) * torch.logspace(-2, 0, rows)[:, None])
        layer.lora_B.copy_(torch.randn(rows, 8, generator=gen) * 0.05)
    return nn.Sequential(layer).to(device="cuda", dtype=dtype)


def _opt(model, **kwargs):
    return FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.01), model, rho=kwargs.pop("rho", 0.1), schedule="constant", **kwargs)


def test_triton_kernel_is_selected_on_cuda():
    pytest.importorskip("triton")
    assert kernel_for(torch.device("cuda")).name == "triton"


@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("restore", ["exact", "backup"])
def test_restore_is_bitwise_exact_on_gpu(monkeypatch, kernel, dtype, restore):
    monkeypatch.setenv("FLATLORA_NOISE_KERNEL", kernel)
    model = _model(dtype)
    before = bits(model[0].weight)
    opt = _opt(model, rho=0.15, restore=restore)
    x = torch.randn(4, 8192, device="cuda", dtype=dtype)
    for _ in range(5):
        with opt.perturbed():
            assert not torch.equal(bits(model[0].weight), before)
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.equal(bits(model[0].weight), before)
    assert opt.peak_restore_bytes < (0.10 if restore == "exact" else 1.01) * model[0].weight.numel() * model[0].weight.element_size()


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_noise_statistics_match_the_formula(monkeypatch, kernel):
    """Seed 0, 512 rows x 8192: per-row std within 5% (about 6.4 standard errors) of sigma/sqrt(n)*||W_i + sBA_i||, mean ratio within 0.5%."""
    monkeypatch.setenv("FLATLORA_NOISE_KERNEL", kernel)
    model = _model(torch.float32)
    layer = model[0]
    opt = _opt(model, rho=0.1)
    clean = layer.weight.detach().double().clone()
    with opt.perturbed():
        eps = layer.weight.detach().double() - clean
    full = clean + layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    expected = 0.1 * full.norm(dim=1) / 8192**0.5
    ratio = eps.std(dim=1) / expected
    assert (ratio - 1).abs().max() < 0.05
    assert abs(ratio.mean().item() - 1) < 0.005
    assert ((eps.mean(dim=1) / (expected / 8192**0.5)).abs() < 6).all()
    z = (eps / expected[:, None])[:64]
    corr = torch.corrcoef(z) - torch.eye(64, device="cuda", dtype=z.dtype)
    assert corr.abs().max() < 6 / 8192**0.5


def test_compiled_noise_is_standard_normal():
    """2**24 normals (seed 11) of the compiled kernel (Philox, Box--Muller from the special-function units) pass
    conftest.assert_standard_normal: Kolmogorov-Smirnov distance, moments, the tail beyond 3, no mass at 0, none past 5.27;
    and neighbouring normals are not correlated (lags 1, 2 and 8, within 6 standard errors)."""
    pytest.importorskip("triton")
    kernel = kernel_for(torch.device("cuda"))
    z = kernel.noise(torch.ones(4096, device="cuda"), 4096, torch.tensor([11], device="cuda"), torch.float32)
    assert_standard_normal(normal_sample_report(z))
    flat = z.double().flatten()
    for lag in (1, 2, 8):
        corr = (flat[:-lag] * flat[lag:]).mean().item()
        assert abs(corr) < 6 / flat.numel() ** 0.5, f"lag {lag}: correlation {corr}"


def test_fused_kernel_agrees_with_unfused_sum_within_one_ulp():
    pytest.importorskip("triton")
    kernel = kernel_for(torch.device("cuda"))
    w = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    std = torch.rand(256, device="cuda") * 0.05
    fused = kernel.perturbed(w, std, 1234, torch.float32)
    unfused = add_noise(w, kernel.noise(std, 4096, 1234, torch.float32))
    # fused: one rounding of w + z*std (the compiler may contract to an FMA); unfused: e rounded to
    # fp32 first, then the fp32 sum, then bf16 -- they may differ by a rounding step or two
    diff = (bits(fused).int() - bits(unfused).int()).abs()
    assert diff.max() <= 2 and (diff == 0).float().mean() > 0.99


def test_triton_and_torch_kernels_draw_independent_but_equally_distributed_noise(monkeypatch):
    model = _model(torch.float32, rows=64, cols=8192)
    stds = {}
    for kernel in ["auto", "torch"]:
        monkeypatch.setenv("FLATLORA_NOISE_KERNEL", kernel)
        opt = _opt(model, rho=0.1)
        clean = model[0].weight.detach().clone()
        with opt.perturbed():
            stds[kernel] = (model[0].weight.detach() - clean)
    a, b = stds["auto"], stds["torch"]
    assert not torch.equal(a, b)
    torch.testing.assert_close(a.std(dim=1), b.std(dim=1), rtol=0.06, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_virtual_mode_matches_inplace_on_gpu(dtype):
    m1 = _model(dtype, rows=256, cols=1024)
    m2 = copy.deepcopy(m1)
    o1, o2 = _opt(m1), _opt(m2, mode="virtual")
    x = torch.randn(8, 1024, device="cuda", dtype=dtype, requires_grad=True)
    for opt, model in [(o1, m1), (o2, m2)]:
        with opt.perturbed():
            loss = model(x).float().square().mean()
        loss.backward()
    for p1, p2 in zip(lora_parameters(m1), lora_parameters(m2)):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-3 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_shard_kernel_forms_the_fused_kernels_bits(dtype):
    """FSDP2 shards add the fused kernel's noise with torch ops: same fl(W + e) as the fused kernel, and
    a shard's rows of a block get that block's noise (the block is drawn whole)."""
    pytest.importorskip("triton")
    from flatlora_optim.noise import ShardNoiseKernel
    from flatlora_optim.restore import noise_dtype

    fused_kernel = kernel_for(torch.device("cuda"))
    shard = ShardNoiseKernel(fused_kernel)
    gen = torch.Generator(device="cuda").manual_seed(3)
    w = torch.randn(300, 2048, device="cuda", generator=gen).to(dtype)
    std = torch.rand(300, device="cuda", generator=gen) * 0.05
    seed = torch.tensor([987654321], device="cuda")
    work = noise_dtype(dtype)
    fused = fused_kernel.perturbed(w, std, seed, work)
    assert torch.equal(bits(shard.perturbed(w, std, seed, work)), bits(fused))
    part = std.clone()
    part[:100] = 0
    assert torch.equal(shard.noise(part, 2048, seed, work)[100:], shard.noise(std, 2048, seed, work)[100:])


def test_layer_kernel_gives_the_per_block_values():
    """The one-launch layer kernel (virtual mode) and the per-block kernel (in-place mode) agree bitwise; a transposed
    view (read in turned tiles) gives the bits of a contiguous copy of it."""
    pytest.importorskip("triton")
    from flatlora_optim.noise import chunk_bounds, rows_per_chunk

    kernel = kernel_for(torch.device("cuda"))
    rows = torch.randn(5000, 2048, device="cuda", dtype=torch.bfloat16).t()  # strided view, as GPT-2 Conv1D
    std = torch.rand(rows.shape[0], device="cuda") * 0.05
    seeds = [2**62 + 17 * b for b, _, _ in chunk_bounds(*rows.shape)]
    layer = kernel.perturbed_layer(rows, std, torch.tensor(seeds, device="cuda"), rows_per_chunk(rows.shape[1]), torch.float32)
    copied = kernel.perturbed_layer(rows.contiguous(), std, torch.tensor(seeds, device="cuda"), rows_per_chunk(rows.shape[1]), torch.float32)
    assert torch.equal(bits(layer), bits(copied))
    for block, start, end in chunk_bounds(*rows.shape):
        expected = kernel.perturbed(rows[start:end], std[start:end], seeds[block], torch.float32)
        assert torch.equal(bits(layer[start:end]), bits(expected))


@pytest.mark.parametrize("strided", [False, True])
def test_layer_launch_repeats_the_first_launchs_values_through_the_compiled_runner(monkeypatch, strided):
    """Virtual mode's backward forms ``W + e`` again through the compiled kernel's runner: same bits, new tensors,
    and the same bits again with the runner switched off (every call through Triton's launcher)."""
    pytest.importorskip("triton")
    from flatlora_optim.kernels import triton_noise as tn
    from flatlora_optim.noise import rows_per_chunk

    rows = torch.randn(2048, 5632, device="cuda", dtype=torch.bfloat16)
    rows = rows.t() if strided else rows
    std = torch.rand(rows.shape[0], device="cuda") * 0.05
    seeds = torch.arange(1, 1 + -(-rows.shape[0] // rows_per_chunk(rows.shape[1])), device="cuda") * 7919
    launch = tn.LayerLaunch(rows, std, seeds, rows_per_chunk(rows.shape[1]), torch.float32)
    first = launch()
    assert launch._runner is not None  # this Triton hands its compiled kernel back
    again = [launch() for _ in range(3)]
    assert all(torch.equal(bits(first), bits(a)) for a in again)
    assert len({a.data_ptr() for a in [first] + again}) == 4
    monkeypatch.setattr(tn, "_DIRECT_RUNNER", [False])
    assert torch.equal(bits(tn.LayerLaunch(rows, std, seeds, rows_per_chunk(rows.shape[1]), torch.float32)()), bits(first))
    assert torch.equal(bits(launch()), bits(first))
    assert not torch.equal(bits(first), bits(rows))


@pytest.mark.parametrize("strided", [False, True])
def test_a_later_steps_launch_takes_the_plan_with_its_own_tensors(monkeypatch, strided):
    """A later step's launch of a layer (new row stds, new seeds) goes straight to the runner compiled for the
    first: the bits are those of Triton's launcher with the new tensors, not the old ones."""
    pytest.importorskip("triton")
    from flatlora_optim.kernels import triton_noise as tn
    from flatlora_optim.noise import rows_per_chunk

    monkeypatch.setattr(tn, "_PLANS", tn._LaunchPlans())
    rows = torch.randn(2048, 5632, device="cuda", dtype=torch.bfloat16)
    rows = rows.t() if strided else rows
    blocks = -(-rows.shape[0] // rows_per_chunk(rows.shape[1]))

    def launch(step):
        std = torch.rand(rows.shape[0], device="cuda", generator=torch.Generator("cuda").manual_seed(step)) * 0.05
        seeds = (torch.arange(1, 1 + blocks, device="cuda") + 1000 * step) * 7919
        return tn.LayerLaunch(rows, std, seeds, rows_per_chunk(rows.shape[1]), torch.float32)

    first = launch(0)
    first()
    later = launch(1)
    assert later._runner is not None  # adopted the plan before its first call
    through_plan = later()
    monkeypatch.setattr(tn, "_DIRECT_RUNNER", [False])
    through_launcher = launch(1)
    assert through_launcher._runner is None
    assert torch.equal(bits(through_plan), bits(through_launcher()))
    assert not torch.equal(bits(through_plan), bits(first()))  # step 0's noise differs


def test_fused_row_std_kernel_matches_the_formula():
    pytest.importorskip("triton")
    from flatlora_optim.targets import Adapter

    kernel = kernel_for(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    # 16-bit weights with adapters of their type take the tensor-core form (ranks 17-32 with 8 warps); float32
    # weights, adapters of another type, and ranks above 32 the element-wise one
    cases = [(torch.bfloat16, torch.float32, False, (8, 4)), (torch.bfloat16, torch.bfloat16, False, (8, 4)),
             (torch.float16, torch.bfloat16, True, (8,)), (torch.bfloat16, torch.bfloat16, True, (16, 8)),
             (torch.float16, torch.float16, False, (32,)), (torch.bfloat16, torch.float32, True, (33,)),
             (torch.float16, torch.float32, False, (8,)),
             (torch.bfloat16, torch.bfloat16, False, (100,)), (torch.float32, torch.float32, True, (8, 4))]
    for dtype, adapter_dtype, transposed, ranks in cases:
        w = torch.randn(700, 3000, device="cuda", generator=gen).to(dtype)
        rows = w.t().contiguous().t() if transposed else w  # strided rows view
        adapters = [Adapter(str(k), torch.randn(r, 3000, device="cuda", generator=gen), torch.randn(700, r, device="cuda", generator=gen) * 0.2,
                            0.5 * (k + 1)) for k, r in enumerate(ranks)]
        A = torch.cat([a.A for a in adapters]).to(adapter_dtype)
        B = torch.cat([a.B * a.scaling for a in adapters], dim=1).to(adapter_dtype)
        full = rows.double() + B.double() @ A.double()
        got = kernel.row_std(rows, A, B, 0.1 / 3000**0.5)
        torch.testing.assert_close(got.double(), 0.1 * full.norm(dim=1) / 3000**0.5, rtol=1e-4, atol=0,
                                   msg=lambda m, case=(dtype, adapter_dtype, ranks): f"weights, adapters, ranks {case}: {m}")
    # float32 adapters whose values a float16 cannot hold on float16 weights, tiny ones on bfloat16 weights
    for dtype, a_scale in [(torch.float16, 1e5), (torch.bfloat16, 1e-6)]:
        w = torch.randn(300, 512, device="cuda", generator=gen).to(dtype)
        A = torch.randn(8, 512, device="cuda", generator=gen) * a_scale
        B = torch.randn(300, 8, device="cuda", generator=gen) * (0.1 / a_scale)
        full = w.double() + B.double() @ A.double()
        torch.testing.assert_close(kernel.row_std(w, A, B, 1.0).double(), full.norm(dim=1), rtol=1e-4, atol=0)
    inf_row = torch.ones(3, 64, device="cuda")
    inf_row[1, 0] = float("inf")
    assert kernel.row_std(inf_row, None, None, 1.0).tolist()[1] == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_row_stds_sum_the_weights_squares_in_float32(dtype):
    """The tensor-core form (16-bit weights, adapters of their type) with ``B = 0``: the std is the weights' own row
    norm, a float32 sum of exact squares, within 2e-6 relative of float64 over 3000 columns (seed 0). The diagonal of
    a tensor-core ``W W^T``, used before, was off by 4.6e-6 (bf16) and 8.7e-6 (fp16) here on an H200."""
    pytest.importorskip("triton")
    kernel = kernel_for(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(700, 3000, device="cuda", generator=gen).to(dtype)
    A = torch.randn(8, 3000, device="cuda", generator=gen).to(dtype)
    B = torch.zeros(700, 8, device="cuda", dtype=dtype)
    torch.testing.assert_close(kernel.row_std(w, A, B, 1.0).double(), w.double().norm(dim=1), rtol=2e-6, atol=0)


def test_row_stds_of_a_layer_do_not_depend_on_the_other_layers_ranks():
    """A layer's stds take the same form, and so the same bits, alone or next to layers of other ranks (each
    rank class has its own launch): ranks 8, 24 and 40 with bfloat16 adapters, 8 with float32 ones."""
    pytest.importorskip("triton")
    from flatlora_optim.kernels.layer_table import LayerTable

    kernel = kernel_for(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(3)
    weights = [torch.randn(200, 384, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4)]
    adapters = [(torch.randn(r, 384, device="cuda", generator=gen).to(t), torch.randn(200, r, device="cuda", generator=gen).to(t) * 0.1, 2.0)
                for r, t in [(8, torch.bfloat16), (24, torch.bfloat16), (40, torch.bfloat16), (8, torch.float32)]]
    together = torch.empty(800, device="cuda")
    kernel.row_stds(LayerTable(weights), adapters, [0.05] * 4, together)
    for k, (w, adapter) in enumerate(zip(weights, adapters)):
        alone = torch.empty(200, device="cuda")
        kernel.row_stds(LayerTable([w]), [adapter], [0.05], alone)
        assert torch.equal(alone, together[200 * k: 200 * (k + 1)]), f"layer {k} (rank {adapter[0].shape[0]})"


@pytest.mark.parametrize("turned", [False, True], ids=["row-major tiles", "transposed tiles"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_fused_exact_codec_restores_every_bit(dtype, scale, turned, monkeypatch):
    """Whole-layer fused codec: zeros, subnormals, inf/NaN, huge values and a transposed view (in the transposed
    tiles too)."""
    pytest.importorskip("triton")
    from flatlora_optim.kernels import layer_table
    from flatlora_optim.noise import chunk_bounds, rows_per_chunk

    monkeypatch.setattr(layer_table, "TRANSPOSED_TILES", turned)

    kernel = kernel_for(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(1)
    w = (torch.randn(3000, 1500, device="cuda", generator=gen) * scale).to(dtype)
    w.view(-1)[::97] = 0
    w.view(-1)[5:9] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e-7], device="cuda").to(dtype)
    # NaNs with payloads (quiet and signalling in bfloat16, both signs; NaNs in float16 too): their exact patterns come back
    w.view(torch.int16).view(-1)[9:13] = torch.tensor([0x7FA1, -61, 0x7F81, 0x7E01], dtype=torch.int16, device="cuda")
    for rows in (w, w.t()):
        before = bits(rows)
        std = torch.rand(rows.shape[0], device="cuda", generator=gen) * 0.3 * scale
        seeds = torch.tensor([11 + b for b, _, _ in chunk_bounds(*rows.shape)], device="cuda")
        record = kernel.exact_perturb(rows, std, seeds, rows_per_chunk(rows.shape[1]))
        after = bits(rows)
        assert (after != before).float().mean() > 0.5
        copy = rows.clone()
        kernel.exact_restore(copy, std, seeds, rows_per_chunk(rows.shape[1]), record)
        assert torch.equal(bits(copy), before) and torch.equal(bits(rows), after)
        kernel.exact_restore(rows, std, seeds, rows_per_chunk(rows.shape[1]), record)
        assert torch.equal(bits(rows), before)
        assert record.nbytes() < 0.12 * rows.numel() * rows.element_size()
        # the perturbed values are the virtual-mode values (same kernel stream, no FMA contraction)
        expected = kernel.perturbed_layer(rows, std, seeds, rows_per_chunk(rows.shape[1]), torch.float32)
        assert torch.equal(bits(expected), after)


@pytest.mark.parametrize("turned", [False, True], ids=["row-major tiles", "transposed tiles"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_codec_restores_layers_together_alone_and_after_overflow(dtype, turned, monkeypatch):
    """Several layers in one launch; one layer restored into a copy, and into copies laid out the other way
    round; buffers too small on purpose (the tiles that do not fit are left clean, undone and redone with bigger
    buffers); the transposed tiles on or off."""
    pytest.importorskip("triton")
    from flatlora_optim.kernels import layer_table
    from flatlora_optim.kernels.layer_table import LayerTable

    monkeypatch.setattr(layer_table, "TRANSPOSED_TILES", turned)

    kernel = kernel_for(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(3)
    shapes = [(500, 1700), (336, 1300), (2000, 900), (300, 1024)]
    weights = [(torch.randn(m, n, device="cuda", generator=gen) * 0.02).to(dtype) for m, n in shapes]
    strided = (torch.randn(200, 2048, device="cuda", generator=gen) * 0.02).to(dtype)[:, ::2]
    rows = [weights[0], weights[1].t(), weights[2], weights[3], strided]
    # fan-in not a multiple of 8, a transposed view of fan-in 8k (strided rows, or its own tiles), aligned (wide loads),
    # strided rows of 8k
    assert sorted(LayerTable(rows).variants) == ([0, 1, 3, 5] if turned else [0, 1, 3])
    before = [bits(r).clone() for r in rows]
    for capacity in (None, (60, 3)):
        table = LayerTable(rows)
        table.codec_capacity = capacity
        std = torch.rand(table.total_rows, device="cuda", generator=gen) * 0.005
        seeds = torch.arange(table.total_blocks, dtype=torch.int64, device="cuda") * 7919 + 3
        record = kernel.exact_perturb_layers(table, std, seeds)
        assert all((bits(r) != b).float().mean() > 0.5 for r, b in zip(rows, before))
        assert (record.bounds == -1).sum().item() == 0  # the redo left no tile unperturbed (-2: a tile without rows)
        copy = rows[1].clone()
        kernel.exact_restore_one(table, 1, copy, std, seeds, record)
        assert torch.equal(bits(copy), before[1])
        for index, other in [(1, rows[1].contiguous()), (3, rows[3].t().contiguous().t())]:  # the other layout: other tiles
            kernel.exact_restore_one(table, index, other, std, seeds, record)
            assert torch.equal(bits(other), before[index]), index
        kernel.exact_restore_layers(table, std, seeds, record)
        assert all(torch.equal(bits(r), b) for r, b in zip(rows, before))


def _compiled_variants(jit_function) -> int:
    """How many compiled forms Triton holds for ``jit_function`` (all devices)."""
    return sum(len(cache[0]) for cache in jit_function.device_caches.values())


def test_codec_does_not_recompile_when_buffer_sizes_change():
    """Capacities and slot counts change from step to step; a new value must reuse the compiled
    codec (each recompile used to stall a training step for seconds)."""
    pytest.importorskip("triton")
    from flatlora_optim.kernels import triton_noise
    from flatlora_optim.kernels.layer_table import LayerTable

    kernel = kernel_for(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(5)
    w = (torch.randn(700, 2048, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    w.view(-1)[:3] = 0.0  # exceptions (offsets past a byte), so that the exceptions pass runs too
    before = bits(w).clone()
    counts = []
    # capacities that fall in every class Triton specialises integers on (1, multiples of 16, others)
    for capacity in (None, (4096, 16), (4099, 17), (8192, 1), (9001, 33)):
        table = LayerTable([w])
        table.codec_capacity = capacity
        std = torch.full((table.total_rows,), 1e-3, device="cuda")
        seeds = torch.arange(table.total_blocks, dtype=torch.int64, device="cuda") + 11
        record = kernel.exact_perturb_layers(table, std, seeds)
        assert record.n_exceptions >= 3
        kernel.exact_restore_layers(table, std, seeds, record)
        assert torch.equal(bits(w), before)
        counts.append((_compiled_variants(triton_noise._codec_kernel), _compiled_variants(triton_noise._exceptions_kernel)))
    assert counts[1:] == counts[:1] * (len(counts) - 1), counts


def test_restore_kernels_are_compiled_before_the_first_perturb_pass(monkeypatch):
    """A restore never compiles: were its first launch to compile, a Ctrl-C (which also kills the
    ``ptxas`` child) would make it fail with the weights still perturbed. Compiles are made to fail
    once the perturb pass has run; the restore must still put every bit back."""
    pytest.importorskip("triton")
    from flatlora_optim.kernels import triton_noise

    kernel = kernel_for(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(6)
    w = (torch.randn(300, 1024, device="cuda", generator=gen) * 0.02).to(torch.float16)
    w.view(-1)[:2] = 0.0  # exceptions, so that the exceptions pass runs too
    before = bits(w).clone()
    jits = (triton_noise._codec_kernel, triton_noise._exceptions_kernel)
    caches = [cache[0] for jit in jits for cache in jit.device_caches.values()]
    saved = [dict(cache) for cache in caches]
    for cache in caches:  # forget what earlier tests compiled: this table's first pass compiles afresh
        cache.clear()
    try:
        _perturb_then_restore_without_compiling(monkeypatch, kernel, jits, w, before)
    finally:
        for cache, content in zip(caches, saved):
            cache.update(content)


def _perturb_then_restore_without_compiling(monkeypatch, kernel, jits, w, before):
    from flatlora_optim.kernels.layer_table import LayerTable

    table = LayerTable([w])
    std = torch.full((table.total_rows,), 1e-3, device="cuda")
    seeds = torch.arange(table.total_blocks, dtype=torch.int64, device="cuda") + 3
    record = kernel.exact_perturb_layers(table, std, seeds)
    assert record.n_exceptions >= 2 and not torch.equal(bits(w), before)

    def interrupted_compile(*args, **kwargs):
        raise KeyboardInterrupt("ptxas killed by Ctrl-C")

    for jit in jits:
        monkeypatch.setattr(jit, "_do_compile", interrupted_compile)
    kernel.exact_restore_layers(table, std, seeds, record)
    assert torch.equal(bits(w), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backup_restore_takes_the_step_wide_pass_with_the_codecs_values(dtype):
    """Backup restore on 16-bit weights: one grouped pass writes the same ``W + e`` as the exact
    codec, a clean ``state_dict`` while perturbed, and the copies put every bit back."""
    pytest.importorskip("triton")
    import flatlora_optim.perturbation as perturbation

    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(*[LoRALinear(nn.Linear(i, o), r=4, alpha=8) for i, o in [(1024, 700), (700, 1030), (1030, 256)]])
    with torch.no_grad():
        for layer in model:
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    model = model.to(device="cuda", dtype=dtype)
    before = [bits(layer.weight).clone() for layer in model]
    x = torch.randn(6, 1024, device="cuda", dtype=dtype)
    formed = {}
    for restore in ("exact", "backup"):
        # lr 0: both runs see the same adapters, hence the same row stds and noise at each step
        opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.0), model, rho=0.05, schedule="constant", restore=restore, seed=7)
        for step in range(3):
            with opt.perturbed():
                assert all(p.blocks[0][0] == perturbation._GROUPED for p in opt._perturbations)
                noisy = [bits(layer.weight).clone() for layer in model]
                if restore == "backup":
                    assert all(torch.equal(a, b) for a, b in zip(noisy, formed[step]))
                else:
                    formed[step] = noisy
                clean = model.state_dict()
                assert all(torch.equal(bits(clean[f"{k}.weight"]), b) for k, b in enumerate(before))
                loss = model(x).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            assert all(torch.equal(bits(layer.weight), b) for layer, b in zip(model, before))
        weight_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in model)
        assert (opt.peak_restore_bytes >= weight_bytes) == (restore == "backup")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device (run on a two-GPU machine)")
@pytest.mark.parametrize("mode,restore", [("inplace", "exact"), ("inplace", "backup"), ("virtual", "exact")])
def test_a_model_on_a_gpu_that_is_not_the_current_one(mode, restore):
    """Triton launches on the current device: a model moved to cuda:1 while cuda:0 is current must train as it
    does with cuda:1 current (same LoRA values, bitwise) and be restored bitwise."""
    pytest.importorskip("triton")
    x = torch.randn(64, 8192, generator=torch.Generator().manual_seed(1)).to("cuda:1", torch.bfloat16)
    base = _model(torch.bfloat16, rows=256, cols=8192).to("cuda:1")  # built once: its bias and A come from the global RNG
    results = []
    for current in (0, 1):
        model = copy.deepcopy(base)
        weight = model[0].weight
        before = bits(weight)
        opt = _opt(model, mode=mode, restore=restore)
        with torch.cuda.device(current):
            for _ in range(2):
                with opt.perturbed():
                    loss = model(x).float().pow(2).mean()
                    if mode == "inplace":
                        assert not torch.equal(bits(weight), before)  # the noise is in the weight on cuda:1
                loss.backward()
                opt.step()
                opt.zero_grad()
            torch.cuda.synchronize(1)
        assert torch.equal(bits(weight), before)
        results.append([bits(p.detach()) for p in lora_parameters(model)])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("mode", ["inplace", "virtual"])
@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant"])
def test_gradient_checkpointing_on_the_gpu_gives_the_grads_at_the_noisy_weights(mode, checkpointing):
    """The CPU test of gradient checkpointing (test_virtual.py) on CUDA, bf16, through the Triton kernels: the LoRA
    grads of a checkpointed step are those of the same step without checkpointing (tolerance 1e-2 relative, 1e-5
    absolute; rho 0.2 moves them far more), and the weights come back bitwise."""
    import peft
    import transformers

    def grads(checkpoint, flat=True):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2)
        model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        model = model.to("cuda", torch.bfloat16).train()
        if checkpoint:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
            model.enable_input_require_grads()
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
        if not flat:  # plain LoRA: the grads at the clean weights
            model(input_ids=ids, labels=ids).loss.backward()
            return [p.grad.float() for p in model.parameters() if p.requires_grad]
        frozen = {n: bits(p).clone() for n, p in model.named_parameters() if not p.requires_grad}
        opt = FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0), model, mode=mode, rho=0.2,
                       schedule="constant", seed=5)
        with opt.perturbed():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert not opt.is_perturbed
        assert all(torch.equal(bits(p), frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
        return [p.grad.float() for p in model.parameters() if p.requires_grad]

    got, expected = grads(True), grads(False)
    for g, e in zip(got, expected):  # the same kernels run again in the recompute; attention's backward may reorder sums
        torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-5)
    clean = grads(False, flat=False)
    assert any(not torch.allclose(c, e, rtol=1e-2, atol=1e-5) for c, e in zip(clean, expected))  # the noise shows at that tolerance


def _three_layers(dtype=torch.bfloat16):
    layers = [LoRALinear(nn.Linear(n, m), r=8, alpha=16) for n, m in [(1024, 768), (768, 2048), (2048, 512)]]
    for layer in layers:
        nn.init.normal_(layer.lora_B, std=0.05)
    return nn.Sequential(*layers).to(device="cuda", dtype=dtype)


def _step(model, opt, x):
    with opt.perturbed():
        loss = model(x).float().square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def _step_watching_syncs(model, opt, x, watched, inside) -> None:
    """One step under ``set_sync_debug_mode(watched)``, off only while ``inside()`` looks at the perturbed weights."""
    torch.cuda.set_sync_debug_mode(watched)
    try:
        with opt.perturbed():
            torch.cuda.set_sync_debug_mode(0)
            inside()
            torch.cuda.set_sync_debug_mode(watched)
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_in_place_exact_steps_after_the_first_do_not_wait_for_the_device():
    """The codec's counts of a training step's pass are read later, not waited for after the pass: from the third
    step on, the whole step (perturb, forward, backward and its restore, optimizer step) makes no synchronizing call
    that ``set_sync_debug_mode('error')`` sees (it raises on ``tolist()``, the former wait; it is off only while the
    test itself compares bits). The restore's read of the counts waits on a CUDA event, which that mode does not
    flag: it is an event the device passed before the forward, so the wait does not idle the device."""
    pytest.importorskip("triton")
    model = _three_layers()
    before = [bits(layer.weight) for layer in model]
    opt = _opt(model)
    x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    for step in range(5):
        def perturbed():
            assert all(not torch.equal(bits(layer.weight), b) for layer, b in zip(model, before))

        _step_watching_syncs(model, opt, x, "error" if step >= 2 else 0, perturbed)
        assert all(torch.equal(bits(layer.weight), b) for layer, b in zip(model, before)), step


def test_a_record_too_small_leaves_tiles_clean_restores_exactly_and_warns_naming_the_step():
    """Buffers made too small on purpose (as after a sharp change of the weights): the step's tiles that do
    not fit carry no noise, the restore is exact, a RuntimeWarning names the step, and the next step's
    buffers fit (no warning, every tile perturbed)."""
    pytest.importorskip("triton")
    model = _three_layers()
    before = [bits(layer.weight) for layer in model]
    opt = _opt(model)
    x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    _step(model, opt, x)
    tables = [t for t in opt._perturber._tables._tables.values() if t.codec_capacity is not None]  # the codec's (not the stds')
    assert tables
    for table in tables:
        table.codec_capacity = (3, 2)
    with pytest.warns(RuntimeWarning, match=r"Flat-LoRA step 1: the exact-restore record was too small .* tiles of 2048 weights carried no noise"):
        with opt.perturbed():
            unchanged = sum(int((bits(layer.weight) == b).sum()) for layer, b in zip(model, before))
            loss = model(x).float().square().mean()
        torch.cuda.synchronize()  # the pass's counts are on the host by the restore, which reads them then
        loss.backward()
    assert unchanged > 0.5 * sum(layer.weight.numel() for layer in model)  # most tiles left clean
    assert all(torch.equal(bits(layer.weight), b) for layer, b in zip(model, before))
    opt.step()
    opt.zero_grad()
    with opt.perturbed():
        unchanged = sum(int((bits(layer.weight) == b).sum()) for layer, b in zip(model, before))
        loss = model(x).float().square().mean()
    loss.backward()
    opt.step()
    assert unchanged < 0.5 * sum(layer.weight.numel() for layer in model)
    assert all(torch.equal(bits(layer.weight), b) for layer, b in zip(model, before))


def _tiny_llama(checkpointing: str = "none"):
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=4, lora_alpha=8, target_modules=projections))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model = model.to("cuda", torch.bfloat16).train()
    if checkpointing != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    return model


@pytest.mark.parametrize("checkpointing,early", [("none", 11), ("non-reentrant", 14), ("reentrant", 0)])
def test_host_restore_gives_exact_restores_gradients_and_writes_layers_back_during_the_backward(monkeypatch, checkpointing, early):
    """restore='host' on a bf16 Llama through the fused pass: each step's LoRA gradients are exact restore's (the same
    W + e is written; tolerance 1e-3 relative, 1e-6 absolute, where rho 0.2 moves them by more than 1e-2), the weights
    come back bitwise, and the layers are written back during the backward: all 14 but layer 0's q, k and v (their
    input needs no gradient) without checkpointing, all with non-reentrant checkpointing (the input requires grad),
    none with reentrant checkpointing (its forward runs without grad: the layers wait for the end)."""
    pytest.importorskip("triton")
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    results = {}
    for restore in ("exact", "host"):
        model = _tiny_llama(checkpointing)
        frozen = {n: bits(p).clone() for n, p in model.named_parameters() if not p.requires_grad}
        opt = FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01), model, rho=0.2, schedule="constant",
                       seed=5, restore=restore)
        written_early = []
        real = opt._perturber.restore_early
        monkeypatch.setattr(opt._perturber, "restore_early", lambda p, seen=written_early, real=real: (seen.append(p.target.name), real(p)))
        results[restore] = []
        for step in range(3):
            written_early.clear()
            with opt.perturbed():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            assert not opt.is_perturbed
            assert all(torch.equal(bits(p), frozen[n]) for n, p in model.named_parameters() if not p.requires_grad), (restore, step)
            results[restore].append([p.grad.float().clone() for p in model.parameters() if p.requires_grad])
            if restore == "host":
                assert len(written_early) == early, (step, written_early)
            opt.step()
            opt.zero_grad()
    for step, (a, b) in enumerate(zip(results["exact"], results["host"])):
        for g, h in zip(a, b):
            torch.testing.assert_close(h, g, rtol=1e-3, atol=1e-6, msg=f"step {step}")


def test_final_backward_writes_held_noise_back_during_the_last_backward_on_cuda(monkeypatch):
    """Gradient accumulation with the noise held by perturb(), the last micro-batch's backward in final_backward(): on
    CUDA (fused pass, copies back on the side stream) host restore writes the 11 layers whose input needs a gradient
    back during that backward and none during the first; gradients as exact restore's (tolerance as above) and the
    weights bitwise after each step."""
    pytest.importorskip("triton")
    ids = [torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(k)).cuda() for k in range(2)]
    results = {}
    for restore in ("exact", "host"):
        model = _tiny_llama("none")
        frozen = {n: bits(p).clone() for n, p in model.named_parameters() if not p.requires_grad}
        opt = FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01), model, rho=0.2, schedule="constant",
                       seed=5, restore=restore)
        written_early, micro = [], [0]  # the micro-batch of each early write-back
        real = opt._perturber.restore_early
        monkeypatch.setattr(opt._perturber, "restore_early", lambda p, seen=written_early, now=micro, real=real: (seen.append(now[0]), real(p)))
        results[restore] = []
        for step in range(2):
            written_early.clear()
            opt.perturb()
            for micro[0] in range(2):
                loss = model(input_ids=ids[micro[0]], labels=ids[micro[0]]).loss
                with opt.final_backward() if micro[0] == 1 else contextlib.nullcontext():
                    loss.backward()
            assert not opt.is_perturbed
            assert all(torch.equal(bits(p), frozen[n]) for n, p in model.named_parameters() if not p.requires_grad), (restore, step)
            results[restore].append([p.grad.float().clone() for p in model.parameters() if p.requires_grad])
            if restore == "host":
                assert written_early == [1] * 11, (step, written_early)
            opt.step()
            opt.zero_grad()
    for step, (a, b) in enumerate(zip(results["exact"], results["host"])):
        for g, h in zip(a, b):
            torch.testing.assert_close(h, g, rtol=1e-3, atol=1e-6, msg=f"step {step}")


def test_host_restore_holds_no_device_memory_and_makes_no_sync_after_the_first_step():
    """restore='host': while perturbed the device holds only the row stds and seeds (under 1% of the weights' bytes),
    and from the second step on a whole step makes no synchronizing call (the copies back are queued on a side stream,
    from pinned memory)."""
    pytest.importorskip("triton")
    model = _three_layers()
    before = [bits(layer.weight) for layer in model]
    weight_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in model)
    opt = _opt(model, restore="host")
    x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    for step in range(4):
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        held = []
        def look(held=held, allocated=allocated):
            held.append(torch.cuda.memory_allocated() - allocated)

        _step_watching_syncs(model, opt, x, "error" if step >= 1 else 0, look)
        assert held[0] < 0.01 * weight_bytes, (step, held, weight_bytes)
        assert all(torch.equal(bits(layer.weight), b) for layer, b in zip(model, before)), step


def test_host_restore_takes_a_weight_written_between_steps_anew():
    """A weight written in place between steps (its version counter moves) is copied to the host again before its
    noise goes in, and restored to its new bits; the other layers' copies are kept."""
    pytest.importorskip("triton")
    model = _three_layers(torch.float16)
    opt = _opt(model, restore="host")
    x = torch.randn(16, 1024, device="cuda", dtype=torch.float16)
    _step(model, opt, x)
    _step(model, opt, x)
    assert opt._perturber.host_copies.taken == 3
    with torch.no_grad():
        model[1].weight.mul_(0.5)
    written = [bits(layer.weight) for layer in model]
    _step(model, opt, x)
    assert opt._perturber.host_copies.taken == 4
    assert all(torch.equal(bits(layer.weight), w) for layer, w in zip(model, written))


def test_host_restore_puts_the_noise_back_when_a_layer_written_back_early_computes_again():
    """CUDA: the first layer's copy back is queued by the first backward while another graph keeps the noise in; a
    new forward of that layer waits for the copy to land, puts its noise back (the one-layer pass) and computes at
    W + e: the gradients are exact restore's (tolerance 1e-3 relative, 1e-6 absolute) and the weights come back bitwise."""
    pytest.importorskip("triton")
    results = {}
    for restore in ("exact", "host"):
        torch.manual_seed(0)  # the same model both times
        model = _three_layers()
        before = [bits(layer.weight) for layer in model]
        opt = _opt(model, restore=restore, seed=2)
        gen = torch.Generator(device="cuda").manual_seed(0)
        xa, xc = (torch.randn(16, 1024, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        hidden = torch.randn(16, 768, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
        with opt.perturbed():
            partial = model[1:](hidden).float().square().mean()
            whole = model(xa).float().square().mean()
        whole.backward()
        again = model(xc).float().square().mean()
        partial.backward()
        again.backward()
        results[restore] = [p.grad.float().clone() for p in model.parameters() if p.requires_grad]
        assert all(torch.equal(bits(layer.weight), b) for layer, b in zip(model, before)), restore
    for g, h in zip(results["exact"], results["host"]):
        torch.testing.assert_close(h, g, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("convert", ["half", "float"])
def test_virtual_mode_backward_after_a_conversion_forms_the_forwards_w_plus_e_on_gpu(monkeypatch, convert):
    """The GPU form of test_virtual's conversion test: the layer launch kept the parameter, whose ``.data`` a conversion
    swaps, so the backward's launch read the converted weight (another dtype than the one it was compiled for). Checked
    on the formed ``W + e`` itself: plain autograd's LoRA gradients move with a conversion too (it reads the converted
    adapter parameters), so the gradients cannot be compared with an unconverted run here."""
    from flatlora_optim.perturbation import Perturber

    formed = []
    original = Perturber.former

    def recording(self, p, weight):
        former = original(self, p, weight)
        return lambda: formed.append(former()) or formed[-1]

    monkeypatch.setattr(Perturber, "former", recording)
    model = _model(torch.bfloat16, rows=256, cols=1024)
    clean = bits(model[0].weight)
    opt = _opt(model, mode="virtual")
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(0), requires_grad=True)
    with opt.perturbed():
        loss = model(x).float().square().mean()
    getattr(model, convert)()
    loss.backward()
    assert len(formed) == 2, "the layer's W + e is formed once in forward and once in backward"
    forward, backward = formed
    assert backward.dtype == torch.bfloat16 and torch.equal(bits(backward), bits(forward))
    assert not torch.equal(bits(forward), clean)  # the noise is in what was formed
