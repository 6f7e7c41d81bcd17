"""Extra memory held by each restore strategy, as a fraction of the perturbed weights' bytes.

Weights: Gaussian (the bulk of a trained layer) and Laplace (heavier tails, more values near zero,
so more elements whose low bits the rounding of W + e drops). Noise: the paper's per-row scale.

    python benchmarks/restore_memory.py [--rows 1024 --cols 4096 --seeds 3]
"""

from __future__ import annotations

import argparse
import json

import torch

from flatlora_optim.noise import add_noise
from flatlora_optim.restore import BackupRestore, ExactRestore, noise_dtype


def fraction(strategy, dist: str, dtype: torch.dtype, rho: float, rows: int, cols: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    if dist == "gaussian":
        w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    else:
        u = torch.rand(rows, cols, generator=gen, dtype=torch.float64) - 0.5
        w = -torch.sign(u) * torch.log1p(-2 * u.abs())
    w = (w * 0.02).to(dtype)
    rms = w.to(torch.float64).pow(2).mean(1, keepdim=True).sqrt()
    noise = (torch.randn(rows, cols, generator=gen, dtype=torch.float64) * rho * rms).to(noise_dtype(dtype))
    record = strategy.perturb(w, add_noise(w, noise), noise)
    return strategy.nbytes(record) / (w.numel() * w.element_size())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    results = []
    print(f"{'weights':<9} {'dtype':<9} {'rho':>5} | {'exact':>7} | {'backup':>7}")
    for dist in ["gaussian", "laplace"]:
        for dtype in [torch.float32, torch.bfloat16, torch.float16]:
            for rho in [0.05, 0.10, 0.15]:
                exact = max(fraction(ExactRestore(), dist, dtype, rho, args.rows, args.cols, s) for s in range(args.seeds))
                backup = fraction(BackupRestore(), dist, dtype, rho, args.rows, args.cols, 0)
                results.append({"weights": dist, "dtype": str(dtype).split(".")[-1], "rho": rho, "exact": exact, "backup": backup})
                print(f"{dist:<9} {results[-1]['dtype']:<9} {rho:>5} | {exact:7.2%} | {backup:7.2%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
