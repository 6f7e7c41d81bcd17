"""The torch kernel's batched path: many small layers' row blocks through one strategy call.

Batching must not change a single noise value, must restore bit for bit, and must follow the
model as it changes between steps (nothing about a layer is cached across steps).
"""

from __future__ import annotations

import pytest
import torch
from conftest import bits, frozen_weights
from torch import nn

import flatlora_optim.batched as batched
from flatlora_optim import FlatLoRA, inject_lora, lora_parameters
from flatlora_optim.noise import GeneratorPool, chunk_bounds, layer_key, noise_seed, row_std
from flatlora_optim.perturbation import Perturber
from flatlora_optim.restore import BackupRestore, ExactRestore, noise_dtype
from flatlora_optim.targets import Adapter

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _model(dtype: torch.dtype = torch.float32, seed: int = 3) -> nn.Module:
    """A layer of two row blocks (4096 inputs) and three small layers that share a batch."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4096, 400, bias=False), nn.Linear(400, 33), nn.Linear(33, 9), nn.Linear(9, 200))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    inject_lora(model, ["0", "1", "2", "3"], r=4, alpha=8)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.to(dtype)


def _flat(model: nn.Module, **kwargs) -> FlatLoRA:
    kwargs.setdefault("seed", 11)
    return FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.1, schedule="constant", **kwargs)


def _expected_perturbed(layer: nn.Module, name: str, seed: int, step: int, sigma: float) -> torch.Tensor:
    """``fl(W + e)`` written from the definition, block by block with ``torch.randn`` (no batching)."""
    rows = layer.weight.detach()
    std = row_std(rows, [Adapter("default", layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling)], sigma)
    work = noise_dtype(rows.dtype)
    out = torch.empty_like(rows)
    for block, start, end in chunk_bounds(*rows.shape):
        generator = torch.Generator().manual_seed(noise_seed(seed, step, layer_key(name), block))
        z = torch.randn((end - start, rows.shape[1]), generator=generator)
        out[start:end] = (rows[start:end].to(work) + z.to(work) * std[start:end].to(work)[:, None]).to(rows.dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_noise_is_the_per_block_draw(dtype):
    model = _model(dtype)
    opt = _flat(model)
    opt.step()  # step 1
    expected = {name: _expected_perturbed(model.get_submodule(name), name, 11, 1, opt.sigma) for name in ("0", "1", "2", "3")}
    with opt.perturbed():
        for name, values in expected.items():
            assert torch.equal(bits(model.get_submodule(name).weight), bits(values)), name


@pytest.mark.parametrize("restore", ["exact", "backup", "subtract"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_and_per_block_paths_agree(dtype, restore, monkeypatch):
    def perturbed_bits(budget: int):
        monkeypatch.setattr(batched, "BATCH_ELEMENTS", budget)
        model = _model(dtype)
        before = frozen_weights(model)
        opt = _flat(model, restore=restore)
        opt.perturb()
        during = frozen_weights(model)
        opt.restore()
        if restore != "subtract":
            assert all(torch.equal(before[k], v) for k, v in frozen_weights(model).items())
        return during

    one_block_per_call, batched_blocks = perturbed_bits(1), perturbed_bits(2**17)
    assert all(torch.equal(one_block_per_call[k], batched_blocks[k]) for k in one_block_per_call)


def test_small_layers_share_a_batch():
    model = _model()
    opt = _flat(model)
    opt.perturb()
    slots = {name: [record for block, *_, record in p.blocks if block == -2] for name, p in ((p.target.name, p) for p in opt._perturbations)}
    opt.restore()
    shared = {id(s.batch) for name in ("1", "2", "3") for s in slots[name]}
    assert len(shared) == 1  # 13 k + 300 + 1.8 k elements: one batch
    assert len({id(s.batch) for s in slots["0"]}) == 2  # two blocks of 341 x 4096 and 59 x 4096: one batch each
    assert sum(s.counts_record for name in slots for s in slots[name]) == 3  # each batch's record counted once


@pytest.mark.parametrize("restore", ["exact", "backup"])
def test_one_layer_of_a_batch_restores_alone(restore):
    """A clean state_dict of one layer while perturbed: the others in its batch stay perturbed."""
    model = _model()
    before = frozen_weights(model)
    opt = _flat(model, restore=restore)
    with opt.perturbed():
        during = frozen_weights(model)
        state = model[2].state_dict()
        assert torch.equal(bits(state["weight"]), before["2.weight"])
        assert all(torch.equal(during[k], v) for k, v in frozen_weights(model).items())
        assert opt.restore_bytes > 0
    assert all(torch.equal(before[k], v) for k, v in frozen_weights(model).items())


def test_mixed_dtypes_go_to_separate_batches():
    model = _model()
    model[2].to(torch.bfloat16)
    model[3].to(torch.float16)
    before = frozen_weights(model)
    opt = _flat(model)
    for _ in range(3):
        with opt.perturbed():
            assert not torch.equal(bits(model[2].weight), before["2.weight"])
        assert all(torch.equal(before[k], v) for k, v in frozen_weights(model).items())
        opt.step()


def test_weight_and_dtype_changes_between_steps_are_seen():
    """Nothing about a layer is kept across steps: after the model changes, the draw is a fresh optimizer's."""
    model = _model()
    opt = _flat(model)
    with opt.perturbed():
        pass
    opt.step()
    with torch.no_grad():
        model[1].weight.mul_(3.0)  # new values, same tensor
    model[3].weight = nn.Parameter(torch.randn(200, 9) * 0.5, requires_grad=False)  # a new parameter object
    model.to(torch.bfloat16)

    def draw(optimizer: FlatLoRA):
        optimizer.perturb()
        values = frozen_weights(model)
        optimizer.restore()
        return values

    again = draw(opt)
    fresh = _flat(model)
    fresh.load_state_dict(opt.state_dict())
    assert all(torch.equal(again[k], v) for k, v in draw(fresh).items())


