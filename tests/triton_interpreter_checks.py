"""The CUDA kernels' logic, run on the CPU by Triton's interpreter (``TRITON_INTERPRET=1``).

CI has no GPU, so ``tests/test_gpu.py`` skips there; this script runs the same fused exact codec,
row-std kernel and noise kernel through Triton's interpreter instead, on CPU tensors, so that every
change to their logic is checked on every CI run: bitwise restore (grouped, one layer alone, after
a forced buffer overflow, on zeros/inf/NaN/subnormals/huge values, on transposed and odd-width
views), the codec writing exactly the noise kernel's ``fl(W + e)``, and the row stds against
their formula. It does not check speed, nor the compiled code's own behaviour (the GPU tests do).

Run by ``tests/test_triton_interpreter.py`` in a subprocess, because the interpreter is chosen
when the kernels are defined (the environment variable must be set before the import).
"""

from __future__ import annotations

import math
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from interpreter_compat import patch_interpreter  # noqa: E402

patch_interpreter()

from flatlora_optim.kernels import triton_noise as tn  # noqa: E402
from flatlora_optim.kernels.layer_table import DTYPE_CODES, LayerTable, transposed_tiles  # noqa: E402
from flatlora_optim.kernels.triton_noise import TritonNoiseKernel  # noqa: E402
from flatlora_optim.noise import rows_per_chunk  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import assert_standard_normal, normal_sample_report  # noqa: E402

KERNEL = TritonNoiseKernel()
SPECIAL = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 6.0e4, -6.0e4, 2.0**-14, -(2.0**-24), 1.0e-7]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def layers(shapes, dtype, generator, transposed=(), special=False):
    """Weights of ``shapes`` (``m x n`` rows; a transposed view for the indices in ``transposed``)."""
    rows = []
    for index, (m, n) in enumerate(shapes):
        if index in transposed:
            rows.append((torch.randn(n, m, generator=generator) * 0.02).to(dtype).t())
        else:
            rows.append((torch.randn(m, n, generator=generator) * 0.02).to(dtype))
    if special:
        first = rows[0].reshape(-1)
        first[: len(SPECIAL)] = torch.tensor(SPECIAL[: first.numel()], dtype=dtype)
    return rows


def perturb_and_restore(rows, std_scale, generator, capacity=None):
    """Perturb ``rows`` together, restore one into a copy, then all; return the record's counts."""
    before = [bits(r).clone() for r in rows]
    table = LayerTable(rows)
    table.codec_capacity = capacity
    std = torch.rand(table.total_rows, generator=generator) * std_scale
    seeds = torch.arange(table.total_blocks, dtype=torch.int64) * 7919 + 3
    record = KERNEL.exact_perturb_layers(table, std, seeds)
    assert (record.bounds == -1).sum().item() == 0, "a tile was left unperturbed after the redo"  # -2: a tile without rows
    # (a handful of elements may all round back to themselves under small noise)
    assert any((bits(r) != b).any() for r, b in zip(rows, before)) or std_scale == 0 or sum(r.numel() for r in rows) < 64, \
        "nothing was perturbed"
    last = len(rows) - 1
    copy = rows[last].clone()
    KERNEL.exact_restore_one(table, last, copy, std, seeds, record)
    assert torch.equal(bits(copy), before[last]), "one layer restored alone differs"
    for index in sorted({0, last}):  # into a copy laid out the other way (row-major against transposed): other tiles
        r = rows[index]
        m, n = r.shape
        if r.stride(0) == 1 and m > 1:
            other = torch.empty((m, n), dtype=r.dtype).copy_(r)
        else:
            other = torch.empty((n, m), dtype=r.dtype).t().copy_(r)
        KERNEL.exact_restore_one(table, index, other, std, seeds, record)
        assert torch.equal(bits(other), before[index]), f"layer {index} restored alone into another layout differs"
    KERNEL.exact_restore_layers(table, std, seeds, record)
    for index, (r, b) in enumerate(zip(rows, before)):
        wrong = (bits(r) != b).sum().item()
        assert wrong == 0, f"layer {index}: {wrong} elements differ after restore"
    return table.codec_capacity


def check_examples() -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        # fan-ins not a multiple of 8 (per-element counters: 1030, and 900, a multiple of 4), a transposed view with
        # a fan-in of 8k (eight normals per counter; strided rows, or its own tiles with the transposed tiles on),
        # aligned rows, strided rows of 8k, special values
        rows = layers([(9, 1030), (7, 336), (6, 900), (5, 1024)], dtype, gen, transposed=(1,), special=True)
        rows.append((torch.randn(7, 672, generator=gen) * 0.02).to(dtype)[:, ::2])
        for turned in (False, True):
            with transposed_tiles(turned):
                assert sorted(LayerTable(rows).variants) == ([0, 1, 3, 5] if turned else [0, 1, 3])
                perturb_and_restore(rows, 0.002, gen)
                perturb_and_restore(rows, 0.002, gen, capacity=(3, 2))  # too small on purpose: undone and redone
    # the codec writes exactly the noise kernel's fl(W + e) (same seeds, same Philox positions), in transposed
    # tiles too (fan-ins 904 and 1030: eight normals per counter and one per element)
    for shape, turned in [((12, 900), False), ((10, 1030), False), ((300, 904), True), ((40, 1030), True)]:
        w = layers([shape], torch.float16, gen, transposed=(0,) if turned else ())[0]
        with transposed_tiles(turned):
            table = LayerTable([w])
        assert bool(table.variants[0] & 4) == turned
        std = torch.rand(table.total_rows, generator=gen) * 0.002
        seeds = torch.arange(table.total_blocks, dtype=torch.int64) * 7919 + 3
        expected = KERNEL.perturbed_layer(w.clone(), std, seeds, rows_per_chunk(w.shape[1]), torch.float32)
        KERNEL.exact_perturb_layers(table, std, seeds)
        assert torch.equal(bits(expected), bits(w)), f"codec and noise kernel disagree on {shape}"
    # row stds: sigma / sqrt(n) * ||W_i + s (B A)_i|| for layers with and without adapters
    # float16 rows (one a transposed view) and float32 rows, which sum in float64 over narrower column steps
    # the tensor-core form: float16 layers with float16 adapters (rank 8: R = 16), a bfloat16 layer with bfloat16
    # adapters (rank 24: R = 32); the element-wise form: float32 weights (rank 20: the rank loop is not unrolled),
    # float16 weights with float32 adapters, rank 40
    weights = [torch.randn(40, 700).half(), torch.randn(33, 512).half().t(), torch.randn(24, 1024).half(), torch.randn(20, 300),
               torch.randn(48, 320).half(), torch.randn(70, 256).bfloat16(), torch.randn(36, 128).half(), torch.randn(96, 70).bfloat16().t(),
               torch.randn(50, 30).t()]
    adapters = [(torch.randn(8, w.shape[1]).half(), torch.randn(w.shape[0], 8).half(), 2.0) for w in weights]
    adapters[1] = None
    adapters[3] = (torch.randn(20, 300).half(), torch.randn(20, 20).half(), 2.0)
    adapters[4] = (torch.randn(24, 320) / 3, torch.randn(48, 24) / 3, 0.5)
    adapters[5] = ((torch.randn(24, 256) / 3).bfloat16(), (torch.randn(70, 24) / 3).bfloat16(), 0.5)
    adapters[6] = (torch.randn(40, 128).half(), torch.randn(36, 40).half() / 4, 1.0)
    adapters[7] = (torch.randn(8, 96).bfloat16(), torch.randn(70, 8).bfloat16(), 2.0)  # transposed views with adapters: tensor cores,
    adapters[8] = (torch.randn(8, 50), torch.randn(30, 8), 2.0)  # and float32 element-wise
    expected = []
    for w, adapter in zip(weights, adapters):
        full = w.float() + (0 if adapter is None else adapter[2] * (adapter[1].float() @ adapter[0].float()))
        expected.append(full.norm(dim=1) * 0.1)
    for turned in (False, True):  # the transposed views' layout code differs; their rows are read as strided rows either way
        with transposed_tiles(turned):
            table = LayerTable(weights)
        assert any(v & 4 for v in table.variants) == turned, table.variants
        out = torch.empty(table.total_rows)
        KERNEL.row_stds(table, adapters, [0.1] * len(weights), out)
        torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=0)
    forms = set()  # the kernel form each layer takes (decided by its own types and rank)
    for w, adapter in zip(weights, adapters):
        ab = w.dtype if adapter is None else adapter[0].dtype
        forms.update((dot, r) for dot, r, _ in tn._row_std_forms([0 if adapter is None else adapter[0].shape[0]], DTYPE_CODES[w.dtype],
                                                                  DTYPE_CODES[ab]))
    assert forms == {(True, 16), (True, 32), (False, 16), (False, 8)}, f"row-std kernel forms covered: {forms}"


