"""Every CUDA kernel, in every form the library launches, compiles for the H100/H200 (sm_90) without a GPU.

CI has no GPU, and Triton's interpreter (tests/test_triton_interpreter.py) runs the kernels' logic but not
the compiler. Here each kernel goes through Triton's real pipeline (TTIR, TTGIR, LLVM, PTX, then ``ptxas``
from the Triton wheel) for an sm_90 target, so a kernel that would not compile on the GPU fails in CI.
The compiled code must also keep its values in registers: spills to local memory would slow the
memory-bound passes down (``ptxas -v``'s counts for the same PTX and flags). The compiling helpers
are ``benchmarks/kernel_resources.py``'s, which prints the registers of each codec form.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux x86-64)")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces the compiler", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kernel_resources import CODEC_TYPES, codec_constants, codec_warps, compile_for_hopper, resource_usage  # noqa: E402

from flatlora_optim.kernels import triton_noise as tn  # noqa: E402
from flatlora_optim.kernels.layer_table import ROWS_PER_PROGRAM  # noqa: E402

SPILL_ALLOWANCE = 4  # bytes per thread: ptxas keeps one 4-byte value of the codec's plain pass on the stack


def assert_compiles_without_spills(kernel, types, constants, num_warps):
    compiled = compile_for_hopper(kernel, types, constants, num_warps)
    assert compiled.asm["cubin"], "no cubin"
    usage = resource_usage(compiled)
    assert usage["spill_stores"] <= SPILL_ALLOWANCE, f"{kernel.fn.__name__} {constants}: registers spilled to local memory ({usage})"
    return usage


@pytest.mark.parametrize("w_code", [1, 2], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("form", ["perturb", "restore", "plain"])
def test_codec_compiles_in_every_form(w_code, form):
    """The exact codec's perturb and restore passes and its plain form (backup restore), for both
    16-bit types and the three layouts ``codec_variant`` gives 16-bit rows (bit 0: fan-in a multiple
    of 4; bit 1: aligned rows of whole 16-byte vectors, which implies bit 0 for 2-byte elements)."""
    for variant in (0, 1, 3):
        assert_compiles_without_spills(tn._codec_kernel, CODEC_TYPES, codec_constants(form, w_code, variant), codec_warps(form))


def test_exceptions_kernel_compiles():
    types = {"layers_ptr": "*i64", "exc_layer_ptr": "*i16", "exc_index_ptr": "*i32", "exc_bits_ptr": "*i16", "n_slots": "i32", "only_layer": "i32"}
    assert_compiles_without_spills(tn._exceptions_kernel, types, {"BLOCK": 256}, 4)


@pytest.mark.parametrize("w_code", [0, 1, 2, 3], ids=["float32", "bfloat16", "float16", "float64"])
def test_row_std_kernel_compiles(w_code):
    """Row stds for every weight type, 16-bit and 32-bit adapters, aligned and strided rows."""
    types = {"layers_ptr": "*i64", "adapters_ptr": "*i64", "factors_ptr": "*fp64", "rowtile_layer_ptr": "*i16", "out_ptr": "*fp32"}
    item = {0: 4, 1: 2, 2: 2, 3: 8}[w_code]
    for ab_code, contig in itertools.product([0, 1], [False, True]):
        block_n = tn._STD_BLOCK_N_FP64 if w_code in (0, 3) else tn._STD_BLOCK_N
        constants = dict(W_CODE=w_code, AB_CODE=ab_code, ROWS=ROWS_PER_PROGRAM, BLOCK_N=block_n, R=8, ACC_FP64=w_code in (0, 3),
                         CONTIG=contig, VEC=16 // item)
        assert_compiles_without_spills(tn._row_std_kernel, types, constants, tn._STD_WARPS)


@pytest.mark.parametrize("dtype", ["*bf16", "*fp16", "*fp32"])
def test_noise_kernel_compiles(dtype):
    """Virtual mode's and the per-block path's kernel: the noise alone and ``W + e``."""
    for add in (False, True):
        work_fp64 = dtype == "*fp32"
        out = dtype if add else ("*fp64" if work_fp64 else "*fp32")
        types = {"out_ptr": out, "w_ptr": dtype, "std_ptr": "*fp32", "seeds_ptr": "*i64", "n_rows": "i32", "n_cols": "i32",
                 "rows_per_block": "i32", "stride_row": "i32", "stride_col": "i32"}
        assert_compiles_without_spills(tn._noise_kernel, types, dict(ADD=add, BLOCK=tn._BLOCK, WORK_FP64=work_fp64), 4)
