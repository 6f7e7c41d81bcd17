"""The fused exact codec on the layouts a layer's rows can have, side by side: the same 277 M bf16 elements as
contiguous rows and as transposed views (GPT-2's Conv1D weights, peft's ``fan_in_fan_out``: each row is a
column of the stored matrix), the latter with the transposed tiles off (the default for now: row-major tiles)
and on. CUDA events, kernels only, median of 7; every pass must restore every bit.

    cd benchmarks && PYTHONPATH=.. python3 codec_layouts.py
    cd benchmarks && PYTHONPATH=.. python3 codec_layouts.py --against old_triton_noise.py   # an older kernel module beside it
    TRITON_INTERPRET=1 python benchmarks/codec_layouts.py --small   # a smoke test on CPU (times meaningless)

An older module is timed with the transposed tiles off (it has no others).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
from codec_ablation import INTERPRETED, SOURCE, load_variant, measure, timer
from interpreter_compat import patch_interpreter

from flatlora_optim.kernels.layer_table import transposed_tiles


def layouts(device: torch.device, count: int = 24, shape=(5632, 2048)) -> List[tuple]:
    gen = torch.Generator(device=device).manual_seed(0)
    contiguous = [(torch.randn(*shape, device=device, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(count)]
    transposed = [(torch.randn(shape[1], shape[0], device=device, generator=gen) * 0.02).to(torch.bfloat16).t() for _ in range(count)]
    return [("contiguous rows", contiguous, False), ("transposed views", transposed, False), ("transposed, tiles on", transposed, True)]


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, action="append", default=[], help="also time another version of triton_noise.py")
    parser.add_argument("--small", action="store_true", help="2 weights of 300 x 64 (a smoke test under the interpreter)")
    args = parser.parse_args(argv)
    if INTERPRETED:
        patch_interpreter()  # float32 -> bfloat16 rounded as on the GPU
    device = torch.device("cpu" if INTERPRETED else "cuda")
    count, shape, reps = (2, (300, 64), 1) if args.small else (24, (5632, 2048), 7)
    timed = timer(device)
    print(f"{count} bf16 weights of {shape[0]} x {shape[1]} elements each, row std 1e-3; GPU ms per pass, median of {reps}")
    print(f"{'kernels':34s} {'layout':22s} {'perturb ms':>11s} {'restore ms':>11s} {'record %':>9s}")
    with tempfile.TemporaryDirectory() as folder:
        modules = [("as shipped", load_variant("as shipped", [], Path(folder), SOURCE))]
        modules += [(f"source {path.name}", load_variant(f"against {path.name}", [], Path(folder), path)) for path in args.against]
        results = {}
        for layout, weights, turned in layouts(device, count, shape):
            for name, module in modules:
                if turned and not hasattr(module, "tile_shape"):
                    continue  # a module from before the transposed tiles
                with transposed_tiles(turned):
                    result = measure(module, weights, None, True, timed, reps)  # raises unless every bit comes back
                results[f"{name}, {layout}"] = result
                print(f"{name:34s} {layout:22s} {result['perturb_ms']:11.3f} {result['restore_ms']:11.3f} {result['record_pct']:9.3f}")
    return results


if __name__ == "__main__":
    main()
