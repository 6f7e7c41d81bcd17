"""Where the fused exact codec's time goes: the codec against variants of itself, side by side.

Each variant is the kernel module's own source with one change (a constant, or a stage left out),
loaded as a separate module, and timed on the same weights with CUDA events (kernels only, no
host work): the perturb pass and the restore pass, median of 7. Variants marked *exact* must still
restore every bit (checked); the others leave a stage out and only say what that stage costs.

    python benchmarks/codec_ablation.py            # 24 bf16 weights of 5632 x 2048 (277 M elements)
    TRITON_INTERPRET=1 python benchmarks/codec_ablation.py --small   # a smoke test on CPU (times meaningless)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from codec_time import codec_noise, codec_weights

import flatlora_optim.kernels.layer_table as layer_table
from flatlora_optim.kernels.layer_table import LayerTable

SOURCE = Path(__file__).resolve().parents[1] / "flatlora_optim" / "kernels" / "triton_noise.py"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

FIELDS_WRITE = "                _or_bits_at(stream_ptr + word_base, starts.to(tl.int64), record, ASM)\n"
FIELDS_READ = "record = _bits_window(stream_ptr + word_base, starts.to(tl.int64), group_bits, ASM)"
STREAM_ATOMIC = 'word_base = tl.atomic_add(counters_ptr, n_words.to(tl.int64), sem="relaxed")'
TILE_TOTALS = "totals = tl.sum(tl.reshape(group_bits + (group_exceptions << 16), (TR * G,)), axis=0)"
TILE_SCAN = "    return tl.reshape(tl.cumsum(flat, axis=0) - flat, (TR, G))"
WIDTHS = "    width = tl.where(ambiguous, 1 << steps, 0)"

# name -> (edits of the source, tile rows or None, restores exactly?)
Variant = Tuple[List[Tuple[str, str]], Optional[int], bool]
VARIANTS: Dict[str, Variant] = {
    "as shipped": ([], None, True),
    "acquire-release atomics": ([('sem="relaxed"', "sem=None")], None, True),
    "Philox 7 rounds": ([("_PHILOX_ROUNDS = 10", "_PHILOX_ROUNDS = 7")], None, True),
    "perturb with 8 warps": ([("_PERTURB_WARPS = 4\n", "_PERTURB_WARPS = 8\n")], None, True),
    "restore with 8 warps": ([("_RESTORE_WARPS = 4\n", "_RESTORE_WARPS = 8\n")], None, True),
    "8 x 512 tiles, 8/8 warps": ([("_PERTURB_WARPS = 4\n", "_PERTURB_WARPS = 8\n"),
                                  ("_RESTORE_WARPS = 4\n", "_RESTORE_WARPS = 8\n")], 8, True),
    "2 x 512 tiles, 2/2 warps": ([("_PERTURB_WARPS = 4\n", "_PERTURB_WARPS = 2\n"),
                                  ("_RESTORE_WARPS = 4\n", "_RESTORE_WARPS = 2\n")], 2, True),
    "2 x 512 tiles, 4/4 warps": ([], 2, True),
    "2 x 512 tiles, 2/4 warps": ([("_PERTURB_WARPS = 4\n", "_PERTURB_WARPS = 2\n")], 2, True),
    "1 x 512 tiles, 2/2 warps": ([("_PERTURB_WARPS = 4\n", "_PERTURB_WARPS = 2\n"),
                                  ("_RESTORE_WARPS = 4\n", "_RESTORE_WARPS = 2\n")], 1, True),
    "precise Box-Muller (libdevice)": ([("_FAST_NORMALS = _ASM and libdevice is not None", "_FAST_NORMALS = False")], None, True),
    "perturb: fields not written": ([(FIELDS_WRITE, "")], None, False),
    "restore: fields not read": ([(FIELDS_READ, "record = group_bits.to(tl.uint64) * 0")], None, False),
    "both: 2-bit fields only": ([(WIDTHS, "    width = tl.where(ambiguous, 2, 0)")], None, False),
    "perturb: fl(W + e) only (noise floor)": ([("    if PLAIN:\n", "    if PLAIN or not RESTORE:\n")], None, False),
    "restore: no codec (noise floor)": ([("key = cand_key + field - (limit >> 1)", "key = cand_key")], None, False),
    # what reserving a tile's words costs: a fixed place per tile instead of the one atomic add on one counter
    # (tiles needing more than 16 words overwrite their neighbours' bits: timing only)
    "perturb: no stream atomic": ([(STREAM_ATOMIC, "word_base = (t.to(tl.int64) * 16) % (word_capacity - 512)")], None, False),
    "perturb: no tile totals, no stream atomic": ([(STREAM_ATOMIC, "word_base = (t.to(tl.int64) * 16) % (word_capacity - 512)"),
                                                   (TILE_TOTALS, "totals = tl.full((), 640, tl.int32)")], None, False),
    "both: no running total over the tile": ([(TILE_SCAN, "    return tl.reshape(flat * 0 + tl.arange(0, TR * G) * 8, (TR, G))")], None, False),
}


def load_variant(name: str, edits: List[Tuple[str, str]], folder: Path, source: Path = SOURCE):
    """The kernel module (``source``) with ``edits`` applied, imported under its own name."""
    # the package's relative imports, made absolute: the copy is imported outside the package
    text = source.read_text().replace("from ..", "from flatlora_optim.").replace("from .", "from flatlora_optim.kernels.")
    for old, new in edits:
        at = text.find(old)
        if at < 0 or (old[0] == " " and text[at - 1] != "\n"):  # indented edits must match whole lines
            raise RuntimeError(f"variant {name!r}: {old!r} is not in the kernel source any more")
        text = text.replace(old, new)
    module_name = "codec_variant_" + "".join(c if c.isalnum() else "_" for c in name)
    path = folder / f"{module_name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # Triton resolves a kernel's globals through its module
    spec.loader.exec_module(module)
    return module


def timer(device: torch.device, hide_host: bool = False) -> Callable[[Callable[[], None]], float]:
    """GPU milliseconds of ``fn`` between two CUDA events (NaN on CPU). With ``hide_host`` the launches are
    issued while a sleep kernel keeps the GPU busy, so the host's launch rate does not count."""
    def timed(fn: Callable[[], None]) -> float:
        if device.type != "cuda":
            fn()
            return float("nan")  # the interpreter: a smoke test, no times
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if hide_host:
            torch.cuda.synchronize()
            torch.cuda._sleep(50_000_000)  # about 25 ms: the host issues fn's launches meanwhile
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    return timed


