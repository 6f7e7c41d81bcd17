"""The fused exact codec on the layouts a layer's rows can have, side by side: the same 277 M bf16 elements as
contiguous rows and as transposed views (GPT-2's Conv1D weights, peft's ``fan_in_fan_out``: each row is a
column of the stored matrix), the latter with the transposed tiles off (the default for now: row-major tiles)
and on. CUDA events, kernels only, median of 7; every pass must restore every bit.

    cd benchmarks && PYTHONPATH=.. python3 codec_layouts.py
    cd benchmarks && PYTHONPATH=.. python3 codec_layouts.py --against old_triton_noise.py   # an older kernel module beside it

An older module is timed with the transposed tiles off (it has no others).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import List

import torch
from codec_ablation import SOURCE, load_variant, measure, timer

from flatlora_optim.kernels.layer_table import transposed_tiles


def layouts(count: int = 24, shape=(5632, 2048)) -> List[tuple]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    contiguous = [(torch.randn(*shape, device="cuda", generator=gen) * 0.02).to(torch.bfloat16) for _ in range(count)]
    transposed = [(torch.randn(shape[1], shape[0], device="cuda", generator=gen) * 0.02).to(torch.bfloat16).t() for _ in range(count)]
    return [("contiguous rows", contiguous, False), ("transposed views", transposed, False), ("transposed, tiles on", transposed, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, action="append", default=[], help="also time another version of triton_noise.py")
    args = parser.parse_args()
    timed = timer(torch.device("cuda"))
    print("24 bf16 weights of 5632 x 2048 elements each (277 M), row std 1e-3; GPU ms per pass, median of 7")
    print(f"{'kernels':34s} {'layout':22s} {'perturb ms':>11s} {'restore ms':>11s} {'record %':>9s}")
    with tempfile.TemporaryDirectory() as folder:
        modules = [("as shipped", load_variant("as shipped", [], Path(folder), SOURCE))]
        modules += [(f"source {path.name}", load_variant(f"against {path.name}", [], Path(folder), path)) for path in args.against]
        for layout, weights, turned in layouts():
            for name, module in modules:
                if turned and not hasattr(module, "tile_shape"):
                    continue  # a module from before the transposed tiles
                with transposed_tiles(turned):
                    result = measure(module, weights, None, True, timed, 7)
                print(f"{name:34s} {layout:22s} {result['perturb_ms']:11.3f} {result['restore_ms']:11.3f} {result['record_pct']:9.3f}")


if __name__ == "__main__":
    main()