@triton.jit
def _philox_words(out_ptr, seed, n_counters, BLOCK: tl.constexpr):
    """The four raw 32-bit Philox words of each counter (Triton's ``randint4x``, 10 rounds)."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i1, i2, i3, i4 = tl.randint4x(seed, c)
    mask = c < n_counters
    tl.store(out_ptr + 4 * c, i1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(out_ptr + 4 * c + 1, i2.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(out_ptr + 4 * c + 2, i3.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(out_ptr + 4 * c + 3, i4.to(tl.int64) & 0xFFFFFFFF, mask=mask)


def _reference_normals(seed: int, n: int) -> torch.Tensor:
    """The stream's definition, element by element, written apart from the kernels: ``z[L]`` is lane ``L % 8``
    of counter ``L // 8``; word ``k`` of a counter gives lanes ``2k`` and ``2k + 1``: a radius from its top 20
    bits, ``sqrt(-2 ln(1 - u))`` with ``u = top / 2**20``, and an angle ``2 pi ((low + 1/2) / 2**12) - pi`` from its low 12
    bits (the midpoints of 4096 steps), then ``radius * cos(angle)`` and ``radius * sin(angle)`` (float64 here; the
    kernel works in float32)."""
    counters = -(-n // 8)
    words = torch.empty(4 * counters, dtype=torch.int64)
    _philox_words[(-(-counters // 64),)](words, seed, counters, BLOCK=64)
    u = (words >> 12).double() / 2**20
    angle = 2 * math.pi * ((words & 0xFFF).double() + 0.5) / 2**12 - math.pi
    radius = torch.sqrt(-2 * torch.log1p(-u))
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1).reshape(-1)[:n]


def check_noise_stream_follows_its_definition() -> None:
    """The tiled noise kernel draws element ``L`` of a row block from lane ``L % 8`` of counter ``L // 8``
    whatever its tile shape: narrow rows (tiles of fewer columns), odd widths (per-element counters),
    rows wider than a tile, several row blocks (each its own seed), a transposed source (read in turned tiles:
    the same bits as from a contiguous copy)."""
    gen = torch.Generator().manual_seed(1)
    for rows, cols, per_block in [(9, 1, 9), (5, 3, 5), (7, 6, 3), (33, 64, 33), (6, 130, 4), (3, 1030, 2), (4, 2048, 4), (150, 40, 70),
                                  (130, 9, 130)]:
        seeds = torch.randint(0, 2**62, (-(-rows // per_block),), generator=gen)
        ones = torch.ones(rows)
        w = torch.randn(cols, rows, generator=gen).t()  # a transposed view
        noisy = KERNEL.perturbed_layer(w, ones, seeds, per_block, torch.float32)
        assert torch.equal(noisy, KERNEL.perturbed_layer(w.contiguous(), ones, seeds, per_block, torch.float32)), (rows, cols)
        strided = torch.randn(rows, 2 * cols, generator=gen)[:, ::2]  # strided rows that are not a transposed view
        assert torch.equal(KERNEL.perturbed_layer(strided, ones, seeds, per_block, torch.float32),
                           KERNEL.perturbed_layer(strided.contiguous(), ones, seeds, per_block, torch.float32)), (rows, cols, "strided")
        for b, seed in enumerate(seeds.tolist()):
            block = slice(b * per_block, min(rows, (b + 1) * per_block))
            n = (block.stop - block.start) * cols
            z = _reference_normals(seed, n).reshape(-1, cols)
            drawn = KERNEL.noise(ones[block], cols, seeds[b:b + 1], torch.float32)
            # float32 arithmetic against the float64 definition: a lane or counter out of place is off by O(1)
            torch.testing.assert_close(drawn.double(), z, rtol=0, atol=2e-5, msg=f"noise of {rows}x{cols} block {b}")
            assert torch.equal(noisy[block], w[block] + drawn), f"W + e of {rows}x{cols} block {b}"


def check_noise_is_standard_normal() -> None:
    """2**18 normals (seed 11) of the interpreted kernel pass :func:`assert_standard_normal`."""
    z = KERNEL.noise(torch.ones(512), 512, torch.tensor([11]), torch.float32)
    assert_standard_normal(normal_sample_report(z))


def check_tiles_without_rows() -> None:
    """Tiles past a short last row block have no rows: the perturb pass marks them -2 and writes nothing, so
    the first step's counting pass (no room for anything) leaves nothing to undo and runs no restore pass."""
    import flatlora_optim.noise as noise

    gen = torch.Generator().manual_seed(3)
    chunk_bytes = noise.CHUNK_BYTES
    noise.CHUNK_BYTES = 6 * 512 * 48  # row blocks of 6 rows: a 14-row layer ends with a 2-row block
    try:
        w = layers([(14, 512)], torch.float16, gen)[0]
        original = w.clone()
        table = LayerTable([w])
        std = torch.full((table.total_rows,), 0.002)
        seeds = torch.arange(table.total_blocks, dtype=torch.int64) * 7919 + 3
        restores = []
        kernel = TritonNoiseKernel()
        real_restore = kernel.exact_restore_layers
        kernel.exact_restore_layers = lambda *a, **k: (restores.append(1), real_restore(*a, **k))[1]
        record = kernel.exact_perturb_layers(table, std, seeds)  # a counting pass first, then the real one
        assert restores == [], "the counting pass wrote nothing, yet a restore pass ran"
        # blocks of 6 rows take 2 tiles of 4 rows each; the last block (2 rows) leaves its second tile empty
        assert record.bounds.tolist()[-1] == -2 and (record.bounds < 0).sum().item() == 1, record.bounds
        kernel.exact_restore_layers(table, std, seeds, record)
        assert torch.equal(bits(w), bits(original))
    finally:
        noise.CHUNK_BYTES = chunk_bytes


