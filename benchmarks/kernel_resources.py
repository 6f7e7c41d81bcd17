"""Registers, spills and machine code of every CUDA kernel form, compiled for sm_90 (H100/H200) on any machine, no GPU needed.

Triton's real pipeline (TTIR, TTGIR, LLVM, PTX, ``ptxas`` from the Triton wheel) for an sm_90 target;
the counts are ``ptxas -v``'s for that PTX with Triton's flags. Registers per thread bound how many programs share a
multiprocessor (65,536 registers each), hence the occupancy that hides the codec's dependent loads. The SASS
(``nvdisasm`` of the cubin, from the same wheel) gives the static instruction count and the block-wide barriers
(``BAR``): layout conversions and reductions through shared memory show up as barriers, and the codec's passes are
bound by their instructions (docs/benchmarks.md).

    python benchmarks/kernel_resources.py

The kernels are compiled as the library launches them: the launches are recorded with CPU tensors
(``Launches``) and Triton's own binder turns their arguments into the signature it would compile.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Dict, List, Tuple

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from flatlora_optim.kernels import triton_noise as tn
from flatlora_optim.kernels.layer_table import TILE_COLS, TILE_ROWS

HOPPER = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
POINTER = {0: "*fp32", 1: "*bf16", 2: "*fp16", 3: "*fp64"}  # layer_table.DTYPE_CODES


class Launches:
    """Within ``with Launches("name") as launches:``, launches of ``triton_noise.<name>`` are recorded
    (positional and keyword arguments) instead of run: what the library would launch, on any device."""

    def __init__(self, name: str):
        self.name = name
        self.calls: List[Tuple[tuple, dict]] = []

    def __enter__(self) -> Launches:
        self._kernel = getattr(tn, self.name)
        setattr(tn, self.name, self)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(tn, self.name, self._kernel)

    def __getitem__(self, grid: object):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def compile_launch(kernel, args: tuple, kwargs: dict):
    """Compile ``kernel`` for sm_90 as a launch with these arguments would: Triton's own binder gives
    the signature, the constexprs and the specialisations (alignment, == 1), as in ``JITFunction.run``.

    This mirrors ``JITFunction.run`` of Triton 3.6 (the version the test extra pins) through private
    helpers (``create_function_from_signature``, ``_pack_args``); another Triton may need it adapted."""
    backend = make_backend(HOPPER)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug), instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=HOPPER, options=options.__dict__)


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


def sass_counts(compiled) -> Dict[str, int]:
    """Static SASS instructions and block-wide barriers (``BAR``) of ``compiled`` (every branch counted once)."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    instructions = [line.split("*/", 1)[1].strip() for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line)]
    return {"instructions": len(instructions), "barriers": sum(i.lstrip("@!P0123456789T ").startswith("BAR") for i in instructions)}


def codec_launches(form: str, dtype: torch.dtype = torch.bfloat16) -> List[Tuple[tuple, dict]]:
    """The codec launches of one ``form`` (perturb, restore, plain) for rows of ``dtype`` in the four
    layouts 16-bit rows can have (``codec_variant`` 0: unaligned; 1: strided, fan-in a multiple of 8; 3: contiguous and
    aligned; 5: a transposed view, with the transposed tiles on): CPU tensors, recorded, not run."""
    from flatlora_optim.kernels.layer_table import LayerTable, transposed_tiles
    from flatlora_optim.kernels.triton_noise import ExactGroupRecord, TritonNoiseKernel

    rows = [torch.zeros(9, 1030, dtype=dtype), torch.zeros(6, 900, dtype=dtype), torch.zeros(336, 7, dtype=dtype).t(), torch.zeros(6, 1024, dtype=dtype),
            torch.zeros(6, 2048, dtype=dtype)[:, ::2]]
    with transposed_tiles():
        table = LayerTable(rows)
    assert sorted(table.variants) == [0, 1, 3, 5], table.variants
    std = torch.zeros(table.total_rows)
    seeds = torch.zeros(table.total_blocks, dtype=torch.int64)
    record = None if form == "plain" else ExactGroupRecord.allocate(table, (4096, 64))
    counters = torch.zeros(2, dtype=torch.int64) if form == "perturb" else None
    with Launches("_codec_kernel") as launches:
        TritonNoiseKernel()._exact(table, std, seeds, record, restore=form == "restore", counters=counters)
    return launches.calls


def main() -> None:
    print(f"sm_90, Triton {triton.__version__}; the codec as launched on bf16 rows of each layout, tiles {TILE_ROWS} x {TILE_COLS}")
    print(f"{'kernel form':28s} {'warps':>5s} {'registers':>9s} {'spill stores B':>14s} {'programs/SM (by registers)':>26s}"
          f" {'SASS instructions':>17s} {'barriers':>8s}")
    for form in ("perturb", "restore", "plain"):
        for args, kwargs in codec_launches(form):
            compiled = compile_launch(tn._codec_kernel, args, kwargs)
            usage, code = resource_usage(compiled), sass_counts(compiled)
            warps = kwargs["num_warps"]
            per_sm = min(65536 // (usage["registers"] * 32 * warps), 64 // warps)
            name = f"codec, {form}, layout {kwargs['VARIANT']}"
            print(f"{name:28s} {warps:5d} {usage['registers']:9d} {usage['spill_stores']:14d} {per_sm:26d}"
                  f" {code['instructions']:17d} {code['barriers']:8d}")


if __name__ == "__main__":
    main()
