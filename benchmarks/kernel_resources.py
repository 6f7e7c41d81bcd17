"""Registers and spills of every CUDA kernel form, compiled for sm_90 (H100/H200) on any machine, no GPU needed.

Triton's real pipeline (TTIR, TTGIR, LLVM, PTX, ``ptxas`` from the Triton wheel) for an sm_90 target;
the counts are ``ptxas -v``'s for that PTX with Triton's flags. Registers per thread bound how many programs share a
multiprocessor (65,536 registers each), hence the occupancy that hides the codec's dependent loads.

    python benchmarks/kernel_resources.py
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Dict

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flatlora_optim.kernels import triton_noise as tn
from flatlora_optim.kernels.layer_table import TILE_COLS, TILE_ROWS

HOPPER = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
POINTER = {0: "*fp32", 1: "*bf16", 2: "*fp16", 3: "*fp64"}  # layer_table.DTYPE_CODES


def compile_for_hopper(kernel, types: Dict[str, str], constants: Dict[str, object], num_warps: int):
    """``kernel`` compiled for sm_90 with runtime argument ``types`` and ``constants`` (constexprs)."""
    names = [p.name for p in kernel.params]
    assert set(types) | set(constants) == set(names), set(names) ^ (set(types) | set(constants))
    signature = {name: types.get(name, "constexpr") for name in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "enable_fp_fusion": False})


def resource_usage(compiled) -> Dict[str, int]:
    """Registers per thread, spill stores and loads (bytes) and stack frame of ``compiled``: Triton's own
    ``ptxas`` run again on its PTX with the flags Triton passes (``-v`` prints the counts)."""
    arch = "sm_" + re.search(r"\.target\s+sm_(\w+)", compiled.asm["ptx"]).group(1)
    fmad = [] if compiled.metadata.enable_fp_fusion else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(compiled.asm["ptx"])
        command = [os.path.join(BIN, "ptxas"), "-lineinfo", *fmad, "-v", f"--gpu-name={arch}", source, "-o", os.path.join(folder, "kernel.o")]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    numbers = {
        "registers": r"Used (\d+) registers",
        "stack": r"(\d+) bytes stack frame",
        "spill_stores": r"(\d+) bytes spill stores",
        "spill_loads": r"(\d+) bytes spill loads",
    }
    return {key: int(re.search(pattern, log).group(1)) for key, pattern in numbers.items()}


CODEC_TYPES = {"layers_ptr": "*i64", "tile_layer_ptr": "*i16", "std_ptr": "*fp32", "seeds_ptr": "*i64", "counters_ptr": "*i64",
               "word_capacity": "i64", "exc_capacity": "i64", "bounds_ptr": "*i32", "stream_ptr": "*i64", "exc_layer_ptr": "*i16",
               "exc_index_ptr": "*i32", "exc_bits_ptr": "*i16"}


def codec_constants(form: str, w_code: int, variant: int) -> Dict[str, object]:
    """The constexprs of the codec's ``form`` (perturb, restore, plain) for a weight type and layout."""
    return dict(RESTORE=form == "restore", W_CODE=w_code, VARIANT=variant, MANT={1: 7, 2: 10}[w_code], TR=TILE_ROWS, TC=TILE_COLS,
                ASM=True, PLAIN=form == "plain")


def codec_warps(form: str) -> int:
    return tn._PERTURB_WARPS if form == "perturb" else tn._RESTORE_WARPS


def main() -> None:
    print(f"sm_90, Triton {triton.__version__}; bf16 weights, aligned rows (codec variant 3), tiles {TILE_ROWS} x {TILE_COLS}")
    print(f"{'kernel form':28s} {'warps':>5s} {'registers':>9s} {'spill stores B':>14s} {'programs/SM (by registers)':>26s}")
    for form in ("perturb", "restore", "plain"):
        warps = codec_warps(form)
        usage = resource_usage(compile_for_hopper(tn._codec_kernel, CODEC_TYPES, codec_constants(form, 1, 3), warps))
        per_sm = min(65536 // (usage["registers"] * 32 * warps), 64 // warps)
        print(f"{'codec, ' + form:28s} {warps:5d} {usage['registers']:9d} {usage['spill_stores']:14d} {per_sm:26d}")


if __name__ == "__main__":
    main()