def check_noise_time_benchmark_runs() -> None:
    """``benchmarks/noise_time.py --small`` runs every pass of a step (row stds, virtual W + e, plain pass, exact
    codec) for the kernels as shipped and a variant set by module constants, and the codec restores every bit."""
    import noise_time

    results = noise_time.main(["--small", "--only", "Philox"])
    assert set(results) == {"as shipped", "Philox with 7 rounds"}, sorted(results)
    assert all(r["wrong_elements_after_exact"] == 0 for r in results.values()), results


def check_one_layer_restore_keeps_the_tables_tiles() -> None:
    """A table built with the transposed tiles on keeps them after the switch is turned off (and one built with them
    off keeps the row-major tiles after it is turned on): a one-layer restore, into a copy of either layout, follows
    the table's tiles, which are the record's (it looped forever on the switch's current value)."""
    gen = torch.Generator().manual_seed(11)
    for built_with in (True, False):
        rows = layers([(300, 16), (40, 24)], torch.bfloat16, gen, transposed=(0,))
        before = [bits(r).clone() for r in rows]
        with transposed_tiles(built_with):
            table = LayerTable(rows)
        std = torch.rand(table.total_rows, generator=gen) * 0.002
        seeds = torch.arange(table.total_blocks, dtype=torch.int64) * 7919 + 3
        record = KERNEL.exact_perturb_layers(table, std, seeds)
        with transposed_tiles(not built_with):
            for index, r in enumerate(rows):
                m, n = r.shape
                for copy in (r.clone(), torch.empty((m, n), dtype=r.dtype).copy_(r), torch.empty((n, m), dtype=r.dtype).t().copy_(r)):
                    KERNEL.exact_restore_one(table, index, copy, std, seeds, record)
                    assert torch.equal(bits(copy), before[index]), (built_with, index, copy.stride())
            KERNEL.exact_restore_layers(table, std, seeds, record)
        assert all(torch.equal(bits(r), b) for r, b in zip(rows, before)), built_with


def check_codec_layouts_benchmark_runs() -> None:
    """``benchmarks/codec_layouts.py --small`` times contiguous rows and transposed views, the latter with the
    transposed tiles off and on, and every pass restores every bit."""
    import codec_layouts

    results = codec_layouts.main(["--small"])
    assert set(results) == {"as shipped, contiguous rows", "as shipped, transposed views", "as shipped, transposed, tiles on"}, sorted(results)
    assert all(r["wrong_elements"] == 0 for r in results.values()), results


def check_register_caps_and_noise_tiles_benchmarks_run() -> None:
    """``benchmarks/register_caps.py --small`` (its edit still applies to the shipped module, and every pass restores
    every bit) and ``benchmarks/noise_tiles.py --small`` (every tile shape gives the bits of a contiguous copy)."""
    import noise_tiles
    import register_caps

    caps = register_caps.main(["--small"])
    assert len(caps) == 2 and all(r["wrong_elements"] == 0 for r in caps.values()), caps
    tiles = noise_tiles.main(["--small"])
    assert len(tiles) == 1 + len(noise_tiles.VARIANTS), sorted(tiles)


def escapes_per_group(w: torch.Tensor, std: torch.Tensor, seed: torch.Tensor, size: int = 32) -> torch.Tensor:
    """How many escapes (ambiguous, key offset beyond +-1) each group of ``size`` neighbours in a row of
    one float16 row block gets, computed here from the codec's definition, not by the kernel."""
    e = KERNEL.noise(std, w.shape[1], seed, torch.float32)
    new = (w.float() + e).half()
    cand = (new.float() - e).half()
    new_bits, cand_bits = bits(new).int(), bits(cand).int()
    coarser = ((new_bits & 0x7FFF) >> 10) > ((cand_bits & 0x7FFF) >> 10)
    ambiguous = coarser | ((cand_bits & 0x3FF) == 0)
    key = lambda b: b ^ ((b >> 31) & 0x7FFF)  # noqa: E731
    offset = key(bits(w).int()) - key(cand_bits)
    escape = ambiguous & (offset.abs() > 1)
    return escape.reshape(w.shape[0], -1, size).sum(dim=2)


def check_dense_escapes() -> None:
    """Row noise from 0.005 to 25 times the weights: in the noisiest rows most elements escape (a
    group of 32 holds up to 32 escape bytes, spread over several stream words; a group of 8, as the
    passes read and write them, up to 64 bits, across two words), other rows have few; restore is
    still bitwise."""
    gen = torch.Generator().manual_seed(3)
    w = layers([(8, 512)], torch.float16, gen)[0]
    table = LayerTable([w])
    assert table.total_blocks == 1
    std = torch.logspace(-4, -0.3, table.total_rows)
    seeds = torch.arange(table.total_blocks, dtype=torch.int64) * 7919 + 3
    counts = escapes_per_group(w, std, seeds)
    assert (counts > 8).sum() >= 16 and (counts <= 8).sum() >= 1, f"escapes per group: {counts.tolist()}"
    full = escapes_per_group(w, std, seeds, size=8) == 8
    assert full.sum() >= 4, "groups of 8 that fill a whole 64-bit window"
    before = bits(w).clone()
    record = KERNEL.exact_perturb_layers(table, std, seeds)
    assert not torch.equal(bits(w), before)
    KERNEL.exact_restore_layers(table, std, seeds, record)
    assert torch.equal(bits(w), before), f"{(bits(w) != before).sum().item()} elements differ after restore"


