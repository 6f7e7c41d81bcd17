"""Time the fused exact codec alone (one perturb pass, one restore pass) and check it restores every bit.

24 bf16 weights of 5632 x 2048 (about the 1 B Llama's MLP weights), constant row std 1e-3
(rho 0.05 on weights of std 0.02). CUDA with Triton only:

    python benchmarks/codec_time.py
"""

from __future__ import annotations

import time
from typing import List, Tuple

import torch

from flatlora_optim.kernels.layer_table import LayerTable
from flatlora_optim.kernels.triton_noise import TritonNoiseKernel


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000, result


def codec_weights(device: torch.device, dtype: torch.dtype = torch.bfloat16, shape=(5632, 2048), count: int = 24) -> List[torch.Tensor]:
    """The codec benchmarks' weights: ``count`` of ``shape``, N(0, 0.02) from seed 0 (also codec_ablation.py's)."""
    gen = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(*shape, device=device, generator=gen) * 0.02).to(dtype) for _ in range(count)]


def codec_noise(table: LayerTable) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row stds (1e-3 everywhere: rho 0.05 on weights of std 0.02) and row-block seeds for ``table``."""
    std = torch.full((table.total_rows,), 0.001, device=table.device)
    seeds = torch.arange(table.total_blocks, dtype=torch.int64, device=table.device) * 7919 + 3
    return std, seeds


def main() -> None:
    kernel = TritonNoiseKernel()
    weights = codec_weights(torch.device("cuda"))
    before = [w.clone() for w in weights]
    table = LayerTable(weights)
    std, seeds = codec_noise(table)
    elements = sum(w.numel() for w in weights)
    for _ in range(4):
        perturb_ms, record = timed(lambda: kernel.exact_perturb_layers(table, std, seeds))
        restore_ms, _ = timed(lambda record=record: kernel.exact_restore_layers(table, std, seeds, record))
        wrong = sum(int((w.view(torch.int16) != b.view(torch.int16)).sum()) for w, b in zip(weights, before))
        print(f"{elements / 1e6:.0f} M elements: perturb {perturb_ms:.2f} ms, restore {restore_ms:.2f} ms, "
              f"record {record.nbytes() / (2 * elements):.2%} of the weights' bytes, wrong bits after restore: {wrong}")


if __name__ == "__main__":
    main()