def measure(module, weights: List[torch.Tensor], tile_rows: Optional[int], exact: bool, timed, reps: int) -> Dict[str, float]:
    """Perturb and restore passes of ``module``'s codec over ``weights``; ``tile_rows``: rows of the row-major tiles
    (``layer_table.TILE_ROWS``, which the table and the launches both read) while this runs."""
    saved = layer_table.TILE_ROWS
    if tile_rows is not None:
        layer_table.TILE_ROWS = tile_rows
    try:
        return _measure(module.TritonNoiseKernel(), weights, exact, timed, reps)
    finally:
        layer_table.TILE_ROWS = saved


def _measure(kernel, weights: List[torch.Tensor], exact: bool, timed, reps: int) -> Dict[str, float]:
    originals = [w.clone() for w in weights]
    table = LayerTable(weights)
    std, seeds = codec_noise(table)
    record = kernel.exact_perturb_layers(table, std, seeds)  # compiles; a counting pass sizes the buffers (+10%)
    kernel.exact_restore_layers(table, std, seeds, record)
    record = kernel.exact_perturb_layers(table, std, seeds)  # buffers as in every later step: last counts + 2%
    kernel.exact_restore_layers(table, std, seeds, record)
    perturb, restore = [], []
    for _ in range(reps):
        for w, o in zip(weights, originals):
            w.copy_(o)
        counters = torch.zeros(2, dtype=torch.int64, device=weights[0].device)
        record.stream.zero_()
        perturb.append(timed(lambda counters=counters: kernel._exact(table, std, seeds, record, restore=False, counters=counters)))
        restore.append(timed(lambda: kernel.exact_restore_layers(table, std, seeds, record)))
    wrong = sum(int((w.view(torch.int16) != o.view(torch.int16)).sum()) for w, o in zip(weights, originals))
    for w, o in zip(weights, originals):
        w.copy_(o)
    if exact and wrong:
        raise AssertionError(f"a variant that should restore exactly left {wrong} wrong elements")
    elements = sum(w.numel() for w in weights)
    return {"perturb_ms": statistics.median(perturb), "restore_ms": statistics.median(restore),
            "record_pct": 100 * record.nbytes() / (2 * elements), "wrong_elements": wrong}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="4 weights of 40 x 1024 (a smoke test; float16 under the interpreter)")
    parser.add_argument("--against", type=Path, action="append", default=[],
                        help="also time another version of triton_noise.py (e.g. `git show REV:flatlora_optim/kernels/triton_noise.py > old.py`)")
    parser.add_argument("--only", default="", help="time only the variants whose name contains one of these comma-separated texts (and the codec as shipped)")
    args = parser.parse_args()
    device = torch.device("cpu" if INTERPRETED else "cuda")
    shape, count = ((40, 1024), 4) if args.small else ((5632, 2048), 24)
    dtype = torch.float16 if INTERPRETED else torch.bfloat16  # the interpreter truncates float32 -> bfloat16 casts
    weights = codec_weights(device, dtype, shape, count)
    timed, reps = timer(device), (1 if args.small else 7)
    print(f"{count} {dtype} weights of {shape[0]} x {shape[1]}, row std 1e-3 (rho 0.05 on weights of std 0.02)")
    print(f"{'variant':34s} {'perturb ms':>11s} {'restore ms':>11s} {'record %':>9s}  exact")
    with tempfile.TemporaryDirectory() as folder:
        runs = [(name, load_variant, edits, tile_rows, exact, SOURCE) for name, (edits, tile_rows, exact) in VARIANTS.items()]
        runs[1:1] = [(f"source {path.name}", load_variant, [], None, True, path) for path in args.against]
        for name, load, edits, tile_rows, exact, source in runs:
            if name != "as shipped" and not any(part and part in name for part in args.only.split(",")):
                continue
            result = measure(load(name, edits, Path(folder), source), weights, tile_rows, exact, timed, reps)
            print(f"{name:34s} {result['perturb_ms']:11.3f} {result['restore_ms']:11.3f} {result['record_pct']:9.3f}  "
                  f"{'yes' if result['wrong_elements'] == 0 else 'no (stage left out)'}")


if __name__ == "__main__":
    main()