class FailingSecondLaunch:
    """Stands in for ``_codec_kernel``: the first launch runs, the second raises (as Ctrl-C during
    the second form's compile would)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            if self.launches == 2:
                raise KeyboardInterrupt("second launch")
            return self.kernel[grid](*args, **kwargs)
        return launch


def check_interrupted_perturb_leaves_nothing_perturbed() -> None:
    """A perturb pass whose second launch fails (another weight type or layout needs a second one)
    undoes what the first wrote, for exact and backup restore, before the error propagates."""
    import flatlora_optim.kernels.triton_noise as triton_noise
    import flatlora_optim.noise as noise
    import flatlora_optim.perturbation as perturbation
    from flatlora_optim import FlatLoRA
    from flatlora_optim.lora import LoRALinear

    noise.kernel_for = perturbation.kernel_for = lambda device: KERNEL
    torch.manual_seed(1)
    model = torch.nn.Sequential(LoRALinear(torch.nn.Linear(16, 24).to(torch.bfloat16), r=2, alpha=4),
                                LoRALinear(torch.nn.Linear(24, 16).to(torch.float16), r=2, alpha=4))
    before = [bits(layer.weight).clone() for layer in model]
    real = triton_noise._codec_kernel
    for restore in ("exact", "backup"):
        opt = FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0), model, rho=0.5,
                       schedule="constant", seed=2, restore=restore)
        with opt.perturbed():  # a whole step first: the exact codec's buffers are sized, so its next pass writes
            pass
        opt.step()
        triton_noise._codec_kernel = failing = FailingSecondLaunch(real)
        try:
            with opt.perturbed():
                raise AssertionError("the perturb pass should have failed")
        except KeyboardInterrupt:
            pass
        finally:
            triton_noise._codec_kernel = real
        assert failing.launches >= 2, failing.launches  # exact restore then launches its undo pass too
        for k, (layer, b) in enumerate(zip(model, before)):
            assert torch.equal(bits(layer.weight), b), f"{restore}: layer {k} left perturbed after an interrupted launch"


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 1100)), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    std_scale=st.sampled_from([0.0, 1e-4, 2e-3, 0.05, 3.0]),
    transpose_first=st.booleans(),
    turned=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def check_restore_is_bitwise(shapes, dtype, std_scale, transpose_first, turned, seed) -> None:
    """Any shapes, either 16-bit type, noise from none to far larger than the weights, the transposed tiles on or
    off: bitwise restore."""
    gen = torch.Generator().manual_seed(seed)
    with transposed_tiles(turned):
        perturb_and_restore(layers(shapes, dtype, gen, transposed=(0,) if transpose_first else ()), std_scale, gen)


def check_bfloat16_records_hold_their_fields() -> None:
    """bfloat16 weights at an ordinary noise level: the record keeps the ambiguous elements in its fields,
    exceptions stay rare, and the restore is bitwise. Under an interpreter that truncated
    float32 -> bfloat16 most elements were exceptions, and the fields went untested here."""
    gen = torch.Generator().manual_seed(7)
    rows = layers([(16, 1024), (8, 520)], torch.bfloat16, gen)
    before = [bits(r).clone() for r in rows]
    table = LayerTable(rows)
    std = torch.full((table.total_rows,), 0.05 * 0.02)  # rho 0.05 of the weights' scale
    seeds = torch.arange(table.total_blocks, dtype=torch.int64) * 7919 + 3
    record = KERNEL.exact_perturb_layers(table, std, seeds)
    elements = sum(r.numel() for r in rows)
    assert record.n_exceptions <= elements // 1000, f"{record.n_exceptions} exceptions in {elements} elements"
    field_bits = sum(bin(int(word) & (2**64 - 1)).count("1") for word in record.stream.tolist())
    assert field_bits > elements // 100, f"the record holds {field_bits} set bits for {elements} elements"
    KERNEL.exact_restore_layers(table, std, seeds, record)
    assert all(torch.equal(bits(r), b) for r, b in zip(rows, before)), "not restored bitwise"


def check_passes_that_read_their_counts_later() -> None:
    """A training step's pass (``step`` given) after a table's first does not wait for its counts: buffers
    scaled by the rise of sigma, counts read later. Buffers too small on purpose: the tiles that do not fit
    stay clean, the restore is still exact, the late read reports the step and the clean tiles, and the
    next pass is sized from those counts. A large rise of sigma, and a failure after the pass, are covered."""
    import warnings

    gen = torch.Generator().manual_seed(11)
    rows = layers([(9, 1030), (6, 900), (5, 1024)], torch.bfloat16, gen)
    before = [bits(r).clone() for r in rows]
    table = LayerTable(rows)
    std = torch.rand(table.total_rows, generator=gen) * 0.002
    seeds = torch.arange(table.total_blocks, dtype=torch.int64) * 7919 + 3

    def clean() -> bool:
        return all(torch.equal(bits(r), b) for r, b in zip(rows, before))

    def step_pass(step, sigma, scale=1.0):
        record = KERNEL.exact_perturb_layers(table, std * scale, seeds, step=step, sigma=sigma)
        clean_tiles = int((record.bounds == -1).sum())
        KERNEL.exact_restore_layers(table, std * scale, seeds, record)
        report = KERNEL.settle_counts(table, wait=False)
        assert clean(), f"step {step}: not restored bitwise"
        return record, clean_tiles, report

    first, tiles_clean, report = step_pass(0, 1.0)  # the table's first pass waits, counts and redoes: every tile perturbed
    assert tiles_clean == 0 and report is None and table.codec_pending is None
    assert first.n_exceptions < first.exc_capacity or first.exc_capacity == 0
    sized = table.codec_capacity
    table.codec_capacity = (3, 2)  # far too small, as after a sharp change of the weights
    record, tiles_clean, report = step_pass(1, 1.0)
    assert record.n_exceptions == record.exc_capacity == 2, "a pass that does not wait has its exceptions pass look at every slot"
    assert tiles_clean > 0, "buffers too small on purpose, yet every tile was perturbed"
    assert report is not None and "step 1:" in report and f"{tiles_clean} of {table.n_tiles} tiles" in report, report
    assert table.codec_capacity[0] >= sized[0] - 1024 and table.codec_pending is None, "the late counts did not size the next pass"
    record, tiles_clean, report = step_pass(2, 1.0)
    assert tiles_clean == 0 and report is None, (tiles_clean, report)
    # sigma doubles: the next pass's buffers double with it (the slots needed grow at most in proportion), up to
    # the most any pass can need (every element ambiguous with an escape byte; every element an exception)
    largest = tn._largest_need(table)
    table.codec_capacity = (table.codec_capacity[0], largest[1] * 3 // 4)  # room for exceptions past half the most a pass can need
    previous = table.codec_capacity
    assert largest[1] == sum(r.numel() for r in rows) < 2 * previous[1]  # so doubling it stops at that bound
    record, tiles_clean, report = step_pass(3, 2.0, scale=2.0)
    assert (record.word_capacity, record.exc_capacity) == (min(2 * previous[0], largest[0]), min(2 * previous[1], largest[1]))
    assert tiles_clean == 0 and report is None
    # sigma rises 1000-fold (a resumed cosine run): that pass waits for its counts instead of scaling the buffers
    KERNEL.exact_restore_layers(table, std * 4.0, seeds, KERNEL.exact_perturb_layers(table, std * 4.0, seeds, step=4, sigma=2000.0))
    assert table.codec_pending is None and table.codec_sigma == 2000.0 and clean()
    # counts left unread are read by the next pass first; a report they hold is given before that pass writes
    # anything, so a warning turned into an error leaves the weights clean
    table.codec_capacity = (3, 2)
    KERNEL.exact_restore_layers(table, std * 4.0, seeds, KERNEL.exact_perturb_layers(table, std * 4.0, seeds, step=5, sigma=2000.0))
    assert table.codec_pending is not None and table.codec_pending.step == 5 and clean()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            KERNEL.exact_perturb_layers(table, std * 4.0, seeds, step=6, sigma=2000.0)
        except RuntimeWarning as warning:
            assert "step 5:" in str(warning), warning
        else:
            raise AssertionError("the unread overflow of step 5 was not reported")
    assert clean() and table.codec_pending is None, "the report came after the pass had written"
    # the report counts the tiles that hold rows: row blocks of 8 rows make a 9-row layer's second block one row
    # long, and the tiles counted for it as for a full block hold no rows (marked -2: never perturbed, never clean)
    import flatlora_optim.kernels.layer_table as layer_table

    saved_rows_per_chunk = layer_table.rows_per_chunk
    layer_table.rows_per_chunk = lambda n: 8
    try:
        short = layers([(9, 1030)], torch.bfloat16, gen)
        short_before = bits(short[0]).clone()
        short_table = LayerTable(short)
        short_std = torch.rand(short_table.total_rows, generator=gen) * 0.002
        short_seeds = torch.arange(short_table.total_blocks, dtype=torch.int64) + 5
        KERNEL.exact_restore_layers(short_table, short_std, short_seeds, KERNEL.exact_perturb_layers(short_table, short_std, short_seeds, step=0, sigma=1.0))
        short_table.codec_capacity = (1, 0)
        record = KERNEL.exact_perturb_layers(short_table, short_std, short_seeds, step=1, sigma=1.0)
        phantom, left_clean = int((record.bounds == -2).sum()), int((record.bounds == -1).sum())
        KERNEL.exact_restore_layers(short_table, short_std, short_seeds, record)
        report = KERNEL.settle_counts(short_table, wait=False)
        assert phantom > 0 and left_clean > 0 and torch.equal(bits(short[0]), short_before)
        assert f"{left_clean} of {short_table.n_tiles - phantom} tiles" in report, (report, phantom, left_clean)
    finally:
        layer_table.rows_per_chunk = saved_rows_per_chunk
    # anything failing after a pass that does not wait (here: its counts' copy) undoes what the pass wrote
    real = tn.PendingCounts

    def failing(*args, **kwargs):
        raise RuntimeError("pinned memory exhausted")

    tn.PendingCounts = failing
    try:
        KERNEL.exact_perturb_layers(table, std * 4.0, seeds, step=7, sigma=2000.0)
    except RuntimeError as error:
        assert "pinned" in str(error)
    else:
        raise AssertionError("the failure was swallowed")
    finally:
        tn.PendingCounts = real
    assert clean(), "a failure after the pass left weights perturbed"


def check_a_report_turned_into_an_error_at_restore_leaves_the_optimizer_in_order() -> None:
    """The too-small-record warning of a step is given once the whole restore is done: turned into an error
    (``-W error``), it reaches the caller with the weights clean, nothing marked unrestored, and the next
    step runs."""
    import warnings

    import flatlora_optim.noise as noise
    import flatlora_optim.perturbation as perturbation
    from flatlora_optim import FlatLoRA
    from flatlora_optim.lora import LoRALinear

    noise.kernel_for = perturbation.kernel_for = lambda device: KERNEL
    torch.manual_seed(1)
    model = torch.nn.Sequential(LoRALinear(torch.nn.Linear(40, 24).to(torch.bfloat16), r=4, alpha=8),
                                LoRALinear(torch.nn.Linear(24, 520).to(torch.bfloat16), r=4, alpha=8))
    frozen = [layer.weight for layer in model]
    before = [bits(w).clone() for w in frozen]
    opt = FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0), model, rho=0.05,
                   schedule="constant", seed=2)
    x = torch.randn(3, 40).to(torch.bfloat16)

    def step() -> None:
        with opt.perturbed():
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    for table in opt._perturber._tables._tables.values():
        if table.codec_capacity is not None:
            table.codec_capacity = (3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            step()
        except RuntimeWarning as warning:
            assert "step 1:" in str(warning), warning
        else:
            raise AssertionError("the too-small record of step 1 was not reported")
    assert all(torch.equal(bits(w), b) for w, b in zip(frozen, before)), "weights not clean"
    assert not opt._unrestored and not opt.is_perturbed, (opt._unrestored, opt.is_perturbed)
    opt.zero_grad()
    step()
    step()
    assert all(torch.equal(bits(w), b) for w, b in zip(frozen, before))


def check_training_steps_through_the_grouped_path() -> None:
    """FlatLoRA itself with the Triton kernel forced onto CPU tensors: the step-wide group (row stds,
    seeds, fused codec; backup restore's plain pass), a clean ``state_dict`` while perturbed (one
    layer restored into a copy), and weights bitwise equal after every step; exact, backup, host and
    virtual mode all see the same ``W + e``. Host restore writes layers 1 and 2 back before layer 0's backward."""
    import flatlora_optim.noise as noise
    import flatlora_optim.perturbation as perturbation
    from flatlora_optim import FlatLoRA
    from flatlora_optim.lora import LoRALinear

    noise.kernel_for = perturbation.kernel_for = lambda device: KERNEL  # the interpreter runs on CPU tensors
    torch.manual_seed(0)
    dims = [(24, 40, torch.bfloat16), (40, 33, torch.float16), (33, 516, torch.bfloat16)]
    model = torch.nn.Sequential(*[LoRALinear(torch.nn.Linear(i, o).to(dtype), r=4, alpha=8) for i, o, dtype in dims])
    for layer in model:
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    frozen = [layer.weight for layer in model]
    before = [bits(w).clone() for w in frozen]
    params = [p for p in model.parameters() if p.requires_grad]
    noisy = {}
    for mode, restore in (("inplace", "exact"), ("inplace", "backup"), ("inplace", "host"), ("virtual", "exact")):
        opt = FlatLoRA(torch.optim.SGD(params, lr=0.0), model, rho=0.05, schedule="constant", seed=1, mode=mode, restore=restore)
        for step in range(3):  # the group's first pass waits for its counts, the later ones do not
            x = torch.randn(5, 24)
            clean_at_layer0 = []
            with opt.perturbed():
                h = x
                for k, layer in enumerate(model):
                    h = layer(h.to(layer.weight.dtype)).float()
                    if k == 0:  # its gradient comes after layers 1 and 2's backward, before layer 0's
                        h.register_hook(lambda g, seen=clean_at_layer0: seen.extend(torch.equal(bits(w), b) for w, b in zip(frozen, before)))
                loss = h.square().mean()
                if mode == "inplace":
                    assert any(not torch.equal(bits(w), b) for w, b in zip(frozen, before)), "nothing perturbed"
                    if restore in ("backup", "host"):  # the step-wide pass, a copy kept: the same W + e as the codec
                        assert all(p.blocks[0][0] == perturbation._GROUPED for p in opt._perturbations), "backup not grouped"
                        formed = [bits(w) for w in frozen]
                        assert all(torch.equal(f, n) for f, n in zip(formed, noisy[step])), "backup W + e differs from exact"
                    clean = model.state_dict()
                    for k, b in enumerate(before):
                        assert torch.equal(bits(clean[f"{k}.weight"]), b), "state_dict while perturbed is not clean"
                    if restore == "exact":
                        noisy[step] = [bits(w).clone() for w in frozen]
                else:
                    formed = [bits(opt._perturber.perturbed_rows(p)) for p in opt._perturbations]
                    assert all(torch.equal(f, n) for f, n in zip(formed, noisy[step])), "virtual W + e differs from in-place"
            loss.backward()
            if mode == "inplace":
                expected = [False, True, True] if restore == "host" else [False, False, False]
                assert clean_at_layer0 == expected, f"{restore}, step {step}: clean before layer 0's backward: {clean_at_layer0}"
            opt.step()
            opt.zero_grad()
            for k, (w, b) in enumerate(zip(frozen, before)):
                assert torch.equal(bits(w), b), f"{mode}/{restore}, step {step}: layer {k} not restored bitwise"


