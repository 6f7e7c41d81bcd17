"""Shared fixtures: tiny LoRA models built in code (no downloads)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
import torch
from torch import nn

from flatlora_optim import inject_lora, lora_parameters

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float64: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (so that NaN payloads and -0.0 compare exactly)."""
    return t.detach().contiguous().view(INT_VIEW[t.dtype]).clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def normal_sample_report(z: torch.Tensor) -> dict:
    """What :func:`assert_standard_normal` reads from a sample of the noise generator."""
    z = z.double().flatten()
    n = z.numel()
    ordered = z.sort().values
    cdf = torch.special.ndtr(ordered)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=z.device)
    return {"n": n, "ks": torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item(), "mean": z.mean().item(), "var": z.var().item(),
            "m4": (z ** 4).mean().item(), "beyond3": (z.abs() > 3).double().mean().item(), "near_zero": (z.abs() < 1e-6).sum().item(),
            "max": z.abs().max().item()}


def assert_standard_normal(report: dict) -> None:
    """Seeded sample of ``n`` normals against N(0, 1). Tolerances: Kolmogorov-Smirnov distance below its 1e-4 level
    ``sqrt(ln(2e4) / 2n)``; mean, variance, fourth moment and P(|z| > 3) within 5 standard errors; values within 1e-6
    of 0 under 1e-4 of the draws (N(0, 1) puts 8e-7 there; a grid of angles through 0 and +-pi/2 would put 1/2048);
    nothing past the largest
    normal the 20-bit radius can give, ``sqrt(40 ln 2) = 5.27``."""
    n = report["n"]
    assert report["ks"] < math.sqrt(math.log(2e4) / (2 * n)), report
    assert abs(report["mean"]) < 5 / math.sqrt(n), report
    assert abs(report["var"] - 1) < 5 * math.sqrt(2 / n), report
    assert abs(report["m4"] - 3) < 5 * math.sqrt(96 / n), report
    tail = 2 * (1 - 0.9986501019683699)  # P(|z| > 3)
    assert abs(report["beyond3"] - tail) < 5 * math.sqrt(tail / n), report
    assert report["near_zero"] < 1e-4 * n, report
    assert report["max"] <= math.sqrt(40 * math.log(2)) + 1e-5, report


def train_step(model: nn.Module, opt, seed: int) -> None:
    """One Flat-LoRA training step on ``batch(seed)``: forward in the block, backward after it, step, zero_grad."""
    x, y = batch(seed)
    with opt.perturbed():
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()


def steps_in_blocks(opt, step: Callable[[int], None], steps: int, one_block: bool) -> None:
    """Run ``step(s)`` for ``s`` in ``range(steps)``: the whole loop inside one ``opt.perturbed()`` block, or a block per
    step (what a loop inside one block must reproduce)."""
    if one_block:
        with opt.perturbed():
            for s in range(steps):
                step(s)
    else:
        for s in range(steps):
            with opt.perturbed():
                step(s)


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float32, width: int = 32, bias: bool = True, r: int = 4) -> nn.Module:
    """A 3-layer MLP with LoRALinear on every Linear; B is random so W + sBA != W."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, width, bias=bias), nn.Tanh(), nn.Linear(width, width, bias=bias), nn.Tanh(), nn.Linear(width, 5, bias=bias))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    inject_lora(model, ["0", "2", "4"], r=r, alpha=2 * r)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.to(dtype)


def frozen_weights(model: nn.Module) -> dict:
    return {n: bits(p) for n, p in model.named_parameters() if not p.requires_grad}


def assert_frozen_unchanged(model: nn.Module, before: dict) -> None:
    after = frozen_weights(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed"


def assert_block_refused_untouched(model: nn.Module, opt, error: type, match: str) -> None:
    """Entering ``opt.perturbed()`` raises ``error`` (its message matching ``match``) before any noise goes in."""
    before = frozen_weights(model)
    with pytest.raises(error, match=match):
        with opt.perturbed():
            pass
    assert_frozen_unchanged(model, before)
    assert not opt.is_perturbed


def batch(seed: int = 0, n: int = 16, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=gen).to(dtype), torch.randint(0, 5, (n,), generator=gen)


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for ``MASTER_PORT``; another process may take it before the ranks do)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_worker_process(children: Sequence[Any] = ()) -> None:
    """End a spawned ``torch.distributed`` worker: both ranks done before either tears down its process group, then
    leave at once. Even after the barrier, the interpreter's normal exit raced gloo's threads now and then ("terminate
    called without an active exception", SIGABRT: once in a CI run of the sixth session); save results before this.
    ``children``: processes this one started (``Popen``-like, Lightning's subprocess launcher's ranks), waited for
    before leaving; the first non-zero exit code among them is this process's."""
    import os
    import sys

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    codes = [child.wait() for child in children]
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(next((code for code in codes if code), 0))


def _torchrun_rank(rank: int, world: int, port: int, out_dir: str, train: Callable[[], Any]) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.save(train(), f"{out_dir}/rank{rank}.pt")
    end_worker_process()


def run_as_two_ranks(out_dir: Path, train: Callable[[], Any]) -> list:
    """``train()`` (a module-level function, or a ``functools.partial`` of one) in two spawned processes set up as
    ``torchrun`` would set them up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); each
    rank's result, in rank order."""
    import torch.multiprocessing as mp

    out_dir.mkdir()
    mp.spawn(_torchrun_rank, args=(2, free_port(), str(out_dir), train), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


def assert_ddp_matches_one_process(ranks: dict, single_lora: list, kind: str, steps: int) -> None:
    """``ranks``: per ``rank_noise`` ("shared", "independent"), each rank's result (``clean``: its frozen weights bitwise
    as they began; ``steps``: FlatLoRA's step count; ``lora``: its LoRA parameters on the CPU). Every rank is clean
    after ``steps`` steps with replicas equal; with shared noise the LoRA weights are one process's on the same
    batches (``single_lora``, within DDP_TOLERANCE), with independent noise they are not (each rank drew its own)."""
    for results in ranks.values():
        assert all(r["clean"] and r["steps"] == steps for r in results)
        assert all(torch.equal(a, b) for a, b in zip(results[0]["lora"], results[1]["lora"]))  # DDP keeps the replicas equal
    assert all(torch.allclose(a, b, rtol=0, atol=DDP_TOLERANCE[kind]) for a, b in zip(ranks["shared"][0]["lora"], single_lora))
    assert not all(torch.allclose(a, b, rtol=0, atol=1e-4) for a, b in zip(ranks["independent"][0]["lora"], single_lora))


DDP_KINDS = [
    pytest.param("cpu", id="gloo-cpu"),
    pytest.param("cuda", id="nccl-2gpu", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL: needs 2 CUDA devices")),
]
"""Where the integrations' DDP tests run: two CPU processes with gloo (every CI run), two GPUs with NCCL where a
machine has them."""

DDP_TOLERANCE = {"cpu": 1e-6, "cuda": 1e-5}
"""Absolute tolerance between two ranks' averaged gradients and one process's (the sums run in another order; cuBLAS
picks other kernels for other batch sizes)."""

