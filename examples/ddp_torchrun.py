"""Flat-LoRA under DDP or FSDP2: run with

    torchrun --nproc_per_node=2 examples/ddp_torchrun.py            # DDP, CPU, gloo
    torchrun --nproc_per_node=2 examples/ddp_torchrun.py --fsdp     # FSDP2 (fully_shard), CPU, gloo
    torchrun --nproc_per_node=2 examples/ddp_torchrun.py --backend nccl   # one GPU per process

Each rank perturbs its own replica of the frozen weights with its own noise stream (rank 0 draws what a
single process would draw); DDP all-reduces the LoRA gradients as usual. At the end every rank checks that
its base weights are bitwise unchanged.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from flatlora_optim import FlatLoRA, inject_lora, lora_parameters
from flatlora_optim.sharding import local


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank-noise", default="independent", choices=["independent", "shared"])
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2's fully_shard instead of DDP")
    args = parser.parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.backend == "nccl" else "cpu")
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    inject_lora(model, ["0", "2", "4"], r=4, alpha=8)
    model.to(device)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if hasattr(layer, "lora_A"):
                fully_shard(layer, mesh=mesh)
        ddp = fully_shard(model, mesh=mesh)  # each rank now holds some rows of every weight
    else:
        ddp = nn.parallel.DistributedDataParallel(model)
    before = [local(p).detach().clone() for p in model.parameters() if not p.requires_grad]
    # total_steps counts optimizer steps, which are the same on every rank (not samples seen by one rank)
    opt = FlatLoRA(torch.optim.AdamW(list(lora_parameters(model)), lr=1e-3), ddp, rho=0.05, total_steps=args.steps, rank_noise=args.rank_noise)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data shard
    for _ in range(args.steps):
        x = torch.randn(16, 32, generator=gen).to(device)
        y = (x[:, :4].argmax(dim=1)).to(device)
        with opt.perturbed():
            loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    unchanged = all(torch.equal(a, local(b)) for a, b in zip(before, (p for p in model.parameters() if not p.requires_grad)))
    print(f"rank {rank}/{world} ({'FSDP2' if args.fsdp else 'DDP'}): final loss {loss.item():.4f}, base weights bitwise unchanged: {unchanged}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