def check_host_copies_follow_the_weights() -> None:
    """Host restore keeps its copies from step to step: taken at the first step only; taken again for a weight written
    in place through the parameter (its version counter moves), which is then restored to its new bits; a write
    through ``.data`` is not seen until ``refresh_host_copies()``."""
    import flatlora_optim.noise as noise
    import flatlora_optim.perturbation as perturbation
    from flatlora_optim import FlatLoRA
    from flatlora_optim.lora import LoRALinear

    noise.kernel_for = perturbation.kernel_for = lambda device: KERNEL
    torch.manual_seed(3)
    model = torch.nn.Sequential(LoRALinear(torch.nn.Linear(16, 24).to(torch.bfloat16), r=2, alpha=4),
                                LoRALinear(torch.nn.Linear(24, 8).to(torch.float16), r=2, alpha=4))
    frozen = [layer.weight for layer in model]
    opt = FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0), model, rho=0.1,
                   schedule="constant", restore="host")
    copies = opt._perturber.host_copies

    def step() -> None:
        with opt.perturbed():
            loss = model[1](model[0](torch.randn(4, 16, dtype=torch.bfloat16)).to(torch.float16)).float().square().mean()
        loss.backward()
        opt.step()

    step()
    step()
    assert copies.taken == 2, f"copies taken {copies.taken} times in two steps of two layers (expected once each)"
    with torch.no_grad():
        frozen[0].mul_(2)  # through the parameter: its version counter moves
    written = bits(frozen[0]).clone()
    step()
    assert copies.taken == 3, copies.taken
    assert torch.equal(bits(frozen[0]), written), "a weight written between steps was not restored to its new bits"
    kept = bits(frozen[1]).clone()
    frozen[1].data.mul_(2)  # not seen by the version counter: the copy is stale, restored to the old bits
    step()
    assert torch.equal(bits(frozen[1]), kept), "a .data write was expected to go unseen"
    frozen[1].data.mul_(2)
    written = bits(frozen[1]).clone()
    opt.refresh_host_copies()
    step()
    assert torch.equal(bits(frozen[1]), written), "refresh_host_copies() did not take the copy anew"
    assert copies.taken == 5, copies.taken


