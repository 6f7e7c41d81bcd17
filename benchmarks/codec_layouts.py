"""The fused kernels on the layouts a layer's rows can have, side by side: the same 277 M bf16 elements as
contiguous rows and as transposed views (GPT-2's Conv1D weights, peft's ``fan_in_fan_out``: each row is a
column of the stored matrix), the latter with the codec's transposed tiles off (row-major tiles) and on (the
default). Per layout: the exact codec's perturb and restore passes (every pass must restore every bit), the
row stds of rank-8 bf16 adapters (every mode's first launch), and virtual mode's ``fl(W + e)`` of every weight
(its forward's launches). CUDA events, kernels only (the launches of the last two issued while a sleep kernel keeps
the GPU busy), median of 7.

    cd benchmarks && PYTHONPATH=.. python3 codec_layouts.py
    cd benchmarks && PYTHONPATH=.. python3 codec_layouts.py --against old_triton_noise.py   # an older kernel module beside it
    TRITON_INTERPRET=1 python benchmarks/codec_layouts.py --small   # a smoke test on CPU (times meaningless)

An older module is timed with the transposed tiles off (it has no others).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from codec_ablation import INTERPRETED, SOURCE, load_variant, measure, timer
from interpreter_compat import patch_interpreter

from flatlora_optim.kernels.layer_table import LayerTable, transposed_tiles


def layouts(device: torch.device, count: int = 24, shape=(5632, 2048)) -> List[tuple]:
    gen = torch.Generator(device=device).manual_seed(0)
    contiguous = [(torch.randn(*shape, device=device, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(count)]
    transposed = [(torch.randn(shape[1], shape[0], device=device, generator=gen) * 0.02).to(torch.bfloat16).t() for _ in range(count)]
    return [("contiguous rows", contiguous, False), ("transposed views", transposed, False), ("transposed, tiles on", transposed, True)]


def side_by_side_setup(small: bool) -> Tuple[torch.device, List[tuple], int, int]:
    """``(device, layouts, repetitions, rounds)`` for the scripts that time variants of the kernel module on these
    layouts side by side (:func:`layouts`): 24 weights of 5632 x 2048 on CUDA, or with ``small`` (and under the
    interpreter, which this sets up) 2 of 300 x 64, timed once."""
    if INTERPRETED:
        patch_interpreter()  # float32 -> bfloat16 rounded as on the GPU
    device = torch.device("cpu" if INTERPRETED else "cuda")
    count, shape, reps, rounds = (2, (300, 64), 1, 1) if small else (24, (5632, 2048), 7, 2)
    return device, layouts(device, count, shape), reps, rounds


def read_passes(module, weights: List[torch.Tensor], timed, reps: int, rank: int = 8) -> Dict[str, float]:
    """GPU ms of ``module``'s row stds over ``weights`` (rank-``rank`` bf16 adapters) and of virtual mode's
    ``fl(W + e)`` of each weight into a new contiguous tensor (what its forward does, one launch a layer)."""
    kernel = module.TritonNoiseKernel()
    device = weights[0].device
    gen = torch.Generator(device=device).manual_seed(1)
    adapters = [((torch.randn(rank, w.shape[1], device=device, generator=gen) * 0.02).to(w.dtype),
                 (torch.randn(w.shape[0], rank, device=device, generator=gen) * 0.02).to(w.dtype), 2.0) for w in weights]
    table = LayerTable(weights)
    std = torch.empty(sum(w.shape[0] for w in weights), dtype=torch.float32, device=device)
    scales = [1e-3 / w.shape[1] ** 0.5 for w in weights]
    bases = [0] + [int(x) for x in torch.tensor([w.shape[0] for w in weights]).cumsum(0)]
    seeds = torch.arange(len(weights), dtype=torch.int64, device=device)
    launches = [module.LayerLaunch(w, std[bases[i]:bases[i + 1]], seeds[i:i + 1], w.shape[0], torch.float32) for i, w in enumerate(weights)]
    kernel.row_stds(table, adapters, scales, std)  # compiles
    for launch in launches:
        launch()
    stds = [timed(lambda: kernel.row_stds(table, adapters, scales, std)) for _ in range(reps)]
    formed = [timed(lambda: [launch() for launch in launches]) for _ in range(reps)]
    return {"row_std_ms": statistics.median(stds), "virtual_ms": statistics.median(formed)}


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, action="append", default=[], help="also time another version of triton_noise.py")
    parser.add_argument("--small", action="store_true", help="2 weights of 300 x 64 (a smoke test under the interpreter)")
    args = parser.parse_args(argv)
    device, timed_layouts, reps, _ = side_by_side_setup(args.small)
    timed, hidden = timer(device), timer(device, hide_host=True)
    first = timed_layouts[0][1]
    print(f"{len(first)} bf16 weights of {first[0].shape[0]} x {first[0].shape[1]} elements each, row std 1e-3; GPU ms per pass, "
          f"median of {reps}")
    print(f"{'kernels':34s} {'layout':22s} {'perturb ms':>11s} {'restore ms':>11s} {'record %':>9s} {'row stds ms':>12s} "
          f"{'virtual W+e ms':>15s}")
    with tempfile.TemporaryDirectory() as folder:
        modules = [("as shipped", load_variant("as shipped", [], Path(folder), SOURCE))]
        modules += [(f"source {path.name}", load_variant(f"against {path.name}", [], Path(folder), path)) for path in args.against]
        results = {}
        for layout, weights, turned in timed_layouts:
            for name, module in modules:
                if turned and not hasattr(module, "tile_shape"):
                    continue  # a module from before the transposed tiles
                with transposed_tiles(turned):
                    result = measure(module, weights, None, True, timed, reps)  # raises unless every bit comes back
                    result.update(read_passes(module, weights, hidden, reps))
                results[f"{name}, {layout}"] = result
                print(f"{name:34s} {layout:22s} {result['perturb_ms']:11.3f} {result['restore_ms']:11.3f} {result['record_pct']:9.3f} "
                      f"{result['row_std_ms']:12.3f} {result['virtual_ms']:15.3f}")
    return results


if __name__ == "__main__":
    main()
