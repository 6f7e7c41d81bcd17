"""The GPU kernels of one Flat-LoRA step, alone, on the 1 B Llama's 112 weights: how the noise generator costs.

Every pass draws 822 M normals (Philox, then Box--Muller), so the generator sets the floor of each.
Timed with CUDA events, median of 7, side by side in one process. Each timed pass is queued behind a
25 ms sleep kernel, so the events measure the GPU's work and not the host's launch rate (virtual
mode's 112 launches take the host longer to issue than the GPU to run: in a training step the host
issues them while the GPU is busy with the model's matrix products):

- ``row stds``: the step's one launch (``||W_i + s B A_i||``, rank-8 adapters);
- ``virtual W+e``: virtual mode's forward, one launch per layer into a new tensor (its backward does
  it again);
- ``plain pass``: ``fl(W + e)`` in place for every layer (backup restore's perturb pass);
- ``exact perturb`` / ``exact restore``: the fused codec's two passes (in-place exact).

Rows: the kernels as shipped; the same with libdevice's precise Box--Muller; with 7 Philox rounds;
row-std kernel variants (among them the element-wise form, without tensor cores); the noise kernel's
warps and the codec's; and any other
version of ``triton_noise.py`` given with ``--against`` (e.g. the last release's).

    python benchmarks/noise_time.py --against old_triton_noise.py
    TRITON_INTERPRET=1 python benchmarks/noise_time.py --small    # a smoke test on CPU (times meaningless)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_ablation import INTERPRETED, SOURCE, load_variant, timer  # noqa: E402
from interpreter_compat import patch_interpreter  # noqa: E402

import flatlora_optim.kernels.layer_table as layer_table  # noqa: E402
from flatlora_optim.kernels.layer_table import LayerTable  # noqa: E402
from flatlora_optim.noise import rows_per_chunk  # noqa: E402

LLAMA_1B = [(2048, 2048)] * 4 + [(5632, 2048)] * 2 + [(2048, 5632)]
"""q, k, v, o, gate, up, down of one decoder layer (hidden 2048, MLP 5632), 16 layers."""


def weights_of(shapes: List[tuple], layers: int, device: torch.device, dtype: torch.dtype) -> List[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(*shape, device=device, generator=gen) * 0.02).to(dtype) for _ in range(layers) for shape in shapes]


def passes(kernel, weights: List[torch.Tensor], rank: int, adapter_dtype: Optional[torch.dtype] = None) -> Dict[str, Callable[[], None]]:
    """Each timed pass of a step, as a call on ``kernel`` (a TritonNoiseKernel of some version); adapters in
    ``adapter_dtype`` (the weights' type when None)."""
    table = LayerTable(weights)
    device = weights[0].device
    gen = torch.Generator(device=device).manual_seed(1)
    adapters = [(torch.randn(rank, w.shape[1], device=device, generator=gen).to(adapter_dtype or w.dtype) * 0.01,
                 torch.randn(w.shape[0], rank, device=device, generator=gen).to(adapter_dtype or w.dtype) * 0.01, 2.0) for w in weights]
    std = torch.empty(table.total_rows, device=device)
    std_scales = [0.05 / w.shape[1] ** 0.5 for w in weights]
    kernel.row_stds(table, adapters, std_scales, std)
    seeds = torch.arange(table.total_blocks, dtype=torch.int64, device=device) * 7919 + 3
    layer_std = [std[b:b + w.shape[0]] for b, w in zip(table.std_bases, weights)]
    layer_seeds = [seeds[b:] for b in table.seed_bases]
    record = kernel.exact_perturb_layers(table, std, seeds)  # compiles and sizes the buffers as a later step does
    kernel.exact_restore_layers(table, std, seeds, record)
    record = kernel.exact_perturb_layers(table, std, seeds)
    kernel.exact_restore_layers(table, std, seeds, record)
    state = {"record": record}

    def virtual() -> None:
        for w, s, sd in zip(weights, layer_std, layer_seeds):
            kernel.perturbed_layer(w, s, sd, rows_per_chunk(w.shape[1]), torch.float32)

    def exact_perturb() -> None:
        state["record"] = kernel.exact_perturb_layers(table, std, seeds)  # includes its one host sync

    def plain() -> None:
        kernel.add_noise_layers(table, std, seeds)

    return {
        "row stds": lambda: kernel.row_stds(table, adapters, std_scales, std),
        "virtual W+e": virtual,
        "exact perturb": exact_perturb,
        "exact restore": lambda: kernel.exact_restore_layers(table, std, seeds, state["record"]),
        "plain pass": plain,
    }


def measure(module, weights: List[torch.Tensor], rank: int, timed, reps: int, rows_per_program: int = 0,
            adapter_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    originals = [w.clone() for w in weights]
    saved = layer_table.ROWS_PER_PROGRAM
    if rows_per_program:  # the row-std kernel's rows per program: the table's row tiles and the launch's ROWS
        layer_table.ROWS_PER_PROGRAM = module.ROWS_PER_PROGRAM = rows_per_program
    try:
        steps = passes(module.TritonNoiseKernel(), weights, rank, adapter_dtype)
    finally:
        layer_table.ROWS_PER_PROGRAM = saved
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name in ("row stds", "virtual W+e", "exact perturb", "exact restore"):
            times[name].append(timed(steps[name]))
        times["plain pass"].append(timed(steps["plain pass"]))
        for w, o in zip(weights, originals):  # the plain pass keeps nothing: put W back by copy
            w.copy_(o)
    wrong = sum(int((w.view(torch.int16) != o.view(torch.int16)).sum()) for w, o in zip(weights, originals))
    result = {name: statistics.median(t) for name, t in times.items()}
    result["wrong_elements_after_exact"] = wrong
    return result


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    """Print the table; return each row's times by name."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="one narrow decoder layer (a smoke test)")
    parser.add_argument("--against", type=Path, action="append", default=[], help="also time another version of triton_noise.py")
    parser.add_argument("--only", default=None,
                        help="time only the variants whose name contains one of these comma-separated texts (and the kernels as shipped)")
    parser.add_argument("--adapters", choices=["weights", "float32"], default="weights",
                        help="the adapters' type: the weights' (bfloat16), or float32 (peft's default for a bfloat16 model)")
    args = parser.parse_args(argv)
    if INTERPRETED:
        patch_interpreter()
    device = torch.device("cpu" if INTERPRETED else "cuda")
    dtype = torch.bfloat16  # the interpreter, patched, rounds float32 -> bfloat16 as the GPU does
    shapes, layers = ([(64, 32)] * 4 + [(96, 32)] * 2 + [(32, 96)], 1) if args.small else (LLAMA_1B, 16)
    weights = weights_of(shapes, layers, device, dtype)
    timed, reps = timer(device, hide_host=True), (1 if args.small else 7)
    elements = sum(w.numel() for w in weights)
    adapter_dtype = torch.float32 if args.adapters == "float32" else None
    print(f"{len(weights)} {dtype} weights, {elements / 1e6:.1f} M elements, rank-8 {adapter_dtype or dtype} adapters; "
          f"GPU ms per pass, median of {reps}")
    columns = ["row stds", "virtual W+e", "plain pass", "exact perturb", "exact restore"]
    print(f"{'kernels':34s}" + "".join(f"{c:>15s}" for c in columns) + "  exact")
    variants = [("as shipped", SOURCE, {}, []), ("precise Box-Muller (libdevice)", SOURCE, {"_FAST_NORMALS": False}, []),
                ("Philox with 7 rounds", SOURCE, {"_PHILOX_ROUNDS": 7}, []),
                ("row stds: no fused multiply-adds", SOURCE, {"_STD_FP_FUSION": False}, []),
                ("row stds: 8 warps", SOURCE, {"_STD_WARPS": 8}, []),
                ("row stds: element-wise, 512 columns", SOURCE, {"_STD_DOT": False, "_STD_BLOCK_N": 512}, []),
                ("row stds: 16 rows per program", SOURCE, {"rows_per_program": 16}, []),
                ("row stds: 32 rows per program", SOURCE, {"rows_per_program": 32}, []),
                ("row stds: 128 rows per program", SOURCE, {"rows_per_program": 128}, []),
                ("row stds: element-wise, 16 rows", SOURCE, {"_STD_DOT": False, "rows_per_program": 16}, []),
                ("row stds: column loop not pipelined", SOURCE, {"_STD_STAGES": 1}, []),
                ("row stds: neither", SOURCE, {"_STD_FP_FUSION": False, "_STD_STAGES": 1}, []),
                ("row stds: element-wise, no tensor cores", SOURCE, {"_STD_DOT": False}, []),
                ("row stds: 128 columns per step (tensor cores)", SOURCE, {"_STD_DOT_BLOCK_N": 128}, []),
                ("row stds: 2 warps", SOURCE, {"_STD_WARPS": 2}, []),
                ("virtual: noise kernel 1 warp", SOURCE, {"_NOISE_WARPS": 1}, []),
                ("virtual: noise kernel 4 warps", SOURCE, {"_NOISE_WARPS": 4}, []),
                ("codec warps: perturb 8", SOURCE, {"_PERTURB_WARPS": 8}, []),
                ("codec warps: perturb 2", SOURCE, {"_PERTURB_WARPS": 2}, []),
                ("codec warps: restore 8", SOURCE, {"_RESTORE_WARPS": 8}, []),
                ("codec warps: plain 4", SOURCE, {"_PLAIN_WARPS": 4}, [])]
    variants += [(f"source {path.name}", path, {}, []) for path in args.against]
    if args.only is not None:
        variants = [v for v in variants if v[0] == "as shipped" or any(part and part in v[0] for part in args.only.split(","))]
    results: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        if not INTERPRETED:
            measure(load_variant("warm-up", [], Path(folder), SOURCE), weights, 8, timed, reps, 0, adapter_dtype)  # clocks up, caches warm; not shown
        for name, source, settings, edits in variants:
            module = load_variant(name, edits, Path(folder), source)
            settings = dict(settings)
            rows_per_program = settings.pop("rows_per_program", 0)
            for key, value in settings.items():
                setattr(module, key, value)
            try:
                result = measure(module, weights, 8, timed, reps, rows_per_program, adapter_dtype)
            except Exception as error:  # a variant that does not compile (say) does not stop the others
                print(f"{name:34s} failed: {type(error).__name__}: {str(error)[:200]}")
                continue
            results[name] = result
            exact = "yes" if result["wrong_elements_after_exact"] == 0 else f"no ({result['wrong_elements_after_exact']} wrong)"
            print(f"{name:34s}" + "".join(f"{result[c]:15.3f}" for c in columns) + f"  {exact}")
    return results


if __name__ == "__main__":
    main()