def _two_bf16_layers(restore: str):
    """Two bf16 LoRALinear layers (a Tanh between), their frozen weights' bits and a FlatLoRA with ``restore``."""
    from flatlora_optim import FlatLoRA
    from flatlora_optim.lora import LoRALinear

    torch.manual_seed(4)
    model = torch.nn.Sequential(LoRALinear(torch.nn.Linear(16, 24), r=2, alpha=4), torch.nn.Tanh(),
                                LoRALinear(torch.nn.Linear(24, 8), r=2, alpha=4)).to(torch.bfloat16)
    for layer in (model[0], model[2]):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    frozen = [bits(model[i].weight).clone() for i in (0, 2)]
    opt = FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0), model, rho=0.2,
                   schedule="constant", seed=1, restore=restore)
    return model, frozen, opt


def _host_restore_matches_exact(scenario) -> None:
    """``scenario(model, opt, restore)`` on :func:`_two_bf16_layers` with exact and with host restore through the fused
    pass: the frozen weights come back bitwise and every LoRA gradient is the same bits."""
    import flatlora_optim.noise as noise
    import flatlora_optim.perturbation as perturbation

    noise.kernel_for = perturbation.kernel_for = lambda device: KERNEL
    results = {}
    for restore in ("exact", "host"):
        model, frozen, opt = _two_bf16_layers(restore)
        scenario(model, opt, restore)
        results[restore] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        assert all(torch.equal(bits(model[i].weight), f) for i, f in zip((0, 2), frozen)), f"{restore}: not restored bitwise"
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(results["exact"], results["host"])), "host gradients differ from exact's"


