"""DDP and FSDP2 with 2 processes: on CPU with gloo (every CI run), and on 2 GPUs with NCCL where a machine
has them (skipped otherwise). Training runs, base weights are restored bitwise on every rank, per-rank noise
is as documented (independent streams with rank 0 = a single process; or shared)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from conftest import batch, bits, end_worker_process, make_mlp, steps_in_blocks, train_step  # noqa: E402

from flatlora_optim import FlatLoRA, lora_parameters  # noqa: E402

BACKENDS = [
    pytest.param("gloo", id="gloo-cpu"),
    pytest.param(
        "nccl",
        id="nccl-2gpu",
        marks=pytest.mark.skipif(
            not (dist.is_available() and dist.is_nccl_available() and torch.cuda.device_count() >= 2),
            reason="NCCL on 2 GPUs: needs a machine with at least 2 CUDA devices",
        ),
    ),
]
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")


def _rendezvous(tmp_path) -> str:
    """Where the ranks meet: a file store in the test's own folder. A TCP port found free and then handed to
    the workers can be taken in between (EADDRINUSE: one NCCL run of the tenth session); a file cannot."""
    return (tmp_path / "rendezvous").as_uri()


def _device(backend: str, rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")


def _init(backend: str, rank: int, world: int, rendezvous: str) -> torch.device:
    device = _device(backend, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world, device_id=device)
    else:
        dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world)
    torch.set_num_threads(1)
    return device


def _noise_of_first_step(opt, model) -> torch.Tensor:
    layer = model[2]
    clean = layer.weight.detach().clone()
    with opt.perturbed():
        return (layer.weight.detach() - clean).cpu()


def _single_process_noise(device: torch.device) -> torch.Tensor:
    single = make_mlp(seed=0).to(device)
    opt = FlatLoRA(torch.optim.AdamW(list(lora_parameters(single)), lr=1e-2), single, rho=0.2, schedule="constant", seed=3)
    return _noise_of_first_step(opt, single)


def _worker(rank: int, world: int, rendezvous: str, backend: str, rank_noise: str, out_dir: str) -> None:
    device = _init(backend, rank, world, rendezvous)
    model = make_mlp(seed=0).to(device)
    before = {n: bits(p) for n, p in model.named_parameters() if not p.requires_grad}
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = FlatLoRA(torch.optim.AdamW(list(lora_parameters(model)), lr=1e-2), ddp, rho=0.2, schedule="constant", seed=3, rank_noise=rank_noise)
    noise = _noise_of_first_step(opt, model)
    for step in range(3):
        x, y = batch(100 * step + rank)  # each rank its own data
        with opt.perturbed():
            loss = nn.functional.cross_entropy(ddp(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
    restored = all(torch.equal(bits(p), before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    lora = [p.detach().cpu() for p in lora_parameters(model)]
    torch.save({"noise": noise, "restored": restored, "lora": lora, "names": [t.name for t in opt.targets]}, os.path.join(out_dir, f"rank{rank}.pt"))
    end_worker_process()


def _run(backend: str, rank_noise: str, tmp_path) -> list:
    mp.spawn(_worker, args=(2, _rendezvous(tmp_path), backend, rank_noise, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_independent_noise_per_rank(backend, tmp_path):
    r0, r1 = _run(backend, "independent", tmp_path)
    assert r0["restored"] and r1["restored"]  # base weights bitwise identical on every rank
    assert r0["names"] == ["0", "2", "4"]  # named as in the bare model, not "module.0"
    assert not torch.equal(r0["noise"], r1["noise"])  # independent streams
    assert all(torch.equal(a, b) for a, b in zip(r0["lora"], r1["lora"]))  # DDP all-reduced the LoRA grads
    assert torch.equal(_single_process_noise(_device(backend, 0)), r0["noise"])  # rank 0 = one process


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_shared_noise(backend, tmp_path):
    r0, r1 = _run(backend, "shared", tmp_path)
    assert r0["restored"] and r1["restored"]
    assert torch.equal(r0["noise"], r1["noise"])
    assert all(torch.equal(a, b) for a, b in zip(r0["lora"], r1["lora"]))


def _fsdp_worker(rank: int, world: int, rendezvous: str, backend: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = _init(backend, rank, world, rendezvous)
    mesh = init_device_mesh(device.type, (world,))
    model = make_mlp(seed=0).to(device)
    for layer in model:
        if hasattr(layer, "lora_A"):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    before = [bits(p.to_local()) for p in frozen]
    try:
        FlatLoRA(torch.optim.AdamW(list(lora_parameters(model))), model, rho=0.2, schedule="constant", mode="virtual")
        refused = False
    except ValueError as error:
        refused = "FSDP2" in str(error)
    opt = FlatLoRA(torch.optim.AdamW(list(lora_parameters(model)), lr=1e-2), model, rho=0.2, schedule="constant", seed=3, rank_noise="shared")
    layer = model[2]
    clean = layer.weight.to_local().detach().clone()
    with opt.perturbed():
        noise = layer.weight.to_local().detach() - clean
        state = model.state_dict()  # while perturbed: clean copies, still sharded
    clean_state = torch.equal(bits(state["2.weight"].to_local()), bits(clean)) and not torch.equal(bits(clean), bits(clean + noise))
    offset = opt.targets[1].row_range()[0]
    for step in range(3):
        x, y = batch(100 * step + rank)
        with opt.perturbed():
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
    restored = all(torch.equal(bits(p.to_local()), b) for p, b in zip(frozen, before))
    result = {"noise": noise.cpu(), "offset": offset, "restored": restored, "refused": refused, "clean_state": clean_state}
    torch.save(result, os.path.join(out_dir, f"fsdp{rank}.pt"))
    end_worker_process()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_perturbs_local_rows_like_a_single_process(backend, tmp_path):
    """Each rank perturbs its own Shard(0) rows in place; together they draw the single-process noise
    (same z for the same global row; the row stds agree to float32 rounding, rtol 1e-5)."""
    mp.spawn(_fsdp_worker, args=(2, _rendezvous(tmp_path), backend, str(tmp_path)), nprocs=2, join=True)
    ranks = sorted((torch.load(tmp_path / f"fsdp{r}.pt") for r in range(2)), key=lambda r: r["offset"])
    assert all(r["restored"] for r in ranks)  # base weights bitwise identical on every rank
    assert all(r["refused"] for r in ranks)  # virtual mode refuses FSDP2 clearly
    assert all(r["clean_state"] for r in ranks)  # state_dict() while perturbed holds the clean shards
    assert [r["offset"] for r in ranks] == [0, 16] and all(r["noise"].shape == (16, 32) for r in ranks)
    sharded_noise = torch.cat([r["noise"] for r in ranks])
    torch.testing.assert_close(sharded_noise, _single_process_noise(_device(backend, 0)), rtol=1e-5, atol=1e-7)
    assert sharded_noise.abs().sum() > 0


def _gather_worker(rank: int, world: int, rendezvous: str, backend: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from flatlora_optim.sharding import full, gathered

    device = _init(backend, rank, world, rendezvous)
    mesh = init_device_mesh(device.type, (world,))
    gen = torch.Generator().manual_seed(0)  # the same values on every rank
    shapes = [(8, 6), (5, 3), (1, 4), (3, 2, 2)]  # even, uneven (3 + 2 rows), a rank with no rows, 3-D
    values = [torch.randn(s, generator=gen).to(device) for s in shapes] + [torch.randn(4, 4, generator=gen).to(device, torch.bfloat16)]
    tensors = [distribute_tensor(v, mesh, [Shard(0)]) for v in values]
    with gathered(tensors):
        inside = [full(t).cpu() for t in tensors]
        cached = all(full(t) is full(t) for t in tensors)  # served from the one gather, not gathered again
    after = [full(t).cpu() for t in tensors]  # the one-by-one path again
    ok = cached and all(torch.equal(a, v.cpu()) and torch.equal(b, v.cpu()) for a, b, v in zip(inside, after, values))
    from flatlora_optim.sharding import check_row_sharded

    weight = distribute_tensor(torch.randn(6, 4, generator=gen).to(device), mesh, [Shard(0)])
    refused = []
    for b in (distribute_tensor(torch.randn(6, 2, generator=gen).to(device), mesh, [Shard(1)]), torch.randn(6, 2).to(device)):
        try:
            check_row_sharded("w", weight, False, "inplace", [b])
            refused.append(False)
        except ValueError as error:
            refused.append("B" in str(error))
    check_row_sharded("w", weight, False, "inplace", [distribute_tensor(torch.randn(6, 2, generator=gen).to(device), mesh, [Shard(0)])])
    column_sharded = distribute_tensor(torch.randn(6, 4, generator=gen).to(device), mesh, [Shard(1)])
    try:
        check_row_sharded("w", column_sharded, False, "inplace")
        refused.append(False)
    except ValueError as error:
        refused.append("Shard(0) on a 1-D mesh" in str(error))
    ok = ok and all(refused)  # a weight not row-sharded, or a B not sharded like the weight, is refused; Shard(0) B is not
    torch.save({"ok": ok}, os.path.join(out_dir, f"gather{rank}.pt"))
    end_worker_process()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_factors_are_gathered_whole_in_one_block(backend, tmp_path):
    """``sharding.gathered``: every rank gets each Shard(0) DTensor's whole value (even and uneven row
    splits, a rank without rows, 3-D, two dtypes), equal to ``full_tensor()``; a weight not sharded on
    rows, and an adapter B not sharded like its weight, are refused with a clear error."""
    mp.spawn(_gather_worker, args=(2, _rendezvous(tmp_path), backend, str(tmp_path)), nprocs=2, join=True)
    assert all(torch.load(tmp_path / f"gather{r}.pt")["ok"] for r in range(2))


def _empty_shard_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    from datetime import timedelta

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world, timeout=timedelta(seconds=60))  # a hang fails, not stalls CI
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    model = make_mlp(seed=0)  # the last layer has 5 rows: with 4 ranks, rank 3 holds none of them

    def place(p):
        return Shard(1) if p.shape[0] == 4 else None  # every A (r = 4 rows) sharded on its columns instead

    for layer in model:
        if hasattr(layer, "lora_A"):
            fully_shard(layer, mesh=mesh, shard_placement_fn=place)
    fully_shard(model, mesh=mesh)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    before = [bits(p.to_local()) for p in frozen]
    opt = FlatLoRA(torch.optim.AdamW(list(lora_parameters(model)), lr=1e-2), model, rho=0.2, schedule="constant", seed=3)
    for step in range(2):
        train_step(model, opt, step)
    with opt.perturbed():  # a rank with no rows of the layer computes no stds for it (its collective would hang)
        regenerated = tuple(opt.regenerate_noise(opt.targets[2].name).shape)
    restored = all(torch.equal(bits(p.to_local()), b) for p, b in zip(frozen, before))
    torch.save({"restored": restored, "rows": opt.targets[2].rows().shape[0], "regenerated": regenerated},
               os.path.join(out_dir, f"empty{rank}.pt"))
    end_worker_process()


def test_fsdp2_rank_without_rows_takes_part_in_every_collective(tmp_path):
    """4 ranks, a 5-row layer (rank 3 holds none of its rows), every A sharded on its columns (gathered one
    by one): every rank joins the same collectives (a rank that skipped one used to leave the others
    waiting forever), trains, and restores its shards bitwise."""
    mp.spawn(_empty_shard_worker, args=(4, _rendezvous(tmp_path), str(tmp_path)), nprocs=4, join=True)
    ranks = [torch.load(tmp_path / f"empty{r}.pt") for r in range(4)]
    assert all(r["restored"] for r in ranks)
    assert [r["rows"] for r in ranks] == [2, 2, 1, 0]
    assert [r["regenerated"] for r in ranks] == [(2, 32), (2, 32), (1, 32), (0, 32)]


def _unsharded_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    from datetime import timedelta

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for case in ("evaluation forward, reshard_after_forward=False", "set_reshard_after_backward(False)"):
        model = make_mlp(seed=0)
        for layer in model:
            if hasattr(layer, "lora_A"):
                fully_shard(layer, mesh=mesh, reshard_after_forward=not case.startswith("evaluation"))
        fully_shard(model, mesh=mesh, reshard_after_forward=not case.startswith("evaluation"))
        if not case.startswith("evaluation"):
            model.set_reshard_after_backward(False)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        before = [bits(p.to_local()) for p in frozen]
        opt = FlatLoRA(torch.optim.AdamW(list(lora_parameters(model)), lr=1e-2), model, rho=0.2, schedule="constant", seed=3)
        with torch.no_grad():
            model(batch(9)[0])  # an evaluation: with reshard_after_forward=False the unsharded copies stay registered
        x, y = batch(rank)
        error = None
        try:
            with opt.perturbed():
                noisy = [not torch.equal(bits(p.to_local()), b) for p, b in zip(frozen, before) if p.dim() == 2]
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        except RuntimeError as exc:
            error = str(exc)
        results[case] = {"noisy_shards": all(noisy), "error": error, "restored": all(torch.equal(bits(p.to_local()), b) for p, b in zip(frozen, before))}
    torch.save(results, os.path.join(out_dir, f"unsharded{rank}.pt"))
    end_worker_process()


def test_fsdp2_unsharded_parameters_are_resharded_before_the_noise_or_refused_after_the_backward(tmp_path):
    """With ``reshard_after_forward=False`` an evaluation forward leaves FSDP2's unsharded copies registered: the noise
    once went into those copies (the shards were never perturbed; the restore then failed for good). They are resharded
    first now. With ``set_reshard_after_backward(False)`` the copies are registered when the backward ends: the restore
    once went into them (one rank's shards kept the noise silently, another raised, and the run hung); the shards are
    restored now, and the backward raises a clear error on every rank."""
    mp.spawn(_unsharded_worker, args=(2, _rendezvous(tmp_path), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"unsharded{rank}.pt")
        evaluation = results["evaluation forward, reshard_after_forward=False"]
        assert evaluation == {"noisy_shards": True, "error": None, "restored": True}, (rank, evaluation)
        kept = results["set_reshard_after_backward(False)"]
        assert kept["restored"] and kept["noisy_shards"] and "reshard_after_backward" in (kept["error"] or ""), (rank, kept)


def _fsdp_loop_worker(rank: int, world: int, rendezvous: str, backend: str, out_dir: str) -> None:
    """A training loop inside one block, and the same loop with a block per step, on a model FSDP2 shards at its root
    only: its pre-forward gathers every weight, and the hook that draws the next step's noise must run before it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = _init(backend, rank, world, rendezvous)
    mesh = init_device_mesh(device.type, (world,))
    result = {}
    for one_block in (True, False):
        model = make_mlp(seed=0).to(device)
        fully_shard(model, mesh=mesh)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        before = [bits(p.to_local()) for p in frozen]
        opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.2, schedule="constant", seed=3,
                       rank_noise="shared")

        def step(s, model=model, opt=opt):
            x, y = batch(100 * s + rank)
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
            opt.zero_grad()

        steps_in_blocks(opt, step, 3, one_block)
        restored = all(torch.equal(bits(p.to_local()), b) for p, b in zip(frozen, before))
        result[one_block] = (restored, [p.to_local().detach().cpu().clone() for p in lora_parameters(model)])
    torch.save(result, os.path.join(out_dir, f"loop{rank}.pt"))
    end_worker_process()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_training_loop_inside_one_block_is_a_block_per_step(backend, tmp_path):
    """(The draw's hook once ran after FSDP2's gather, and the second step refused: "FSDP2 holds ... unsharded".)"""
    mp.spawn(_fsdp_loop_worker, args=(2, _rendezvous(tmp_path), backend, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"loop{rank}.pt")
        assert result[True][0] and result[False][0], "frozen shards not restored bitwise"
        assert all(torch.equal(a, b) for a, b in zip(result[True][1], result[False][1]))
