"""The host side of a CUDA step (step-wide path), on CPU: what is kept from step to step, and what is taken lazily.

The step-wide path runs on CUDA; here its host work runs against ``benchmarks/host_time.py``'s stub kernel (the
grouped interface, no launches), as the host-time benchmark does. The GPU and interpreter suites check the values
the kernels then compute from these tables.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_mlp

from flatlora_optim import FlatLoRA, claims, lora_parameters
from flatlora_optim.kernels.layer_table import LayerTable, adapter_rows
from flatlora_optim.noise import layer_key, noise_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # host_time.py's stub kernel


def _layers():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(16, 32, generator=gen).to(torch.bfloat16), torch.randn(8, 24, generator=gen).to(torch.bfloat16)]
    A, B = torch.randn(4, 32, generator=gen), torch.randn(16, 4, generator=gen)
    return weights, A, B


def test_adapter_tables_hold_adapter_rows_values():
    weights, A, B = _layers()
    table = LayerTable(weights)
    adapters = [(A, B, 0.5), None]  # a layer without adapters gets the first launch's dtype code
    kept = table.adapter_tables(adapters, [0.1, 0.2])
    rows, factors, codes = adapter_rows(adapters, [0.1, 0.2], table.first_rows)
    built = torch.tensor(rows, dtype=torch.int64), torch.tensor(factors, dtype=torch.float64), codes
    assert torch.equal(kept[0], built[0]) and torch.equal(kept[1], built[1]) and kept[2] == built[2]
    assert kept[0][0, 0].item() == A.data_ptr() and kept[0][0, 3].item() == B.data_ptr() and kept[0][1, 6].item() == 0


def test_adapter_tables_are_kept_while_their_values_stay_and_rebuilt_when_they_change():
    weights, A, B = _layers()
    table = LayerTable(weights)
    rows, factors, _ = table.adapter_tables([(A, B, 0.5), None], [0.1, 0.2])
    again = table.adapter_tables([(A, B, 0.5), None], [0.1, 0.2])
    assert again[0] is rows and again[1] is factors  # nothing built or uploaded

    lower = table.adapter_tables([(A, B, 0.5), None], [0.05, 0.2])  # a new noise level (cosine schedule)
    assert lower[0] is rows and lower[1] is not factors and lower[1][0, 1].item() == 0.05

    moved = A.clone()  # the adapter in new storage (reloaded, or replaced by the user): its address must be read anew
    new = table.adapter_tables([(moved, B, 0.5), None], [0.05, 0.2])
    assert new[0] is not rows and new[0][0, 0].item() == moved.data_ptr() and new[1] is lower[1]

    rescaled = table.adapter_tables([(moved, B, 2.0), None], [0.05, 0.2])  # a new scaling is a factor, not an address
    assert rescaled[0] is new[0] and rescaled[1][0, 0].item() == 2.0


@pytest.fixture
def stub_step():
    """A FlatLoRA on the GPU benchmark's Llama (one block: 7 layers) whose device kernel is the host-time stub."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import host_time

    model = host_time.build_model(layers=1)
    with host_time.stub_kernel():
        yield FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0), model, rho=0.05,
                       schedule="constant", seed=3)


def test_grouped_layers_take_their_stds_and_seeds_from_the_group_on_first_use(stub_step):
    opt = stub_step
    opt.perturb()
    try:
        perturbations = opt._perturbations
        group = perturbations[0].slot[0]
        assert all(p.slot is not None and p.slot[0] is group and p.std is None and p.block_seeds is None for p in perturbations)
        held = [p.nbytes(opt._strategy) for p in perturbations]  # counted without taking the views
        assert all(p.std is None for p in perturbations)
        for p, bytes_before in zip(perturbations, held):
            std = p.scales()
            assert std.shape == (p.target.rows().shape[0],) and std.data_ptr() == group.std_of(p.slot[1]).data_ptr()
            assert p.nbytes(opt._strategy) == bytes_before  # the same count once the view is taken
            seeds = opt._perturber._device_seeds(p)
            # the group's seeds of this very layer: the per-block formula under the layer's own name
            expected = [noise_seed(opt._perturber.stream_seed(), p.step, layer_key(p.target.name), b) for b in range(seeds.numel())]
            assert seeds.tolist() == expected
    finally:
        opt.restore()


def test_the_codec_pass_uses_the_steps_layer_table_when_every_layer_is_in_it(stub_step):
    opt = stub_step
    opt.perturb()
    try:
        group = opt._perturbations[0].slot[0]
        assert len(group.targets) == len(opt.targets) == 7 and group.codec_table is group.table
    finally:
        opt.restore()


def test_claims_keep_one_entry_per_weight_and_forget_freed_weights():
    model = make_mlp(seed=2)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant")
    keys = {id(t.weight) for t in opt.targets}
    for _ in range(3):
        with opt.perturbed():
            assert all(claims._HOLDERS[k][2] for k in keys)  # held while the noise is in
        assert keys <= set(claims._HOLDERS) and not any(claims._HOLDERS[k][2] for k in keys)
    entries = {k: claims._HOLDERS[k] for k in keys}
    with opt.perturbed():
        pass
    assert all(claims._HOLDERS[k] is entries[k] for k in keys)  # the same entries, flagged again: no new references per step
    del model, opt, entries
    gc.collect()
    assert not keys & set(claims._HOLDERS)