def check_host_restore_puts_the_noise_back_when_a_layer_computes_again() -> None:
    """The fused pass, host restore: layer 0, written back by the first backward while another graph keeps the step's
    noise in, computes again in a new forward: its noise is put back first (the group's one-layer pass), so every
    gradient is exact restore's, bit for bit, and the weights come back bitwise."""
    import flatlora_optim.perturbation as perturbation

    def scenario(model, opt, restore):
        gen = torch.Generator().manual_seed(0)
        xa, xc = (torch.randn(4, 16, generator=gen).to(torch.bfloat16).requires_grad_(True) for _ in range(2))
        hidden = torch.randn(4, 24, generator=gen).to(torch.bfloat16).requires_grad_(True)
        with opt.perturbed():
            assert all(p.blocks[0][0] == perturbation._GROUPED for p in opt._perturbations), "not the fused pass"
            partial = model[2](hidden).float().square().mean()
            whole = model(xa).float().square().mean()
        whole.backward()
        again = model(xc).float().square().mean()
        partial.backward()
        again.backward()

    _host_restore_matches_exact(scenario)


def check_host_restore_after_a_ctrl_c_landing_as_a_layer_is_written_back() -> None:
    """The fused pass, host restore: a Ctrl-C lands right after layer 2's copy back during the backward (before its
    flag says so); the micro-batch is redone while another graph keeps the noise in. The put-back writes the copy back
    and adds the noise whatever the flags say, so the gradients are exact restore's, bit for bit (found in review)."""
    import signal

    import flatlora_optim.grouped as grouped

    def scenario(model, opt, restore):
        gen = torch.Generator().manual_seed(0)
        xa, xb, xc = (torch.randn(4, 16, generator=gen).to(torch.bfloat16).requires_grad_(True) for _ in range(3))
        with opt.perturbed():
            partial = model[0](xb).float().square().mean()  # layer 0 only: layer 2 is written back by the next backward
            whole = model(xa).float().square().mean()
        real = grouped.write_back

        def interrupted(rows, host, stream):
            real(rows, host, stream)
            grouped.write_back = real
            os.kill(os.getpid(), signal.SIGINT)

        if restore == "host":
            grouped.write_back = interrupted
            try:
                whole.backward()
                raise AssertionError("the Ctrl-C did not reach the backward")
            except KeyboardInterrupt:
                pass
            finally:
                grouped.write_back = real
        else:
            whole.backward()
        opt.zero_grad()
        again = model(xc).float().square().mean()
        partial.backward()
        again.backward()

    _host_restore_matches_exact(scenario)


def check_shard_kernel_forms_the_fused_kernels_values() -> None:
    """FSDP2 shards on CUDA add the fused kernel's noise with torch ops: the same ``fl(W + e)`` bits as
    the fused kernel forms for the whole block (16-bit and float32 rows), and a shard's part of a
    block is that block's noise on its rows. bfloat16 too: the interpreter's float32 -> bfloat16 cast rounds to
    nearest even here, as compiled code and torch do (interpreter_compat)."""
    from flatlora_optim.noise import ShardNoiseKernel

    gen = torch.Generator().manual_seed(5)
    shard = ShardNoiseKernel(KERNEL)
    for dtype, work in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float64)):
        block = (torch.randn(12, 520, generator=gen) * 0.02).to(dtype)
        std = torch.rand(12, generator=gen) * 0.003
        seed = torch.tensor([12345], dtype=torch.int64)
        fused = KERNEL.perturbed(block, std, seed, work)
        noise = shard.noise(std, block.shape[1], seed, work)
        assert torch.equal(bits(shard.perturbed(block, std, seed, work, noise=noise)), bits(fused)), f"shard kernel differs ({dtype})"
        assert torch.equal(bits(shard.perturbed(block, std, seed, work)), bits(fused))
        part = std.clone()
        part[:5] = 0  # a shard holding rows 5.. of the block draws the block whole and keeps its rows
        assert torch.equal(shard.noise(part, block.shape[1], seed, work)[5:], noise[5:])


def check_fsdp_shards_take_their_rows_of_the_whole_layers_values() -> None:
    """An FSDP2 shard (rows ``first:first+m`` of a layer, starting inside a row block) through the grouped
    kernels: the same row stds and ``fl(W + e)`` as the whole layer on those rows, then bitwise
    restore, grouped and one layer alone (row blocks of 8 rows here, so shards cross several)."""
    import flatlora_optim.kernels.layer_table as layer_table

    original = layer_table.rows_per_chunk
    layer_table.rows_per_chunk = lambda n: 8
    try:
        gen = torch.Generator().manual_seed(11)
        for dtype in (torch.float16, torch.bfloat16):
            whole = layers([(40, 1030), (21, 512)], dtype, gen)
            adapters = [(torch.randn(4, w.shape[1], generator=gen).to(dtype), torch.randn(w.shape[0], 4, generator=gen).to(dtype), 0.5) for w in whole]
            ranges = [(13, 40), (8, 21)]  # first global row held here: inside block 1, and on a block boundary
            counts = [18, 13]
            held = [w[a : a + c].clone() for w, (a, _), c in zip(whole, ranges, counts)]
            held_adapters = [(A, B[a : a + c], s) for (A, B, s), (a, _), c in zip(adapters, ranges, counts)]
            full_table = LayerTable(whole)  # (a table holds addresses only: its tensors must stay alive)
            full_std = torch.empty(full_table.total_rows)
            KERNEL.row_stds(full_table, adapters, [0.05, 0.05], full_std)
            shard_table = LayerTable(held, row_ranges=ranges)
            shard_std = torch.empty(shard_table.total_rows)
            KERNEL.row_stds(shard_table, held_adapters, [0.05, 0.05], shard_std)
            expected_std = torch.cat([full_std[b + a : b + a + c] for b, (a, _), c in zip(full_table.std_bases, ranges, counts)])
            assert torch.equal(shard_std, expected_std), "a shard's row stds differ from the whole layer's"
            assert shard_table.blocks == full_table.blocks == [5, 3]  # seeds for every global block
            seeds = torch.arange(full_table.total_blocks, dtype=torch.int64) * 7919 + 3
            noisy = [w.clone() for w in whole]
            KERNEL.exact_perturb_layers(LayerTable(noisy), full_std, seeds)
            before = [bits(h).clone() for h in held]
            record = KERNEL.exact_perturb_layers(shard_table, shard_std, seeds)
            for h, n, (a, _), c in zip(held, noisy, ranges, counts):
                assert torch.equal(bits(h), bits(n[a : a + c])), "a shard's W + e differs from the whole layer's on its rows"
            copy = held[0].clone()
            KERNEL.exact_restore_one(shard_table, 0, copy, shard_std, seeds, record)
            assert torch.equal(bits(copy), before[0]), "a shard restored alone differs"
            KERNEL.exact_restore_layers(shard_table, shard_std, seeds, record)
            assert all(torch.equal(bits(h), b) for h, b in zip(held, before)), "a shard is not restored bitwise"
            KERNEL.add_noise_layers(shard_table, shard_std, seeds)  # backup restore's plain pass: the same W + e
            for h, n, (a, _), c in zip(held, noisy, ranges, counts):
                assert torch.equal(bits(h), bits(n[a : a + c]))
    finally:
        layer_table.rows_per_chunk = original


