"""Virtual mode's ``fl(W + e)`` of transposed views (GPT-2's Conv1D) with the noise kernel's turned tiles of several
shapes and warps, side by side with row-major tiles and with contiguous rows: 277 M bf16 elements, CUDA events with
the host's launches hidden, median of 7, twice round. Each shape must give the bits of a contiguous copy.

    cd benchmarks && PYTHONPATH=.. python3 noise_tiles.py
    TRITON_INTERPRET=1 python benchmarks/noise_tiles.py --small   # a smoke test on CPU (times meaningless)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
from codec_ablation import load_variant, timer
from codec_layouts import read_passes, side_by_side_setup

TILE = "_TURNED_NOISE_TILE = (64, 32)"
WARPS = "_TURNED_NOISE_WARPS = 2"
VARIANTS = {
    "row-major tiles": [("    return rows is not None and rows.dim() == 2", "    return False and rows.dim() == 2")],
    "64 x 32, 2 warps (shipped)": [],
    "64 x 32, 4 warps": [(WARPS, "_TURNED_NOISE_WARPS = 4")],
    "128 x 16, 4 warps": [(TILE, "_TURNED_NOISE_TILE = (128, 16)"), (WARPS, "_TURNED_NOISE_WARPS = 4")],
    "32 x 64, 4 warps": [(TILE, "_TURNED_NOISE_TILE = (32, 64)"), (WARPS, "_TURNED_NOISE_WARPS = 4")],
    "64 x 64, 4 warps": [(TILE, "_TURNED_NOISE_TILE = (64, 64)"), (WARPS, "_TURNED_NOISE_WARPS = 4")],
    "64 x 64, 8 warps": [(TILE, "_TURNED_NOISE_TILE = (64, 64)"), (WARPS, "_TURNED_NOISE_WARPS = 8")],
}


def check_bits(module, weights: List[torch.Tensor]) -> None:
    """``fl(W + e)`` of each transposed view equals that of a contiguous copy of it, bit for bit."""
    kernel = module.TritonNoiseKernel()
    for i, w in enumerate(weights[:3]):
        std = torch.full((w.shape[0],), 1e-3, device=w.device)
        seeds = torch.tensor([5 + i], device=w.device)
        turned = kernel.perturbed_layer(w, std, seeds, w.shape[0], torch.float32)
        flat = kernel.perturbed_layer(w.contiguous(), std, seeds, w.shape[0], torch.float32)
        if not torch.equal(turned.view(torch.int16), flat.view(torch.int16)):
            raise AssertionError(f"weight {i}: fl(W + e) of the transposed view differs from that of a contiguous copy")


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2 weights of 300 x 64 (a smoke test under the interpreter)")
    args = parser.parse_args(argv)
    device, ((_, contiguous, _), (_, transposed, _), _), reps, rounds = side_by_side_setup(args.small)
    hidden = timer(device, hide_host=True)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        modules = {name: load_variant(name, edits, Path(folder)) for name, edits in VARIANTS.items()}
        for module in modules.values():
            check_bits(module, transposed)
        for round_ in range(rounds):
            ms = read_passes(modules["64 x 32, 2 warps (shipped)"], contiguous, hidden, reps)["virtual_ms"]
            results[f"contiguous rows, round {round_}"] = ms
            print(f"{'contiguous rows':30s} virtual W+e {ms:.3f} ms", flush=True)
            for name, module in modules.items():
                ms = read_passes(module, transposed, hidden, reps)["virtual_ms"]
                results[f"transposed, {name}, round {round_}"] = ms
                print(f"{'transposed, ' + name:30s} virtual W+e {ms:.3f} ms", flush=True)
    return results


if __name__ == "__main__":
    main()
