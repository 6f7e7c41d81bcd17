"""DDP on CPU with 2 processes (gloo): training runs, base weights restored bitwise on every rank,
per-rank noise as documented (independent streams, rank 0 = single process; or shared)."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from conftest import batch, bits, make_mlp  # noqa: E402

from flatlora_optim import FlatLoRA, lora_parameters  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _noise_of_first_step(opt, model) -> torch.Tensor:
    layer = model[2]
    clean = layer.weight.detach().clone()
    with opt.perturbed():
        return layer.weight.detach() - clean


def _worker(rank: int, world: int, port: int, rank_noise: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = make_mlp(seed=0)
    before = {n: bits(p) for n, p in model.named_parameters() if not p.requires_grad}
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = FlatLoRA(torch.optim.AdamW(list(lora_parameters(model)), lr=1e-2), ddp, rho=0.2, schedule="constant", seed=3, rank_noise=rank_noise)
    noise = _noise_of_first_step(opt, model)
    for step in range(3):
        x, y = batch(100 * step + rank)  # each rank its own data
        with opt.perturbed():
            loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    restored = all(torch.equal(bits(p), before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    torch.save({"noise": noise, "restored": restored, "lora": [p.detach() for p in lora_parameters(model)], "names": [t.name for t in opt.targets]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _run(rank_noise: str, tmp_path) -> list:
    mp.spawn(_worker, args=(2, _free_port(), rank_noise, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_independent_noise_per_rank(tmp_path):
    r0, r1 = _run("independent", tmp_path)
    assert r0["restored"] and r1["restored"]  # base weights bitwise identical on every rank
    assert r0["names"] == ["0", "2", "4"]  # named as in the bare model, not "module.0"
    assert not torch.equal(r0["noise"], r1["noise"])  # independent streams
    assert all(torch.equal(a, b) for a, b in zip(r0["lora"], r1["lora"]))  # DDP all-reduced the LoRA grads
    single = make_mlp(seed=0)
    opt = FlatLoRA(torch.optim.AdamW(list(lora_parameters(single)), lr=1e-2), single, rho=0.2, schedule="constant", seed=3)
    assert torch.equal(_noise_of_first_step(opt, single), r0["noise"])  # rank 0 = one process


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_shared_noise(tmp_path):
    r0, r1 = _run("shared", tmp_path)
    assert r0["restored"] and r1["restored"]
    assert torch.equal(r0["noise"], r1["noise"])
    assert all(torch.equal(a, b) for a, b in zip(r0["lora"], r1["lora"]))


def test_dtensor_weights_are_refused_clearly():
    from types import SimpleNamespace

    from flatlora_optim.optimizer import _check_not_sharded

    DTensor = type("DTensor", (), {})
    with pytest.raises(ValueError, match="FSDP2"):
        _check_not_sharded([SimpleNamespace(name="q", weight=DTensor())])