def _use_interpreted_kernel_with_small_blocks() -> None:
    """FlatLoRA on CPU tensors through the Triton kernels, with row blocks of a few rows (so FSDP2 shards
    start and end inside blocks)."""
    import flatlora_optim.noise as noise
    import flatlora_optim.perturbation as perturbation

    noise.kernel_for = perturbation.kernel_for = lambda device: KERNEL
    noise.CHUNK_BYTES = 48 * 32 * 5  # 5 rows per block at fan-in 32, 13 at fan-in 12
    torch.set_num_threads(1)


def _first_step_weights(model, restore: str):
    """The frozen weights' bits while perturbed at the first step, whether they are restored bitwise after it and
    after two more steps (perturbed in each), and which path each layer took."""
    from flatlora_optim import FlatLoRA, lora_parameters
    from flatlora_optim.sharding import local

    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.0), model, rho=0.2, schedule="constant", seed=3,
                   rank_noise="shared", restore=restore)
    weights = [local(model[i].weight) for i in (0, 2, 4)]
    before = [w.detach().clone() for w in weights]
    with opt.perturbed():
        noisy = [w.detach().clone() for w in weights]
        paths = [p.blocks[0][0] if p.blocks else None for p in opt._perturbations]
    def same(a, b):
        return torch.equal(bits(a) if a.element_size() == 2 else a, bits(b) if b.element_size() == 2 else b)

    restored = all(same(a, b) for a, b in zip(before, weights))
    for _ in range(2):  # later steps: the step-wide codec's passes no longer wait for their counts
        opt.step()
        with opt.perturbed():
            restored = restored and all(not same(w, b) for w, b in zip(weights, before) if w.numel())  # (a rank may hold no rows)
        restored = restored and all(same(a, b) for a, b in zip(before, weights))
    return noisy, restored, paths


def _fsdp_rank(rank: int, world: int, port: int, dtype: torch.dtype, restore: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import make_mlp

    _use_interpreted_kernel_with_small_blocks()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = make_mlp(seed=0, dtype=dtype)
    for layer in model:
        if hasattr(layer, "lora_A"):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.save(_first_step_weights(model, restore), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def check_fsdp_ranks_draw_the_single_process_weights() -> None:
    """FlatLoRA under FSDP2 on 4 gloo ranks through the interpreted kernels: each rank's perturbed rows are
    bitwise the single process's (16-bit exact, backup and host: the step-wide fused pass with shards starting
    inside row blocks and a rank holding no rows of the 5-row layer; float32: block by block with the
    fused kernel's noise), and every rank restores bitwise."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import make_mlp

    import flatlora_optim.perturbation as perturbation

    world = 4
    cases = ((torch.float16, "exact", True), (torch.bfloat16, "backup", True), (torch.bfloat16, "host", True), (torch.float32, "exact", False))
    for dtype, restore, grouped in cases:
        with tempfile.TemporaryDirectory() as out, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            mp.spawn(_fsdp_rank, args=(world, port, dtype, restore, out), nprocs=world, join=True)
            ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]
        import flatlora_optim.noise as noise

        chunk_bytes = noise.CHUNK_BYTES
        _use_interpreted_kernel_with_small_blocks()
        try:
            single, restored, _ = _first_step_weights(make_mlp(seed=0, dtype=dtype), restore)
        finally:
            noise.CHUNK_BYTES = chunk_bytes  # the later checks use the real block size
        assert restored and all(r[1] for r in ranks), f"{dtype}/{restore}: not restored bitwise on every rank"
        took = [p for r in ranks for p in r[2] if p is not None]  # None: a rank holding no rows of the layer
        fused = all(p == perturbation._GROUPED for p in took)
        assert fused if grouped else all(p >= 0 for p in took), f"{dtype}/{restore}: paths {[r[2] for r in ranks]}"
        assert [r[0][2].shape[0] for r in ranks] == [2, 2, 1, 0], "the 5-row layer is not split 2/2/1/0"
        for k in range(3):
            sharded = torch.cat([r[0][k] for r in ranks])
            same = torch.equal(bits(sharded), bits(single[k])) if dtype != torch.float32 else torch.equal(sharded, single[k])
            assert same, f"{dtype}/{restore}: layer {k} differs from the single process"


if __name__ == "__main__":
    check_fsdp_ranks_draw_the_single_process_weights()
    check_fsdp_shards_take_their_rows_of_the_whole_layers_values()
    check_shard_kernel_forms_the_fused_kernels_values()
    check_noise_stream_follows_its_definition()
    check_noise_is_standard_normal()
    check_noise_time_benchmark_runs()
    check_codec_layouts_benchmark_runs()
    check_register_caps_and_noise_tiles_benchmarks_run()
    check_one_layer_restore_keeps_the_tables_tiles()
    check_tiles_without_rows()
    check_examples()
    check_bfloat16_records_hold_their_fields()
    check_dense_escapes()
    check_interrupted_perturb_leaves_nothing_perturbed()
    check_passes_that_read_their_counts_later()
    check_host_copies_follow_the_weights()
    check_host_restore_puts_the_noise_back_when_a_layer_computes_again()
    check_host_restore_after_a_ctrl_c_landing_as_a_layer_is_written_back()
    check_a_report_turned_into_an_error_at_restore_leaves_the_optimizer_in_order()
    check_training_steps_through_the_grouped_path()
    check_restore_is_bitwise()
    print("triton interpreter checks passed")
    sys.exit(0)