def test_few_and_many_block_seeds_agree():
    """Seeds come from noise_seed for a few blocks and from the vectorised noise_seeds for many."""
    model = _model()
    opt = _flat(model)
    perturber = opt._perturber
    one = perturber.describe(opt.targets[2], 0.1, step=4, lazy=True)
    perturber.assign_seeds([one])  # one block: the Python path
    many = [perturber.describe(opt.targets[k % 4], 0.1, step=4, lazy=True) for k in range(16)]
    perturber.assign_seeds(many)  # 20 blocks: the numpy path
    assert many[2].seeds == many[14].seeds == one.seeds
    for p in many:
        assert p.seeds == [noise_seed(11, 4, layer_key(p.target.name), b) for b in range(len(p.seeds))]


@pytest.mark.parametrize("strategy, draws_on_restore", [(ExactRestore(), 5), (BackupRestore(), 0)])
def test_backup_restore_does_not_regenerate_noise(strategy, draws_on_restore, monkeypatch):
    model = _model()
    opt = _flat(model)
    perturber = Perturber(11, strategy)
    calls = []
    original = GeneratorPool.seeded
    monkeypatch.setattr(GeneratorPool, "seeded", lambda self, device, seed: calls.append(seed) or original(self, device, seed))
    done = perturber.perturb_all(opt.targets, 0.1, step=2)
    assert len(calls) == 5  # one draw per row block
    calls.clear()
    perturber.restore_all(done)
    assert len(calls) == draws_on_restore


@pytest.mark.parametrize("restore", ["exact", "backup"])
def test_a_layer_restored_alone_then_the_rest(restore):
    """One layer of a shared batch restored in its live weight first, then everything: all exact.

    (The order the flatness probe and error paths may use; the batch re-forms that layer's W~.)
    """
    model = _model()
    before = frozen_weights(model)
    opt = _flat(model, restore=restore)
    perturber = opt._perturber
    done = perturber.perturb_all(opt.targets, 0.1, step=3)
    perturber.restore(done[2])
    assert torch.equal(bits(model[2].weight), before["2.weight"])
    assert not torch.equal(bits(model[1].weight), before["1.weight"])
    clean = model[2].weight.detach().clone()
    perturber.restore(done[2], dest=clean)  # a clean copy of a restored layer stays clean
    assert torch.equal(bits(clean), before["2.weight"])
    perturber.restore(done[2])  # idempotent
    perturber.restore_all(done)
    assert all(torch.equal(before[k], v) for k, v in frozen_weights(model).items())
