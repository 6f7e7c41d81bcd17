"""Step time and peak memory per GPU under FSDP2: plain LoRA vs Flat-LoRA, side by side in one run.

The model and batch are ``step_time.py``'s (``--config gpu``: the 1 B Llama configuration, bf16, LoRA r=8 on
all seven projections, batch 8 x 1024 tokens *per rank*, AdamW). Each decoder layer and then the whole
model is wrapped with FSDP2's ``fully_shard``: every rank holds a contiguous block of rows of every weight
and Flat-LoRA perturbs those rows in place (``rank_noise="independent"``; virtual mode does not support
FSDP2 and is not measured). One process per GPU (NCCL), started by this script:

    python benchmarks/fsdp_step_time.py --config gpu --nproc 2 --json docs/benchmarks/fsdp-h200x2.json

``--config cpu`` runs the small CPU model with gloo (what the test suite runs). Every rank times its own
steps (each between two device synchronisations; median) and three blocks of steps back to back (median); the table shows
the slowest rank, since a step under FSDP2 ends when every rank's does. Peak memory is per rank, and the
extra peak is given as a fraction of the perturbed bytes that rank holds. At the end every rank checks that
its shards of the frozen weights are bitwise what they were before the first method ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from step_time import CONFIGS, build_model, make_ids, make_step, sync

METHODS = ["lora", "flat-exact", "flat-backup"]


def frozen_bits(model) -> List[torch.Tensor]:
    """Copies of this rank's shards of the frozen weights, as integers (so NaN payloads and -0.0 compare)."""
    from flatlora_optim.sharding import local

    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return [local(p).detach().contiguous().view(ints[p.element_size()]).clone()
            for p in model.parameters() if not p.requires_grad and p.is_floating_point()]


def shard(model, device: torch.device, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _rank(rank: int, world: int, rendezvous: str, cfg_name: str, cfg: Dict, methods: List[str], out: str) -> None:
    from flatlora_optim import FlatLoRA
    from flatlora_optim.sharding import local

    if cfg_name == "gpu":
        device = torch.device(f"cuda:{rank}")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=rendezvous, rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    model = build_model(cfg, device)  # the same seed on every rank: the same model, then sharded
    shard(model, device, world)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    wrapped = [local(m.base_layer.weight) for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    perturbed_bytes = sum(w.numel() * w.element_size() for w in wrapped)
    ids = make_ids(cfg, device, seed=1000 + rank)  # each rank its own batch
    clean = frozen_bits(model)
    results: Dict[str, Dict] = {}
    for method in methods:
        base = torch.optim.AdamW(lora_params, lr=1e-5)
        flat = None
        if method.startswith("flat-"):
            flat = FlatLoRA(base, model, rho=0.05, schedule="constant", seed=0, restore=method.split("-", 1)[1])
        step = make_step(model, ids, base, flat, None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(cfg["warmup"]):
            step()
        times = []
        for _ in range(cfg["steps"]):
            sync(device)
            dist.barrier()
            start = time.perf_counter()
            step()
            sync(device)
            times.append((time.perf_counter() - start) * 1000)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        blocks = []
        for _ in range(3):  # blocks of steps with no synchronisation in between, as a training loop runs them
            sync(device)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(cfg["back_to_back"]):
                step()
            sync(device)
            blocks.append((time.perf_counter() - start) * 1000 / cfg["back_to_back"])
        results[method] = {"ms_per_step": statistics.median(times), "ms_all": times, "ms_per_step_back_to_back": statistics.median(blocks),
                           "ms_back_to_back_blocks": blocks, "peak_bytes": peak}
        if rank == 0:
            print(f"{method:<12} rank 0: {results[method]['ms_per_step']:9.2f} ms/step", flush=True)
    exact = all(torch.equal(a, b) for a, b in zip(clean, frozen_bits(model)))
    report = {"rank": rank, "device": str(device), "perturbed_bytes": perturbed_bytes, "results": results, "weights_bitwise_equal": exact}
    torch.save(report, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def summarise(cfg_name: str, ranks: List[Dict]) -> Dict:
    """The per-rank reports and, per method, the slowest rank's medians and their ratios to plain LoRA."""
    methods = list(ranks[0]["results"])
    slowest = {m: max(r["results"][m]["ms_per_step"] for r in ranks) for m in methods}
    slowest_b2b = {m: max(r["results"][m]["ms_per_step_back_to_back"] for r in ranks) for m in methods}
    summary = {
        "config": cfg_name, "settings": CONFIGS[cfg_name], "world_size": len(ranks), "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cfg_name == "gpu" else "cpu", "date": time.strftime("%Y-%m-%d"),
        "ms_per_step_slowest_rank": slowest, "ratios": {m: slowest[m] / slowest["lora"] for m in methods},
        "ratios_back_to_back": {m: slowest_b2b[m] / slowest_b2b["lora"] for m in methods},
        "weights_bitwise_equal_every_rank": all(r["weights_bitwise_equal"] for r in ranks), "ranks": ranks,
    }
    if ranks[0]["results"]["lora"]["peak_bytes"] is not None:
        summary["extra_peak_fraction_of_perturbed_per_rank"] = {
            m: [(r["results"][m]["peak_bytes"] - r["results"]["lora"]["peak_bytes"]) / r["perturbed_bytes"] for r in ranks] for m in methods}
    return summary


def run(cfg_name: str, methods: List[str], nproc: int) -> Dict:
    if methods[0] != "lora":
        raise ValueError("the first method must be 'lora': the ratios are taken against it")
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(nproc, Path(out, "rendezvous").as_uri(), cfg_name, CONFIGS[cfg_name], methods, out), nprocs=nproc, join=True)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(nproc)]
    return summarise(cfg_name, ranks)


def print_table(summary: Dict) -> None:
    print(f"\nFSDP2, {summary['world_size']} ranks, {summary['config']} on {summary['device']} (torch {summary['torch']})")
    print(f"{'method':<12} | {'ms/step (slowest rank)':>22} | {'x LoRA':>7} | {'x LoRA, back to back':>20} | extra peak per rank | exact, every rank")
    for m, ms in summary["ms_per_step_slowest_rank"].items():
        extra = summary.get("extra_peak_fraction_of_perturbed_per_rank", {}).get(m)
        extra_s = ", ".join(f"{e:+.2%}" for e in extra) if extra is not None else "n/a (CPU)"
        print(f"{m:<12} | {ms:22.2f} | {summary['ratios'][m]:7.3f} | {summary['ratios_back_to_back'][m]:20.3f} | {extra_s:>19} | "
              f"{summary['weights_bitwise_equal_every_rank']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    summary = run(args.config, args.methods.split(","), args.nproc)
    print_table(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
