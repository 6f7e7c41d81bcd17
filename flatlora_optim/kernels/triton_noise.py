"""Triton kernels for the noise on CUDA: one pass draws ``z``, scales it per row and adds it to ``W``.

The torch kernel draws a block's noise with ``torch.randn`` into a temporary, multiplies it by the
row stds and adds it to the weights: several passes over a block plus a generator re-seed. Here
``z`` comes from Philox inside the kernel, so forming ``fl(W + e)`` reads ``W`` once and writes the
result once, and the noise is regenerated from ``(seed, position)`` alone, with no generator state.

Element ``L`` of a row block (row-major position inside the block) takes lane ``L % 8`` of the
Philox output for counter ``L // 8`` under the block's seed (eight normals per Philox evaluation,
two per 32-bit word by Box--Muller: :func:`_randn8x`). Every kernel draws through :func:`_tile_normals`, and a launch
covers any number of row blocks, so the whole-layer launch of virtual mode, the step-wide codec of
in-place mode and an FSDP2 shard's blocks all give the same bits.

The Triton stream differs from ``torch.randn``'s: on CUDA a seed reproduces a run with this kernel
(``FLATLORA_NOISE_KERNEL=torch`` selects the torch kernel instead). The compiled kernels take
Box--Muller's logarithm, sine and cosine from the GPU's special-function units, so their stream
differs in the low bits from the interpreter's, which tests the logic.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import libdevice
except ImportError:  # a Triton without the CUDA backend's libdevice module: precise normals only
    libdevice = None
try:
    from triton.backends.nvidia.compiler import CUDAOptions
except ImportError:  # a Triton without the CUDA backend
    CUDAOptions = None

from ..devices import made_current
from ..interrupts import interrupts_deferred
from .layer_table import DTYPE_CODES, ROWS_PER_PROGRAM, TILE_COLS, LayerTable, _cdiv, codec_variant, is_transposed_view, tile_shape

# _cdiv, not triton.cdiv: that is a Triton-decorated function, about 7 us of host time a call, and virtual
# mode launches per layer in forward and backward

__all__ = ["TritonNoiseKernel"]

_NOISE_TILE = 2048  # elements per program of the noise kernel (TR x TC)
_STD_BLOCK_N = 256  # columns per step of the row-std kernel's element-wise form (fastest of 256, 512, 1024 on an H200)
_STD_BLOCK_N_FP64 = 128  # float32/float64 weights sum in float64: 256 columns spill registers (benchmarks/kernel_resources.py)
_STD_WARPS = 4  # fewer, narrower programs beat 8 warps there
_STD_ELEMENTWISE_ROWS = 16  # rows per program of the row-std kernel's element-wise form (its geometry as timed on the H200)
_STD_STAGES = 3  # software-pipelined column loop for 16-bit weights (float64 sums would spill registers)
_STD_DOT = True
"""Row stds of 16-bit weights with adapters of their type from ``||W_i||^2``, ``A W_i^T`` and ``A A^T`` on the
tensor cores (see :func:`_row_std_kernel`) instead of forming ``W + s B A`` element by element: 0.85 ms against
1.20 for the 1 B Llama's rank-8 stds on an H200 (noise_time.py, each form with its best rows per program, 64 and 16)."""
_STD_DOT_BLOCK_N = 64  # columns per step of the tensor-core form at rank <= 16 (the width timed on the H200; half at 17-32)
_STD_DOT_MAX_RANK = 32  # above, the products' tiles spill registers (ranks 17-32 take 8 warps and half the columns)
_STD_FP_FUSION = True
"""Fused multiply-adds in the row-std kernel: its rank-one updates and squares cost half the instructions.
The stds are then not the interpreter's bits (which has no fused multiply-add) but every GPU path takes them
from this one kernel, so all modes and an FSDP2 shard still see the same stds (noise_time.py: 1.44 -> 1.20 ms
per step for the 1 B Llama, with the pipelined column loop)."""
_PERTURB_WARPS = 4
"""Warps per program of the codec's perturb pass (a 2048-element tile: two groups of 8 per thread). 4 beat 8 and
2 on an H200 with the field layout (noise_time.py, 6782fad: 4.71, 5.41, 7.29 ms)."""
_RESTORE_WARPS = 4
"""Warps per program of the codec's restore pass: 4 beat 8 once the pass lost its barriers (noise_time.py on an
H200, 6782fad: 3.04 against 3.31 ms; with the layout before it, 8 had beaten 4, 4.86 against 5.02 ms)."""
_PERTURB_MAX_REGISTERS = 96
"""Registers per thread the codec's perturb pass may take (``maxnreg``) for contiguous aligned rows, where the
compiler left alone takes 128 (the strided and unaligned layouts take up to 254, and keep no limit). At 96 (four
spilled words) an H200 holds five of its programs per multiprocessor instead of four: 1.227 -> 1.169 ms for
277 M bf16 elements (benchmarks/codec_ablation.py, two runs); 104 registers keep four programs and were slower
(1.257). The restore pass takes 72 without a limit (64 gave 1%, within the runs' spread)."""
_TURNED_WARPS = 8
"""Warps per program of every codec pass over transposed views (variants 4, 5): a tile of 256 rows of 8 columns, one
group of 8 per thread. For 277 M bf16 elements on an H200: restore 1.52 ms against 2.39 with 4 warps; perturb 2.90 ms
against 4.81 (4 warps, 188 registers), or 2.56 with 4 warps held to 96 registers, which spills 172-220 bytes a thread."""
_TURNED_MAX_REGISTERS = {False: 64, True: 48}
"""``maxnreg`` of the codec's perturb (False) and restore (True) passes over transposed views of rows a multiple of 8
long (variant 5). Left alone the compiler takes 107 and 64 registers: two and four 8-warp programs per multiprocessor.
At 64 and 48 (36 and 20 bytes spilled a thread) an H200 holds four and five: for 277 M bf16 elements, perturb
2.90-2.95 -> 1.96 ms and restore 1.52-1.58 -> 1.27-1.29 ms (two runs side by side; 56/40 gave 2.13-2.20 / 1.32-1.36,
48/32 2.04-2.12 / 1.79-1.84; benchmarks/register_caps.py). Contiguous rows gained nothing from lower caps (perturb 80, 72, 64: 1.22, 1.30, 1.45
against 1.18 ms; restore 64, 56, 48: within 1%). Variant 4 (odd fan-ins) would spill 56 bytes at 64: no cap, untimed."""
_MAXNREG = "maxnreg" in {field.name for field in dataclasses.fields(CUDAOptions)} if CUDAOptions is not None else False
"""Whether this Triton's CUDA backend takes ``maxnreg`` (older ones compile without the limit)."""
_NOISE_WARPS = 2  # the noise kernel (virtual mode's W + e): 1.63 ms with 2 warps, 1.83 with 4, 2.06 with 8 (noise_time.py, H200)
_TURNED_NOISE_TILE = (64, 32)
"""The noise kernel's tile (rows x columns) for a transposed view: 32 lines of 64 neighbours in memory (128 bytes of
bf16) read, turned, and written as 64 rows of 32 (see :func:`_noise_kernel`). Virtual mode's ``fl(W + e)`` of 277 M
bf16 elements in transposed views on an H200 (benchmarks/noise_tiles.py, two rounds side by side): 0.686 ms
with the row-major tiles, 0.435 with these and 2 warps (contiguous rows: 0.440); 4 warps 0.465, 128 x 16 0.493,
32 x 64 0.489, 64 x 64 0.456."""
_TURNED_NOISE_WARPS = 2
_PLAIN_WARPS = 2  # the plain pass (backup restore's perturb): 1.23 ms with 2 warps, 1.45 with 4, 1.80 with 8


@triton.jit
def _in_lane_order(n1, n2, n3, n4, n5, n6, n7, n8):
    """One counter's eight normals side by side: ``[..., 2, 2, 2]`` holding n1 ... n8 in order, so that
    flattening the last three axes gives element ``8c + lane`` its lane of counter ``c`` (each ``join``
    adds a last axis, so the innermost pairs are the ones four lanes apart)."""
    low = tl.join(tl.join(n1, n5), tl.join(n3, n7))
    high = tl.join(tl.join(n2, n6), tl.join(n4, n8))
    return tl.join(low, high)


@triton.jit
def _unit_interval(bits, BITS: tl.constexpr):
    """``[0, 1)`` in steps of ``2**-BITS`` from the low ``BITS`` (at most 23) of ``bits``: placed at the top
    of the mantissa of a float in ``[1, 2)``, then 1 subtracted (integer and add units only: the int-to-float
    conversion runs on the GPU's slow special-function pipe, which Box--Muller already keeps busy)."""
    mantissa = (bits.to(tl.uint32, bitcast=True) & ((1 << BITS) - 1)) << (23 - BITS)
    return (mantissa | 0x3F800000).to(tl.float32, bitcast=True) - 1.0


@triton.jit
def _normal_pair(bits, FAST: tl.constexpr):
    """Two standard normals from one 32-bit word by Box--Muller: the radius from its top 20 bits (``1 - u``
    in ``(0, 1]``, so the largest normal is ``sqrt(40 ln 2) = 5.27``), the angle from its low 12 bits:
    4096 angles in ``(-pi, pi)``, each the midpoint of its step (on the steps' ends, the angles 0, +-pi/2
    and -pi would give exact zeros, a point mass of 1/2048 at 0), centred on 0 where the fast sine and
    cosine are most accurate. An even grid keeps ``E[cos^2] = 1/2`` and ``E[cos^4] = 3/8`` exact, so
    the pair's moments are the continuous form's.
    ``FAST``: the logarithm, sine and cosine from the special-function units (about 2**-21 absolute error,
    far below the bf16/fp16 rounding of ``W + e``) instead of libdevice's correctly rounded routines, which
    cost more than Philox itself."""
    u = _unit_interval(bits.to(tl.uint32, bitcast=True) >> 12, 20)
    angle = 6.283185307179586 * _unit_interval(bits, 12) - 3.14082566319585  # pi - pi / 4096: midpoints
    if FAST:
        # the fast logarithm has an absolute error of about 2**-21 near 1, where the true value is as small as
        # -9.5e-7: it may come out positive there, and the square root of a negative number is NaN
        radius = tl.sqrt(tl.maximum(-2.0 * libdevice.fast_logf(1.0 - u), 0.0))
        return radius * libdevice.fast_cosf(angle), radius * libdevice.fast_sinf(angle)
    else:
        radius = tl.sqrt(-2.0 * tl.log(1.0 - u))
        return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def _randn8x(seed, counters, FAST: tl.constexpr, ROUNDS: tl.constexpr):
    """Eight standard normals per counter: Philox-4x32 with ``ROUNDS`` rounds gives four 32-bit words, and
    each word two normals (:func:`_normal_pair`). Eight rather than ``tl.randn4x``'s four halve Philox's
    work per normal (noise_time.py on an H200, side by side, for the 1 B Llama's 112 weights: virtual ``W + e``
    1.65 -> 1.39 ms, plain pass 1.22 -> 1.05 ms, exact perturb and restore passes 6.98 / 4.83 -> 6.41 / 4.46 ms)."""
    i1, i2, i3, i4 = tl.randint4x(seed, counters, ROUNDS)
    n1, n2 = _normal_pair(i1, FAST)
    n3, n4 = _normal_pair(i2, FAST)
    n5, n6 = _normal_pair(i3, FAST)
    n7, n8 = _normal_pair(i4, FAST)
    return n1, n2, n3, n4, n5, n6, n7, n8


@triton.jit
def _tile_normals(seed, rows, cols, first_col, n_cols, TR: tl.constexpr, TC: tl.constexpr, ALIGNED8: tl.constexpr,
                  FAST: tl.constexpr, ROUNDS: tl.constexpr):
    """The standard normals of a ``TR x TC`` tile of a row block (``rows`` inside the block).

    Element ``L = row * n_cols + col`` of a row block takes lane ``L % 8`` of Philox counter
    ``L // 8`` under the block's seed. When ``n_cols`` is a multiple of 8 a row's counters are
    consecutive and one evaluation gives eight neighbours; otherwise every element evaluates its
    own counter. Every kernel draws through here, so all of them see the same noise.
    """
    if ALIGNED8:
        counters = (rows[:, None] * n_cols + first_col) // 8 + tl.arange(0, TC // 8)[None, :]
        n1, n2, n3, n4, n5, n6, n7, n8 = _randn8x(seed, counters, FAST, ROUNDS)
        return tl.reshape(_in_lane_order(n1, n2, n3, n4, n5, n6, n7, n8), (TR, TC))
    else:
        local = rows[:, None] * n_cols + cols[None, :]
        i1, i2, i3, i4 = tl.randint4x(seed, local // 8, ROUNDS)
        lane = local % 8
        first, second = _normal_pair(tl.where(lane < 4, tl.where(lane < 2, i1, i2), tl.where(lane < 6, i3, i4)), FAST)
        return tl.where(lane % 2 == 0, first, second)  # only the element's own word goes through Box--Muller


@triton.jit
def _noise_kernel(out_ptr, w_ptr, std_ptr, seeds_ptr, n_rows, n_cols, rows_per_block, stride_row, stride_col, row_tiles, col_tiles,
                  ADD: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr, ALIGNED8: tl.constexpr, CONTIG: tl.constexpr, VEC: tl.constexpr,
                  WORK_FP64: tl.constexpr, FAST: tl.constexpr, ROUNDS: tl.constexpr, TURNED: tl.constexpr = False):
    """``e`` (or ``fl(W + e)`` with ``ADD``) into a new contiguous ``m x n`` tensor, one ``TR x TC``
    tile of one row block per program; ``seeds[b]`` seeds row block ``b``.

    Tiles rather than a flat range: a row's std is loaded once per tile row and no element needs an
    integer division to find its row. ``CONTIG``: the source's rows (and so the output's) are
    contiguous, start 16-byte aligned and are whole 16-byte vectors long, so both are moved with
    wide loads and stores (``VEC`` elements per 16 bytes). ``TURNED`` (``ADD`` only): the source is a
    transposed view (its rows are neighbours in memory, ``stride_row`` 1): the tile is read as memory holds
    it, ``TC`` lines of ``TR`` neighbours, and turned in the kernel, so that the reads are not one element
    per row each. The noise is drawn by position as in every other tile, so the bits are the same.
    """
    if CONTIG:
        n_cols = tl.multiple_of(n_cols, VEC)  # masks stay uniform across a vector
    t = tl.program_id(0)
    per_block = row_tiles * col_tiles
    block = t // per_block
    in_block = t - block * per_block
    row_tile = in_block // col_tiles
    first_col = (in_block - row_tile * col_tiles) * TC
    first_row = block.to(tl.int64) * rows_per_block
    block_rows = tl.minimum(rows_per_block, n_rows - first_row)
    if row_tile * TR >= block_rows:  # past the end of a short last block: every block has as many tiles as a full one
        return
    rows = row_tile * TR + tl.arange(0, TR)  # inside the block
    cols = first_col + tl.arange(0, TC)
    row_mask = rows < block_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    z = _tile_normals(tl.load(seeds_ptr + block), rows, cols, first_col, n_cols, TR, TC, ALIGNED8, FAST, ROUNDS)
    std = tl.load(std_ptr + first_row + rows, mask=row_mask, other=0.0)
    if WORK_FP64:
        e = z.to(tl.float64) * std.to(tl.float64)[:, None]
    else:
        e = z * std[:, None]
    global_rows = first_row + rows
    if CONTIG:
        cols = tl.max_contiguous(tl.multiple_of(cols, TC), TC)[None, :]
        out_pointers = tl.multiple_of(out_ptr + global_rows * n_cols, 16)[:, None] + cols
        w_pointers = tl.multiple_of(w_ptr + global_rows * stride_row, 16)[:, None] + cols
    else:
        out_pointers = out_ptr + (global_rows * n_cols)[:, None] + cols[None, :]
        w_pointers = w_ptr + (global_rows * stride_row)[:, None] + cols[None, :].to(tl.int64) * stride_col
    if ADD:
        if TURNED:  # TC lines of TR neighbours in memory (stride_row is 1), turned here
            lines = w_ptr + cols.to(tl.int64)[:, None] * stride_col + tl.max_contiguous(global_rows, TR)[None, :]
            w = tl.trans(tl.load(lines, mask=tl.trans(mask), other=0.0))
        else:
            w = tl.load(w_pointers, mask=mask, other=0.0)
        if WORK_FP64:
            value = w.to(tl.float64) + e
        else:
            value = w.to(tl.float32) + e
        tl.store(out_pointers, value.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_pointers, e, mask=mask)


@triton.jit
def _typed(raw, CODE: tl.constexpr):
    """An address from a layer table as a pointer of the float type ``CODE`` (layer_table.DTYPE_CODES)."""
    if CODE == 0:
        return raw.to(tl.pointer_type(tl.float32))
    elif CODE == 1:
        return raw.to(tl.pointer_type(tl.bfloat16))
    elif CODE == 2:
        return raw.to(tl.pointer_type(tl.float16))
    else:
        return raw.to(tl.pointer_type(tl.float64))


_NF = tl.constexpr(15)  # columns of the layer table (layer_table.FIELDS)
_ASM = os.environ.get("TRITON_INTERPRET") != "1"  # inline PTX (popc) on the GPU; the interpreter cannot run it
_FAST_NORMALS = _ASM and libdevice is not None
"""Box--Muller from the special-function units on the GPU (see :func:`_normal_pair`); the interpreter has
no libdevice and draws with the precise routines (same logic, other low bits)."""
_PHILOX_ROUNDS = 10
"""Philox rounds per evaluation (10, as ``tl.randn4x``, cuRAND and torch's CUDA generator use)."""


@triton.jit
def _add_rank_one(low_rank, a_ptr, a_row, a_col, b_ptr, b_row, b_col, rows, cols, row_mask, col_mask, j, rank, s):
    """``low_rank + s B[rows, j] A[j, cols]`` in float32 (each product of two 16-bit floats is exact)."""
    b_j = tl.load(b_ptr + rows * b_row + j * b_col, mask=row_mask & (j < rank), other=0.0).to(tl.float32) * s
    a_j = tl.load(a_ptr + j * a_row + cols * a_col, mask=col_mask & (j < rank), other=0.0).to(tl.float32)
    return low_rank + b_j[:, None] * a_j[None, :]


@triton.jit
def _row_std_kernel(layers_ptr, adapters_ptr, factors_ptr, rowtile_layer_ptr, out_ptr,
                    W_CODE: tl.constexpr, AB_CODE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr,
                    ACC_FP64: tl.constexpr, CONTIG: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr, DOT: tl.constexpr = False,
                    MIN_RANK: tl.constexpr = -1, SUB: tl.constexpr = 16):
    """``sigma / sqrt(n) * ||W_i + s (B A)_i||`` for ``ROWS`` rows of one layer, many layers per launch.

    The full rows ``W + s B A`` are formed tile by tile (``s B A`` as a sum of ``R`` float32
    rank-one products, masked past the layer's rank, never stored), squared and summed; 0 where
    the result is not finite. Programs whose layer has another weight or adapter type return at
    once (those get their own launch), as do layers whose rows are (``CONTIG``) or are not
    contiguous and 16-byte aligned (codec variant bit 1): aligned rows are read with wide loads.

    ``DOT`` (16-bit weights): ``||W_i + s B_i A||^2 = ||W_i||^2 + 2 s B_i . (A W_i^T) + s^2 B_i (A A^T) B_i^T``,
    with ``A W^T`` and ``A A^T`` from the tensor cores and ``||W_i||^2`` summed element by element in float32
    (the diagonal of a tensor-core ``W W^T`` product, used before, was off by up to 1e-5 relative: the tensor
    cores' float32 accumulation is not rounded as IEEE float32 is; it was also 5% slower), all ``ROWS`` rows of
    the row tile in one program, so ``A`` is read once per ``ROWS`` rows (``R`` at least 16: the rank padded
    with zero rows). Adapters of the weights' type only: every product is exact and the sums are float32.
    The expansion loses accuracy where ``s B_i A`` nearly cancels ``W_i`` (not what a LoRA update does).
    A program takes ``SUB`` rows of a row tile (``ROWS // SUB`` programs per row tile): all of them with
    ``DOT``, 16 (:data:`_STD_ELEMENTWISE_ROWS`) in the element-wise form. ``MIN_RANK``
    (and with ``DOT``, ``R``) bound the ranks of the layers a launch takes.
    One kernel body, one column loop: a loop moved into a helper function lost its software pipelining
    (Triton 3.6), and with it a quarter of the speed.
    """
    t = tl.program_id(0) // (ROWS // SUB)
    part = tl.program_id(0) % (ROWS // SUB)
    layer = tl.load(rowtile_layer_ptr + t).to(tl.int64)
    info = layers_ptr + layer * _NF
    adapter = adapters_ptr + layer * 8
    if (tl.load(info + 11) != W_CODE) | (tl.load(adapter + 7) != AB_CODE) | (((tl.load(info + 13) >> 1) & 1 == 1) != CONTIG):
        return
    w_ptr = _typed(tl.load(info), W_CODE)
    n_rows = tl.load(info + 1)
    n_cols = tl.load(info + 2)
    stride_row = tl.load(info + 3)
    stride_col = tl.load(info + 4)
    a_ptr = _typed(tl.load(adapter), AB_CODE)
    a_row, a_col = tl.load(adapter + 1), tl.load(adapter + 2)
    b_ptr = _typed(tl.load(adapter + 3), AB_CODE)
    b_row, b_col = tl.load(adapter + 4), tl.load(adapter + 5)
    rank = tl.load(adapter + 6)
    if rank <= MIN_RANK:  # another launch's layer (see _row_std_forms)
        return
    if DOT:
        if rank > R:
            return
    s = tl.load(factors_ptr + 2 * layer).to(tl.float32)
    scale = tl.load(factors_ptr + 2 * layer + 1)
    rows = (t - tl.load(info + 10)) * ROWS + part * SUB + tl.arange(0, SUB)
    row_mask = (rows < n_rows) & (rows >= tl.load(info + 14))  # rows before first_row belong to another rank
    if ACC_FP64:
        acc = tl.zeros((SUB, BLOCK_N), dtype=tl.float64)
    elif DOT:
        acc = tl.zeros((1, 1), dtype=tl.float32)  # unused: the sums are in own, projections and gram below
    else:
        acc = tl.zeros((SUB, BLOCK_N), dtype=tl.float32)
    ranks = tl.arange(0, R)
    own = tl.zeros((SUB,), dtype=tl.float32)  # DOT: ||W_i||^2
    projections = tl.zeros((SUB, R), dtype=tl.float32)  # DOT: A_j . W_i
    gram = tl.zeros((R, R), dtype=tl.float32)  # DOT: A_j . A_k
    if CONTIG:  # rows start 16-byte aligned and are whole 16-byte vectors long (codec variant bit 1)
        n_cols = tl.multiple_of(n_cols, VEC)
        row_pointers = tl.multiple_of(w_ptr + rows * stride_row, 16)
    for start in tl.range(0, n_cols, BLOCK_N, num_stages=STAGES):  # pipelined: the next tile's loads overlap this one's sums
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        if CONTIG:
            w = tl.load(row_pointers[:, None] + tl.max_contiguous(tl.multiple_of(cols, BLOCK_N), BLOCK_N)[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        else:
            w = tl.load(w_ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT:
            a_tile = tl.load(a_ptr + ranks[:, None] * a_row + cols[None, :] * a_col, mask=(ranks < rank)[:, None] & col_mask[None, :], other=0.0)
            w_wide = w.to(tl.float32)
            own += tl.sum(w_wide * w_wide, axis=1)  # products exact, float32 sums
            projections = tl.dot(w, tl.trans(a_tile), projections)
            gram = tl.dot(a_tile, tl.trans(a_tile), gram)
        else:
            # s B A by rank-one updates in the layout of W's tile (no layout change, no shared memory:
            # 1.9x faster than forming s B A with tl.dot on an H200); each product of two 16-bit floats is exact in float32
            low_rank = tl.zeros((SUB, BLOCK_N), dtype=tl.float32)
            if R <= 8:  # unrolled (the form timed on the H200)
                for j in tl.static_range(R):
                    low_rank = _add_rank_one(low_rank, a_ptr, a_row, a_col, b_ptr, b_row, b_col, rows, cols, row_mask, col_mask, j, rank, s)
            else:  # a loop: unrolled, 16 or more rank-one terms spill registers (tests/test_triton_compile.py)
                for j in range(0, rank):
                    low_rank = _add_rank_one(low_rank, a_ptr, a_row, a_col, b_ptr, b_row, b_col, rows, cols, row_mask, col_mask, j, rank, s)
            if ACC_FP64:
                full = w.to(tl.float64) + low_rank.to(tl.float64)
            else:
                full = w.to(tl.float32) + low_rank
            acc += full * full
    if DOT:
        b = tl.load(b_ptr + rows[:, None] * b_row + ranks[None, :] * b_col, mask=row_mask[:, None] & (ranks < rank)[None, :], other=0.0)
        b = b.to(tl.float32) * s
        cross = tl.sum(b * projections, axis=1)
        quadratic = tl.sum(tl.dot(b, gram, input_precision="ieee") * b, axis=1)
        total = tl.maximum(own.to(tl.float64) + (2.0 * cross + quadratic).to(tl.float64), 0.0)  # rounding could take an exact 0 below it
    else:
        total = tl.sum(acc, axis=1).to(tl.float64)
    std = (tl.sqrt(total) * scale).to(tl.float32)
    finite = (std == std) & (tl.abs(std) < float("inf"))
    tl.store(out_ptr + tl.load(info + 8) + rows, tl.where(finite, std, 0.0), mask=row_mask)


@triton.jit
def _key(bits):
    """Sign-magnitude 16-bit patterns (as int32) to integers in the order of the values they encode."""
    return bits ^ ((bits >> 31) & 0x7FFF)


@triton.jit
def _popcount(x, ASM: tl.constexpr):
    """Set bits of each uint32 (the ``popc`` instruction on the GPU; a SWAR count in the interpreter)."""
    if ASM:
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return (x * 0x01010101) >> 24


@triton.jit
def _group_masks(flags, TR: tl.constexpr, G: tl.constexpr, GS: tl.constexpr):
    """``flags`` (0/1, ``TR x G*GS``) as one uint32 bit mask per group of ``GS`` (<= 32) neighbours in a row."""
    bits = tl.reshape(flags, (TR, G, GS)).to(tl.uint32) << tl.arange(0, GS).to(tl.uint32)[None, None, :]
    return tl.sum(bits, axis=2)  # distinct bits: the sum is the OR


@triton.jit
def _ranks_in_group(masks, TR: tl.constexpr, G: tl.constexpr, ASM: tl.constexpr, GS: tl.constexpr):
    """For every element, how many flagged elements come before it in its group (``TR x G x GS``)."""
    below = (tl.full((GS,), 1, tl.uint32) << tl.arange(0, GS).to(tl.uint32)) - 1
    return _popcount(masks[:, :, None] & below[None, None, :], ASM).to(tl.int32)


@triton.jit
def _load_u64(ptr, mask, ASM: tl.constexpr):
    """A 64-bit load, 0 where ``mask`` is false. On the GPU as inline PTX, which keeps the layout of ``ptr``:
    the compiler would give a gathered ``tl.load`` a coalesced layout of its own and move the values there and
    back through shared memory (most of the restore pass's barriers; see the codec docstring)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.u64 $0, 0; @p ld.global.nc.u64 $0, [$1]; }", "=l,l,r",
            [ptr.to(tl.uint64, bitcast=True), mask.to(tl.int32)], dtype=tl.uint64, is_pure=True, pack=1)
    else:
        return tl.load(ptr, mask=mask, other=0).to(tl.uint64, bitcast=True)


@triton.jit
def _bits_window(words_ptr, first_bit, n_bits, ASM: tl.constexpr):
    """The ``n_bits`` (<= 64) bits of a word stream from bit ``first_bit`` on, in the low bits of a uint64
    (bits above ``n_bits`` are the stream's next ones): one load, two where they cross a word, none for 0 bits."""
    shift = (first_bit & 63).to(tl.uint64)
    words = words_ptr + (first_bit >> 6)
    low = _load_u64(words, n_bits > 0, ASM)
    high = _load_u64(words + 1, (first_bit & 63) + n_bits > 64, ASM)
    return (low >> shift) | ((high << 1) << (63 - shift))  # (two shifts: a shift by 64 is not defined)


@triton.jit
def _bits16(x, MANT: tl.constexpr):
    """The 16-bit pattern of each bf16/fp16 value, sign-extended to int32, for the codec's arithmetic on
    ``fl(W + e)`` and the candidate. For bf16 from its float32 form (the pattern's top half), which keeps that
    arithmetic 32-bit: from an int16 bitcast the compiler works in 16 bits and masks every result again (with the
    other rewrites of 2026-11-30, a fifth fewer instructions and a fifth less time per pass on an H200). The
    conversion may canonicalise a NaN's payload; both passes convert the same stored pattern, so they agree, but
    ``W``'s own pattern, which must come back to the bit, is read with the bitcast."""
    if MANT == 7:
        return x.to(tl.float32).to(tl.int32, bitcast=True) >> 16
    else:
        return x.to(tl.int16, bitcast=True).to(tl.int32)


@triton.jit
def _field_widths(new_bits, cand_bits, mask, MANT: tl.constexpr):
    """Which elements the exact-restore record keeps a field for (the *ambiguous* ones), and its width in bits.

    ``cand = fl(fl(W + e) - e)`` is ``W`` unless ``fl(W + e)`` lies in a coarser binade than ``cand`` (its
    rounding step is then at least twice ``W``'s, so several ``W`` round to it) or ``cand`` is a power of two
    (``W`` may sit just below, where the steps are half as large). The key offset ``W - cand`` then needs
    2 bits when the binades differ by at most one, 4 when by two, 8 beyond that or when ``cand`` has the
    smallest exponent (zero or subnormal). Both passes see ``fl(W + e)`` and ``e``, so both compute the same
    widths from them: the restore pass knows where every field lies before reading any.
    """
    new_exp = (new_bits & 0x7FFF) >> MANT
    cand_exp = (cand_bits & 0x7FFF) >> MANT
    gap = new_exp - cand_exp
    ambiguous = ((gap > 0) | ((cand_bits & ((1 << MANT) - 1)) == 0)) & mask
    steps = tl.where(cand_exp == 0, 3, tl.minimum(tl.maximum(gap, 1), 3))  # 2, 4 or 8 bits: 1 << steps
    width = tl.where(ambiguous, 1 << steps, 0)
    return ambiguous, width


@triton.jit
def _tile_starts(group_bits, TR: tl.constexpr, G: tl.constexpr):
    """Each group's first bit in its tile's record: the exclusive running total of ``group_bits`` (``TR x G``) in
    row-major order, as one scan of the flattened groups (a scan per row plus one over the row totals took
    twice the barriers)."""
    flat = tl.reshape(group_bits, (TR * G,))
    return tl.reshape(tl.cumsum(flat, axis=0) - flat, (TR, G))


@triton.jit
def _or_u64(ptr, value, mask, ASM: tl.constexpr):
    """Atomic OR of ``value`` into the int64 words at ``ptr`` where ``mask`` holds. On the GPU as inline PTX
    (a fire-and-forget ``red``), which keeps the layout of its operands (the compiler moves a ``tl.atomic_or``'s
    operands to a layout of its own through shared memory: three round trips per call in the perturb pass)."""
    if ASM:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p red.relaxed.gpu.global.or.b64 [$1], $2; mov.u32 $0, 0; }", "=r,l,l,r",
            [ptr.to(tl.uint64, bitcast=True), value, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.atomic_or(ptr, value, mask=mask, sem="relaxed")


@triton.jit
def _or_bits_at(ptr, first_bit, value, ASM: tl.constexpr):
    """OR the 64-bit ``value`` (per group) into the int64 words at ``ptr`` from bit ``first_bit`` on:
    one or two atomics, none for the words it leaves unchanged."""
    shift = (first_bit & 63).to(tl.uint64)
    low = (value << shift).to(tl.int64, bitcast=True)
    high = ((value >> 1) >> (63 - shift)).to(tl.int64, bitcast=True)
    word = ptr + (first_bit >> 6)
    _or_u64(word, low, low != 0, ASM)
    _or_u64(word + 1, high, high != 0, ASM)


@triton.jit
def _store_tile(pointers, values, mask, TURNED: tl.constexpr):
    """Store a ``TR x TC`` tile of values at ``pointers`` where ``mask``; ``TURNED``: those two are the tile's
    transpose (as memory holds a transposed view's rows), and so the values are turned to match."""
    if TURNED:
        tl.store(pointers, tl.trans(values), mask=mask)
    else:
        tl.store(pointers, values, mask=mask)


# Triton compiles a kernel again for every new pattern of its integer arguments (== 1, multiple of
# 16); the buffer capacities and slot counts change from step to step, and each new compile stalled
# a step for seconds on the H200. Their values are plain runtime arguments instead.
_VARYING = {"_codec_kernel": ["word_capacity", "exc_capacity"], "_exceptions_kernel": ["n_slots", "only_layer"]}


@triton.jit(do_not_specialize=_VARYING["_codec_kernel"])
def _codec_kernel(layers_ptr, tile_layer_ptr, std_ptr, seeds_ptr, counters_ptr, word_capacity, exc_capacity,
                  bounds_ptr, stream_ptr, exc_layer_ptr, exc_index_ptr, exc_bits_ptr,
                  RESTORE: tl.constexpr, W_CODE: tl.constexpr, VARIANT: tl.constexpr, MANT: tl.constexpr,
                  TR: tl.constexpr, TC: tl.constexpr, ASM: tl.constexpr, FAST: tl.constexpr, ROUNDS: tl.constexpr,
                  PLAIN: tl.constexpr = False):
    """The exact-restore codec, fused, for 16-bit weights, many layers per launch, one tile per program.

    Perturb (``RESTORE`` false) writes ``fl(W + e)`` and what is needed to undo it. The restore
    pass computes ``cand = fl(fl(W + e) - e)``, which is ``W`` for most elements. For the others, the
    *ambiguous* ones (about 9% at rho = 0.05; see :func:`_field_widths`), the record keeps a field of 2, 4
    or 8 bits holding the key offset ``W - cand``, biased to the field's range; both passes compute
    which elements have a field and how wide it is from ``fl(W + e)`` and ``e``. A group of 8
    neighbours (the 16 bytes one thread loads) keeps its fields side by side, at most 64 bits, and a
    tile's groups follow each other in row-major order in whole 64-bit words of one stream, which the
    tile reserves with one atomic add (no word is shared between programs); ``bounds[t]`` keeps the
    first. The restore pass finds every group's bits with one running total over the tile's field
    widths and reads them with one or two loads. Anything else that restores wrongly (an offset past
    its field, a non-finite value) is an *exception* (layer, index, original bits). A tile whose
    words or exceptions would pass a buffer's capacity writes nothing (its weights stay clean), voids
    the exception slots it took and marks itself -1; a pass the host waits for is then redone with
    bigger buffers, one it does not wait for leaves those tiles clean for that step (see
    ``exact_perturb_layers``). A tile without rows (past the end of a short last block, or rows
    another rank holds) marks itself -2.

    Tiles are ``TR x TC`` of the rows (``layer_table.tile_shape``): 4 x 512, or for a transposed view with the
    transposed tiles on (``VARIANT`` 4, 5) 256 x 8, whose transpose is loaded and stored as memory holds it.

    ``PLAIN`` writes ``fl(W + e)`` and nothing else (backup restore keeps ``W`` itself): the same
    tiles, seeds and arithmetic, so the same bits as the codec's perturb pass.
    """
    t = tl.program_id(0)
    layer = tl.load(tile_layer_ptr + t).to(tl.int64)
    info = layers_ptr + layer * _NF
    if (tl.load(info + 11) != W_CODE) | (tl.load(info + 13) != VARIANT):
        return
    if RESTORE:
        word_base = tl.load(bounds_ptr + t).to(tl.int64)
        if word_base < 0:  # left clean at perturb time: nothing to undo
            return
    w_ptr = _typed(tl.load(info), W_CODE)
    # positions inside a row block fit in int32 (a block is at most CHUNK_BYTES / 48 elements)
    n_rows = tl.load(info + 1).to(tl.int32)
    n_cols = tl.load(info + 2).to(tl.int32)
    if VARIANT == 2 or VARIANT == 3:
        n_cols = tl.multiple_of(n_cols, 8)  # whole 16-byte vectors per row: masks stay uniform across a vector
    stride_row = tl.load(info + 3)
    rows_per_block = tl.load(info + 5).to(tl.int32)
    tiles_per_block = tl.load(info + 6).to(tl.int32)
    col_tiles = tl.load(info + 12).to(tl.int32)
    in_layer = (t - tl.load(info + 7)).to(tl.int32)
    block = in_layer // tiles_per_block
    in_block = in_layer - block * tiles_per_block
    row_tile = in_block // col_tiles
    first_col = (in_block - row_tile * col_tiles) * TC
    first_row = block * rows_per_block
    rows = row_tile * TR + tl.arange(0, TR)  # inside the block
    cols = first_col + tl.arange(0, TC)
    block_rows = tl.minimum(rows_per_block, n_rows - first_row)
    skip = tl.load(info + 14).to(tl.int32)  # rows before first_row belong to another rank
    if (row_tile * TR >= block_rows) | (first_row + row_tile * TR + TR <= skip):
        # no row of this tile exists (past the end of a short last block, or another rank's): the
        # tiles of a layer's last row block are counted as for a full one
        if not RESTORE and not PLAIN:
            tl.store(bounds_ptr + t, -2)  # no rows: nothing written, nothing to undo (-1 means left unperturbed)
        return
    row_mask = (rows < block_rows) & (first_row + rows >= skip)
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    seed = tl.load(seeds_ptr + tl.load(info + 9) + block)
    z = _tile_normals(seed, rows, cols, first_col, n_cols, TR, TC, VARIANT % 2 == 1, FAST, ROUNDS)
    std = tl.load(std_ptr + tl.load(info + 8) + first_row + rows, mask=row_mask, other=0.0)
    e = z * std[:, None]
    if VARIANT >= 4:
        # rows that are the columns of a contiguous matrix (a transposed view: GPT-2's Conv1D, fan_in_fan_out): the
        # tile is moved as memory holds it, TC lines of TR neighbours, and turned in the kernel (read row by row,
        # each element a gather at the stride of a whole row, the perturb pass took nine times as long)
        pointers = w_ptr + (first_row + rows).to(tl.int64)[None, :] + (cols.to(tl.int64) * tl.load(info + 4))[:, None]
        moved = tl.trans(mask)  # the mask of the moved tile
        w = tl.trans(tl.load(pointers, mask=moved, other=0.0))
    else:
        row_offsets = (first_row + rows).to(tl.int64) * stride_row
        if VARIANT >= 2:  # contiguous, 16-byte aligned rows: tell the compiler, so it vectorises
            row_pointers = tl.multiple_of(w_ptr + row_offsets, 16)
            pointers = row_pointers[:, None] + tl.max_contiguous(tl.multiple_of(cols, TC), TC)[None, :]
        else:
            pointers = w_ptr + row_offsets[:, None] + cols[None, :].to(tl.int64) * tl.load(info + 4)
        moved = mask
        w = tl.load(pointers, mask=mask, other=0.0)
    if PLAIN:
        _store_tile(pointers, (w.to(tl.float32) + e).to(w_ptr.dtype.element_ty), moved, VARIANT >= 4)
    else:  # (an early return would still compile the codec below, with the plain launch's dummy arguments)
        if RESTORE:
            new = w
        else:
            new = (w.to(tl.float32) + e).to(w_ptr.dtype.element_ty)
        candidate = (new.to(tl.float32) - e).to(w_ptr.dtype.element_ty)
        new_bits = _bits16(new, MANT)
        cand_bits = _bits16(candidate, MANT)
        ambiguous, width = _field_widths(new_bits, cand_bits, mask, MANT)
        cand_key = _key(cand_bits)
        # a group is the 8 neighbours one thread loads (16 bytes): its fields side by side, in element order
        G: tl.constexpr = TC // 8
        widths = tl.reshape(width, (TR, G, 8))
        at = tl.cumsum(widths, axis=2) - widths  # each field's first bit in its group's record (inside one thread)
        group_bits = tl.sum(widths, axis=2)  # at most 64: 8 fields of at most 8 bits
        starts = _tile_starts(group_bits, TR, G)
        if RESTORE:
            record = _bits_window(stream_ptr + word_base, starts.to(tl.int64), group_bits, ASM)
            limit = 1 << width  # a field of at most 8 bits: its low 32 bits hold it
            field = tl.reshape((record[:, :, None] >> at.to(tl.uint64)).to(tl.uint32), (TR, TC)).to(tl.int32) & (limit - 1)
            key = cand_key + field - (limit >> 1)  # no field, no offset: width 0 reads 0 and subtracts 0
            _store_tile(pointers, _key(key).to(tl.int16).to(w_ptr.dtype.element_ty, bitcast=True), moved, VARIANT >= 4)
        else:
            w_bits = w.to(tl.int16, bitcast=True).to(tl.int32)  # its exact pattern, NaN payloads included
            field = _key(w_bits) - cand_key + ((1 << width) >> 1)  # the key offset, biased to fit the field's range
            # an offset past its field; without a field (width 0, bias 0) any offset: W is not the candidate
            exception = (field.to(tl.uint32, bitcast=True) >= (1 << width).to(tl.uint32)) & mask
            # the record's bits and the exceptions, in one reduction over the groups (at most 2048 * 8 and 2048: 16 bits each)
            group_exceptions = tl.sum(tl.reshape(exception.to(tl.int32), (TR, G, 8)), axis=2)
            totals = tl.sum(tl.reshape(group_bits + (group_exceptions << 16), (TR * G,)), axis=0)
            n_words = ((totals & 0xFFFF) + 63) // 64
            word_base = tl.atomic_add(counters_ptr, n_words.to(tl.int64), sem="relaxed")
            # exceptions are rare (offsets past their field, non-finite values): a tile without any skips their
            # slot bookkeeping and its atomic altogether
            n_exc = totals >> 16
            exc_base = n_exc.to(tl.int64) * 0
            if n_exc > 0:
                exc_base = tl.atomic_add(counters_ptr + 1, n_exc.to(tl.int64), sem="relaxed")
            fits = (word_base + n_words <= word_capacity) & (exc_base + n_exc <= exc_capacity)
            if fits:
                # an exception's field is left 0 (its bits come from the exception slot), as is every field of width 0
                value = tl.where(exception, 0, field & ((1 << width) - 1))
                record = tl.sum(tl.reshape(value, (TR, G, 8)).to(tl.uint64) << at.to(tl.uint64), axis=2)  # disjoint fields: the sum is the OR
                _or_bits_at(stream_ptr + word_base, starts.to(tl.int64), record, ASM)
                _store_tile(pointers, new, moved, VARIANT >= 4)
                tl.store(bounds_ptr + t, word_base.to(tl.int32))
            else:
                tl.store(bounds_ptr + t, -1)
            if n_exc > 0:
                exc_masks = _group_masks(exception.to(tl.int32), TR, G, 8)
                exc_slot = exc_base.to(tl.int32) + tl.reshape(
                    _tile_starts(group_exceptions, TR, G)[:, :, None] + _ranks_in_group(exc_masks, TR, G, ASM, 8), (TR, TC))
                if fits:
                    flat = ((first_row + rows)[:, None] * n_cols + cols[None, :]).to(exc_index_ptr.dtype.element_ty)
                    tl.store(exc_index_ptr + exc_slot, flat, mask=exception)
                    tl.store(exc_layer_ptr + exc_slot, tl.full((TR, TC), 0, exc_layer_ptr.dtype.element_ty) + layer.to(exc_layer_ptr.dtype.element_ty),
                             mask=exception)
                    tl.store(exc_bits_ptr + exc_slot, w.to(tl.int16, bitcast=True), mask=exception)
                else:  # void the slots this tile took, so that the exceptions pass skips them
                    tl.store(exc_layer_ptr + exc_slot, tl.full((TR, TC), -1, exc_layer_ptr.dtype.element_ty), mask=exception & (exc_slot < exc_capacity))


@triton.jit(do_not_specialize=_VARYING["_exceptions_kernel"])
def _exceptions_kernel(layers_ptr, exc_layer_ptr, exc_index_ptr, exc_bits_ptr, n_slots, only_layer, BLOCK: tl.constexpr):
    """Put back the original bits of the exceptions in slots ``0:n_slots`` (after a restore pass).

    Slots marked -1 belong to skipped tiles. With ``only_layer >= 0`` only that layer's exceptions
    are put back, into the table's only layer (a one-layer restore into a copy).
    """
    slots = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    layer = tl.load(exc_layer_ptr + slots, mask=slots < n_slots, other=-1).to(tl.int64)
    mask = (slots < n_slots) & (layer >= 0)
    if only_layer >= 0:
        mask = mask & (layer == only_layer)
        layer = layer * 0
    info = layers_ptr + layer * _NF
    w_ptr = tl.load(info, mask=mask, other=0).to(tl.pointer_type(tl.int16))
    n_cols = tl.load(info + 2, mask=mask, other=1)
    stride_row = tl.load(info + 3, mask=mask, other=0)
    stride_col = tl.load(info + 4, mask=mask, other=0)
    flat = tl.load(exc_index_ptr + slots, mask=mask, other=0).to(tl.int64)
    bits = tl.load(exc_bits_ptr + slots, mask=mask, other=0)
    tl.store(w_ptr + (flat // n_cols) * stride_row + (flat % n_cols) * stride_col, bits, mask=mask)


_MANTISSA = {torch.bfloat16: 7, torch.float16: 10}
_ITEMSIZE = {code: dtype.itemsize for dtype, code in DTYPE_CODES.items()}


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _noise_tile(n_cols: int, turned: bool = False) -> Tuple[int, int]:
    """The noise kernel's ``TR x TC`` tile for rows of ``n_cols``: 2048 elements, at most 512 columns
    (so narrow layers do not leave most lanes masked); :data:`_TURNED_NOISE_TILE` for a transposed view."""
    if turned:
        return _TURNED_NOISE_TILE
    tc = min(TILE_COLS, max(4, _next_power_of_2(n_cols)))
    return _NOISE_TILE // tc, tc


def _is_turned(rows: Optional[torch.Tensor]) -> bool:
    """Whether the noise kernel reads ``rows`` in turned tiles: a transposed view of more than one column."""
    return rows is not None and rows.dim() == 2 and rows.shape[1] > 1 and is_transposed_view(rows)


def _launch_args(out: torch.Tensor, rows: Optional[torch.Tensor], std: torch.Tensor, seeds: torch.Tensor, n_rows: int, n_cols: int,
                 rows_per_block: int, work: torch.dtype) -> Tuple[Tuple[int], tuple, Dict[str, Any]]:
    """``(grid, arguments, keyword arguments)`` of the noise kernel's launch that writes ``fl(rows + e)``
    (``e`` alone without ``rows``) into ``out``."""
    turned = _is_turned(rows)
    tr, tc = _noise_tile(n_cols, turned)
    row_tiles, col_tiles = _cdiv(min(rows_per_block, n_rows), tr), _cdiv(n_cols, tc)
    source = rows if rows is not None else out
    vector = 16 // min(source.element_size(), out.element_size())  # elements per 16 bytes of the narrower of the two
    contig = (source.stride(1) == 1 and n_cols % vector == 0 and source.stride(0) % vector == 0
              and source.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0)
    grid = (_cdiv(n_rows, rows_per_block) * row_tiles * col_tiles,)
    args = (out, source, std.to(torch.float32).contiguous(), seeds, n_rows, n_cols, rows_per_block, source.stride(0), source.stride(1),
            row_tiles, col_tiles)
    options = dict(ADD=rows is not None, TR=tr, TC=tc, ALIGNED8=n_cols % 8 == 0, CONTIG=contig, VEC=vector, WORK_FP64=work == torch.float64,
                   FAST=_FAST_NORMALS, ROUNDS=_PHILOX_ROUNDS, TURNED=turned, enable_fp_fusion=False,
                   num_warps=_TURNED_NOISE_WARPS if turned else _NOISE_WARPS)
    return grid, args, options


def _launch(out: torch.Tensor, rows: Optional[torch.Tensor], std: torch.Tensor, seeds: torch.Tensor, n_rows: int, n_cols: int,
            rows_per_block: int, work: torch.dtype) -> torch.Tensor:
    grid, args, options = _launch_args(out, rows, std, seeds, n_rows, n_cols, rows_per_block, work)
    _noise_kernel[grid](*args, **options)
    return out


def _triton_version() -> Tuple[int, ...]:
    parts = []
    for part in triton.__version__.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


_DIRECT_RUNNER = [_triton_version() >= (3, 3)]
"""Whether :class:`LayerLaunch` may launch through a compiled kernel's own runner (set off for good if one refuses
its arguments). From Triton 3.3 the launcher hands that runner every parameter in signature order, constexprs
included; earlier versions passed the others only."""


_TENSOR_ARGS = ("w_ptr", "std_ptr", "seeds_ptr")  # the noise kernel's tensors besides the output: a layer's own each step
_PLAN_CACHE_SIZE = 256  # launch plans kept (one per distinct layer geometry; a Llama has five)


class _LaunchPlans:
    """Compiled runners of the noise kernel and their non-tensor arguments, kept across steps.

    A plan is keyed by everything that decides which compiled kernel Triton's launcher picks and what the
    non-tensor arguments are: the layer's shape, strides and types, the rows per block, and whether each
    tensor's address is a multiple of 16 (Triton specialises pointers on that). Layers of one shape share a
    plan, and a new step's tensors (its row stds and seeds are new tensors) reuse it. Plans hold no tensor,
    so a model that is deleted leaves nothing alive here.
    """

    def __init__(self, size: int = _PLAN_CACHE_SIZE):
        self.size = size
        self._plans: OrderedDict[tuple, Tuple[Callable[..., Any], tuple]] = OrderedDict()

    @staticmethod
    def key(rows: torch.Tensor, std: torch.Tensor, seeds: torch.Tensor, rows_per_block: int, work: torch.dtype) -> Optional[tuple]:
        """The plan's key, or None when the launch is not reusable as is (row stds that would need a copy)."""
        if std.dtype != torch.float32 or not std.is_contiguous():
            return None
        return (rows.device, tuple(rows.shape), rows.stride(), rows.dtype, rows.data_ptr() % 16, std.shape[0], std.data_ptr() % 16,
                seeds.dtype, seeds.data_ptr() % 16, rows_per_block, work)

    def get(self, key: tuple) -> Optional[Tuple[Callable[..., Any], tuple]]:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def put(self, key: tuple, runner: Callable[..., Any], rest: tuple) -> None:
        self._plans[key] = (runner, tuple(None if isinstance(value, torch.Tensor) else value for value in rest))
        while len(self._plans) > self.size:
            self._plans.popitem(last=False)

    def clear(self) -> None:
        self._plans.clear()


_PLANS = _LaunchPlans()


class LayerLaunch:
    """One layer's ``fl(W + e)``, as often as asked, each time into a new tensor: virtual mode's forward and backward.

    A launch through Triton's launcher binds the arguments, finds the kernel compiled for their specialisation and
    returns it; the compiled kernel's own runner skips that binding and cache lookup. The first launch of a layer
    geometry goes through the launcher, and its compiled kernel and non-tensor arguments are kept as a plan
    (:class:`_LaunchPlans`); every later launch of a layer of that geometry -- this step's backward, and every
    launch of later steps, forward included -- hands its own tensors and the plan's arguments to that runner.
    Host time per launch on the H200 machine's host (benchmarks/launch_time.py, one run): 47.8 us through the
    launcher, 18.6 us through the runner. A new output from PyTorch's caching allocator is aligned as the first
    one was (to 512 bytes on CUDA; the launch is specialised on 16), so the compiled kernel is the one Triton's
    launcher would pick.
    """

    def __init__(self, rows: torch.Tensor, std_rows: torch.Tensor, seeds: torch.Tensor, rows_per_block: int, work: torch.dtype):
        self.rows, self.std, self.seeds, self.rows_per_block, self.work = rows, std_rows, seeds, rows_per_block, work
        self._runner: Optional[Callable[..., Any]] = None
        self._rest: tuple = ()
        self._key = _PLANS.key(rows, std_rows, seeds, rows_per_block, work) if _DIRECT_RUNNER[0] else None
        if self._key is not None:
            plan = _PLANS.get(self._key)
            if plan is not None:
                self._adopt(*plan)

    def _adopt(self, runner: Callable[..., Any], template: tuple) -> None:
        """Take a plan's runner, with this layer's tensors in the template's tensor slots."""
        tensors = dict(zip(_TENSOR_ARGS, (self.rows, self.std, self.seeds)))
        names = _noise_kernel.arg_names[1:]
        self._rest = tuple(tensors[name] if name in tensors else value for name, value in zip(names, template))
        self._runner = runner

    def __call__(self) -> torch.Tensor:
        with made_current(self.rows.device):  # virtual mode's forward runs in the caller's device context
            return self._form(self.rows)

    def _form(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
        if self._runner is not None and _DIRECT_RUNNER[0] and out.data_ptr() % 16 == 0:
            # What the runner leaves out of Triton's launcher, none of which this kernel uses: pre-run hooks, the
            # check that globals read by the kernel have not changed, recompiling when debug settings change.
            try:
                self._runner(out, *self._rest)
                return out
            except TypeError as error:  # a Triton whose runner takes other arguments (refused before launching)
                _DIRECT_RUNNER[0] = False
                _PLANS.clear()
                warnings.warn(f"Triton's compiled-kernel runner refused virtual mode's launch arguments ({error}); launching "
                              "through Triton's launcher from now on (same values, more host time per launch).", stacklevel=2)
        grid, args, options = _launch_args(out, rows, self.std, self.seeds, rows.shape[0], rows.shape[1], self.rows_per_block, self.work)
        compiled = _noise_kernel[grid](*args, **options)
        if _DIRECT_RUNNER[0] and self._runner is None and compiled is not None and hasattr(compiled, "__getitem__"):  # None: the interpreter
            values = dict(zip(_noise_kernel.arg_names, args), **options)
            self._rest = tuple(values[name] for name in _noise_kernel.arg_names[1:])  # every parameter after the output
            self._runner = compiled[(grid[0], 1, 1)]
            if self._key is not None and args[2] is self.std and out.data_ptr() % 16 == 0:  # the row stds went in as they are
                _PLANS.put(self._key, self._runner, self._rest)
        return out


def _register_cap(variant: int, restore: bool) -> Optional[int]:
    """The ``maxnreg`` of a codec pass over rows of codec ``variant``, or None for the compiler's own choice (the
    strided and unaligned row-major layouts need up to 254 registers, and the restore pass of contiguous rows 72)."""
    if variant == 5:
        return _TURNED_MAX_REGISTERS[restore]
    if variant == 3 and not restore:
        return _PERTURB_MAX_REGISTERS
    return None


def _check_codec_layers(table: LayerTable, what: str) -> None:
    """The codec kernel's limits: 16-bit weights, element positions that fit in int32."""
    if not all(d in _MANTISSA for d in table.dtypes):
        raise ValueError(f"{what} takes bfloat16 and float16 weights only")
    if any((m + skip) * n >= 2**31 for (m, n), skip in zip(table.shapes, table.first_rows)):
        raise ValueError(f"{what} indexes a layer's elements with int32: a layer has 2**31 elements or more")


def _row_std_forms(ranks: Sequence[int], w_code: int, ab_code: int) -> List[Tuple[bool, int, int]]:
    """The row-std kernel's launches for one weight and adapter type: ``(DOT, R, MIN_RANK)`` each. A launch
    takes the layers of rank above ``MIN_RANK`` (-1: every rank), and with ``DOT`` up to ``R``.

    A layer's form, and so its stds' bits, follow from its own rank and types, not from the other layers of
    the table: the tensor cores for 16-bit weights with adapters of their own type, ranks up to 16 and
    17-32 (a rank padded with zero rows adds exact zeros); the element-wise form above, for float32/float64
    weights, and for adapters of another type. Those (float32 adapters on bfloat16 weights: peft's default)
    would need two 16-bit parts each to keep their precision, and on an H200 that form took 1.82 ms for the
    1 B Llama's stds against 1.15 ms element-wise (noise_time.py --adapters float32). TF32 products (``A``
    rounded to 10 mantissa bits) took 1.085 against 1.145 ms, and missed the formula by more than 1e-4 where
    ``s B A`` is as large as ``W`` (tests/test_gpu.py): not adopted.
    """
    largest = max(list(ranks) + [1])
    loop_r = min(_next_power_of_2(largest), 16)  # element-wise: above 8 the kernel loops over the rank (same sums)
    if not _STD_DOT or w_code in (0, 3) or ab_code != w_code:
        return [(False, loop_r, -1)]
    forms = [(True, r, low) for r, low in ((16, -1), (32, 16)) if r <= _STD_DOT_MAX_RANK and any(low < k <= r for k in ranks)]
    if any(k > _STD_DOT_MAX_RANK for k in ranks):
        forms.append((False, loop_r, _STD_DOT_MAX_RANK))
    return forms


class TritonNoiseKernel:
    """Same interface as :class:`flatlora_optim.noise.TorchNoiseKernel`, fused on CUDA."""

    name = "triton"
    takes_device_seeds = True  # a block's seed as a slice of the step's one upload

    @staticmethod
    def _seeds(seed: Union[int, torch.Tensor], device: torch.device) -> torch.Tensor:
        # a one-element device tensor: callers that loop over blocks pass slices of one upload
        return seed if isinstance(seed, torch.Tensor) else torch.tensor([seed], dtype=torch.int64, device=device)

    def noise(self, std_rows: torch.Tensor, n_cols: int, seed: Union[int, torch.Tensor], work: torch.dtype) -> torch.Tensor:
        rows = std_rows.shape[0]
        out = torch.empty((rows, n_cols), dtype=work, device=std_rows.device)
        return _launch(out, None, std_rows, self._seeds(seed, std_rows.device), rows, n_cols, rows, work)

    def perturbed(
        self, block: torch.Tensor, std_rows: torch.Tensor, seed: Union[int, torch.Tensor], work: torch.dtype, noise: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        # ``noise`` is ignored: the fused kernel regenerates it, so every mode gets the same W + e.
        rows, n_cols = block.shape
        out = torch.empty((rows, n_cols), dtype=block.dtype, device=block.device)
        return _launch(out, block, std_rows, self._seeds(seed, block.device), rows, n_cols, rows, work)

    def perturbed_layer(self, rows: torch.Tensor, std_rows: torch.Tensor, seeds: torch.Tensor, rows_per_block: int, work: torch.dtype) -> torch.Tensor:
        """``fl(W + e)`` for a whole ``m x n`` layer in one launch (``seeds[b]`` seeds row block ``b``)."""
        return self.layer_former(rows, std_rows, seeds, rows_per_block, work)()

    def layer_former(self, rows: torch.Tensor, std_rows: torch.Tensor, seeds: torch.Tensor, rows_per_block: int, work: torch.dtype) -> LayerLaunch:
        """What forms :meth:`perturbed_layer`'s tensor on each call, with less host work from the second call on."""
        return LayerLaunch(rows, std_rows, seeds, rows_per_block, work)


    # ----------------------------------------------------------------- grouped (many layers per launch)

    def row_stds(self, table: LayerTable, adapters: Sequence[Optional[Tuple[torch.Tensor, torch.Tensor, float]]], std_scales: Sequence[float],
                 out: torch.Tensor) -> None:
        """Write ``std_scales[l] * ||W_i + s (B A)_i||`` for every row of every layer into ``out``
        (float32, at the table's ``std_bases``); ``std_scales[l]`` is ``sigma / sqrt(n)``."""
        adapter_rows, factors, ab_codes = table.adapter_tables(adapters, std_scales)
        ranks = [0 if a is None else a[0].shape[0] for a in adapters]
        for w_code in table.dtype_codes:
            wide = w_code in (0, 3)  # float32/float64 weights: sums in float64, no tensor cores
            for ab_code in ab_codes:
                for dot, r, min_rank in _row_std_forms(ranks, w_code, ab_code):
                    sub = ROWS_PER_PROGRAM if dot else _STD_ELEMENTWISE_ROWS
                    for contig in sorted({bool(v & 2) for v in table.variants}):  # bit 1: contiguous aligned rows
                        _row_std_kernel[(table.n_rowtiles * (ROWS_PER_PROGRAM // sub),)](
                            table.layers, adapter_rows, factors, table.rowtile_layer, out,
                            W_CODE=w_code, AB_CODE=ab_code, ROWS=ROWS_PER_PROGRAM,
                            BLOCK_N=_STD_DOT_BLOCK_N * 16 // r if dot else _STD_BLOCK_N_FP64 if wide else _STD_BLOCK_N,
                            R=r, ACC_FP64=wide, CONTIG=contig, VEC=16 // _ITEMSIZE[w_code], STAGES=1 if wide else _STD_STAGES, DOT=dot,
                            MIN_RANK=min_rank, SUB=sub, enable_fp_fusion=_STD_FP_FUSION, num_warps=2 * _STD_WARPS if dot and r > 16 else _STD_WARPS,
                        )

    def row_std(self, rows: torch.Tensor, A: Optional[torch.Tensor], B: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        """Per-row noise std ``scale * ||W_i + (B A)_i||`` of one layer (float32, 0 where not finite).

        ``A`` (``R x n``) and ``B`` (``m x R``, scalings folded in), or None without adapters.
        """
        out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        adapter = None if A is None else (A, B.to(A.dtype), 1.0)
        self.row_stds(LayerTable([rows]), [adapter], [scale], out)
        return out

    @staticmethod
    def fused_exact_supported(dtype: torch.dtype) -> bool:
        return dtype in _MANTISSA

    def _exact(self, table: LayerTable, std: torch.Tensor, seeds: torch.Tensor, record: Optional[ExactGroupRecord], restore: bool,
               counters: Optional[torch.Tensor] = None, compile_only: bool = False) -> None:
        """One codec launch per weight type and codec variant of ``table``; with no ``record``, the
        plain form (``fl(W + e)`` only). ``compile_only`` compiles those launches and runs nothing."""
        plain = record is None
        buffers = (std,) * 5 if plain else (record.bounds, record.stream, record.exc_layer, record.exc_index, record.exc_bits)
        capacity = (0, 0) if plain else (record.word_capacity, record.exc_capacity)
        for code in table.dtype_codes:
            dtype = next(d for d, c in DTYPE_CODES.items() if c == code)
            for variant in table.variants:
                args = (table.layers, table.tile_layer, std, seeds, counters if counters is not None else std, *capacity, *buffers)
                tile_rows, tile_cols = tile_shape(variant)
                options = dict(
                    RESTORE=restore, W_CODE=code, VARIANT=variant, MANT=_MANTISSA[dtype], TR=tile_rows, TC=tile_cols, ASM=_ASM, FAST=_FAST_NORMALS,
                    ROUNDS=_PHILOX_ROUNDS, PLAIN=plain,
                    enable_fp_fusion=False,
                    num_warps=_TURNED_WARPS if variant >= 4 else _PLAIN_WARPS if plain else _RESTORE_WARPS if restore else _PERTURB_WARPS,
                )
                cap = _register_cap(variant, restore) if _MAXNREG and not plain else None
                if cap is not None:
                    options["maxnreg"] = cap
                if compile_only:
                    _codec_kernel.warmup(*args, grid=(table.n_tiles,), **options)
                else:
                    _codec_kernel[(table.n_tiles,)](*args, **options)

    def _compile_restore(self, table: LayerTable, std: torch.Tensor, seeds: torch.Tensor) -> None:
        """Compile the restore pass's kernels for ``table`` before its first perturb pass runs.

        A kernel compiles on its first launch, in a ``ptxas`` child process. Were that first launch
        a restore's, a Ctrl-C meanwhile (which reaches child processes too) would make the restore
        fail with the weights still perturbed; compiled here, before anything is written, a failure
        leaves the weights clean. Nothing is launched. The interpreter has nothing to compile.
        Not covered: :meth:`exact_restore_one` of a layer whose first tile is not a multiple of 4 (its
        slice of ``bounds`` is then not 16-byte aligned, another specialisation); it restores into a
        copy (a clean ``state_dict``), or the live weight only when a layer is restored alone.
        """
        if not _ASM:
            return
        record = ExactGroupRecord.allocate(table, (0, 0))  # the restore's argument types: its compiled form is the same
        self._exact(table, std, seeds, record, restore=True, compile_only=True)
        _exceptions_kernel.warmup(table.layers, record.exc_layer, record.exc_index, record.exc_bits, 1, -1, BLOCK=256, grid=(1,))

    def add_noise_layers(self, table: LayerTable, std: torch.Tensor, seeds: torch.Tensor) -> None:
        """Write ``fl(W + e)`` into every (16-bit) layer of ``table``, keeping nothing: the same bits as
        :meth:`exact_perturb_layers` writes (used with backup restore, which keeps ``W`` itself)."""
        _check_codec_layers(table, "the grouped noise pass")
        self._exact(table, std, seeds, None, restore=False)

    def exact_perturb_layers(self, table: LayerTable, std: torch.Tensor, seeds: torch.Tensor,
                             while_waiting: Optional[Callable[[], None]] = None, step: Optional[int] = None,
                             sigma: Optional[float] = None) -> ExactGroupRecord:
        """Write ``fl(W + e)`` into every layer of ``table`` and return the exact-restore record.

        One pass over the weights. The buffers are sized from an earlier pass's counts plus headroom
        (kept on the table). Without ``step``, and on a table's first pass, the host then waits for
        the pass to read how many slots it used; when the buffers turn out too small, what was
        written is undone and the pass redone: every tile is perturbed.

        With ``step`` and ``sigma`` (a training step's pass, at noise level ``sigma``) on a table that
        has counts taken at a noise level no less than a quarter of ``sigma``, the host does not wait
        (that wait left the device idle for about 2 ms per step of the 1 B Llama): the buffers are
        scaled by the rise of ``sigma`` since the counts were taken (the slots needed grow at most in
        proportion to it), the exceptions pass looks at every slot, and the counts are read later, by
        :meth:`settle_counts`. Should the buffers still be too small, the tiles that did not fit stay
        clean in that step (restore stays exact), and a ``RuntimeWarning`` names the step: at its
        restore, or at the latest before the table's next pass writes anything.

        ``while_waiting`` runs once, after the pass is queued and before any host wait: host work
        put there overlaps the pass instead of leaving the device idle after it.
        """
        _check_codec_layers(table, "the fused exact codec")
        device = table.device
        report = self.settle_counts(table, wait=True)  # an earlier pass's counts, not read yet, size this one
        if report is not None:  # nothing is written yet: a warning turned into an error leaves the weights clean
            warnings.warn(report, RuntimeWarning, stacklevel=2)
        # the first step has no counts to go by: a pass with no room counts them (tiles that need
        # room are skipped, nothing is written for them), then the real pass runs with exact buffers
        if table.codec_capacity is None:  # this table's first pass
            self._compile_restore(table, std, seeds)
        elif step is not None and sigma is not None and table.codec_sigma and sigma <= _LARGEST_UNWAITED_RISE * table.codec_sigma:
            return self._perturb_without_waiting(table, std, seeds, while_waiting, step, sigma)
        capacity = table.codec_capacity or (0, 0)
        while True:
            counters = torch.zeros(2, dtype=torch.int64, device=device)
            record = ExactGroupRecord.allocate(table, capacity)
            try:
                self._exact(table, std, seeds, record, restore=False, counters=counters)
                if while_waiting is not None:
                    waiting, while_waiting = while_waiting, None
                    waiting()
                used = counters.tolist()  # the one host sync
            except BaseException:  # a later launch failed, or Ctrl-C while compiling or waiting at the sync
                self._undo_written(table, std, seeds, record, counters)
                raise
            record.n_exceptions = min(used[1], capacity[1])
            if all(u <= c for u, c in zip(used, capacity)):
                table.codec_capacity = _next_capacity(used)
                table.codec_sigma = sigma
                return record
            self._undo_written(table, std, seeds, record, counters)  # buffers too small: undo, then redo bigger
            capacity = tuple(max(c, n) for c, n in zip(capacity, _next_capacity(used, 1.1)))

    def _perturb_without_waiting(self, table: LayerTable, std: torch.Tensor, seeds: torch.Tensor,
                                 while_waiting: Optional[Callable[[], None]], step: int, sigma: float) -> ExactGroupRecord:
        """The perturb pass with buffers sized ahead and its counts read later (see :meth:`exact_perturb_layers`)."""
        rise = max(sigma / table.codec_sigma, 1.0)
        capacity = tuple(min(int(c * rise), most) for c, most in zip(table.codec_capacity, _largest_need(table)))
        counters = torch.zeros(2, dtype=torch.int64, device=table.device)
        record = ExactGroupRecord.allocate(table, capacity)
        try:
            self._exact(table, std, seeds, record, restore=False, counters=counters)
            if while_waiting is not None:
                while_waiting()
            record.n_exceptions = record.exc_capacity  # not read yet: the exceptions pass skips the unused slots (layer -1)
            table.codec_pending = PendingCounts(counters, record.bounds, capacity, step, sigma)
        except BaseException:  # a later launch failed, or Ctrl-C: undo what the pass wrote
            self._undo_written(table, std, seeds, record, counters)
            raise
        return record

    def settle_counts(self, table: LayerTable, wait: bool) -> Optional[str]:
        """Read the counts of ``table``'s last pass that did not wait for them, once the device has
        them (or, with ``wait``, waiting for them): they size the next pass's buffers. Returns the
        warning to give when that pass's buffers were too small (some of its tiles were left without
        noise), for the caller to give once the weights are in order; else None."""
        pending = table.codec_pending
        if pending is None or not (wait or pending.ready()):
            return None
        table.codec_pending = None
        words, exceptions = pending.read()
        overflowed = words > pending.capacity[0] or exceptions > pending.capacity[1]
        table.codec_capacity = _next_capacity((words, exceptions), 1.1 if overflowed else 1.02)
        table.codec_sigma = pending.sigma
        if not overflowed:
            return None
        # tiles left clean (-1) and tiles with rows (not -2: past a short last row block, or another rank's rows),
        # counted only here: the host has waited for the pass already
        clean_tiles, tiles = int((pending.bounds == -1).sum()), int((pending.bounds != -2).sum())
        return (f"Flat-LoRA step {pending.step}: the exact-restore record was too small ({words} words and {exceptions} "
                f"exceptions needed, room for {pending.capacity[0]} and {pending.capacity[1]}), so {clean_tiles} of "
                f"{tiles} tiles of 2048 weights carried no noise in that step (the restore stayed exact). The "
                "record is now sized for it; this happens when the weights or the noise level change sharply between steps.")

    def _undo_written(self, table: LayerTable, std: torch.Tensor, seeds: torch.Tensor, record: ExactGroupRecord, counters: torch.Tensor) -> None:
        """Undo the tiles a perturb pass wrote (an interrupted pass, or one whose buffers were too
        small): the others have bounds -1. When no tile was written (the first step's counting pass,
        a failed first launch) no restore pass is compiled or run. A Ctrl-C meanwhile waits for the
        undo to finish (a half-undone pass could not be undone again)."""
        if not bool((record.bounds >= 0).any()):
            return
        with interrupts_deferred():
            record.n_exceptions = min(int(counters[1]), record.exc_capacity)
            self.exact_restore_layers(table, std, seeds, record)

    def exact_restore_layers(self, table: LayerTable, std: torch.Tensor, seeds: torch.Tensor, record: ExactGroupRecord,
                             only_layer: int = -1) -> None:
        """Write the original bits back into every layer of ``table`` (which hold ``fl(W + e)``).

        ``only_layer`` restores one layer of the record into a one-layer ``table`` (see exact_restore_one).
        """
        self._exact(table, std, seeds, record, restore=True)
        if record.n_exceptions:
            _exceptions_kernel[(_cdiv(record.n_exceptions, 256),)](
                table.layers, record.exc_layer, record.exc_index, record.exc_bits, record.n_exceptions, only_layer, BLOCK=256,
            )

    @staticmethod
    def _one_layer(table: LayerTable, layer: int, dest: torch.Tensor) -> LayerTable:
        """Layer ``layer`` of ``table`` alone, at ``dest``: its rows draw the stds and seeds they draw in the group, in the
        table's tiles (transposed or not, whatever the switch says now: they are the record's)."""
        one = LayerTable([dest], std_bases=[table.std_bases[layer]], seed_bases=[table.seed_bases[layer]], row_ranges=[table.row_ranges[layer]],
                         turned=bool(table.layer_variants[layer] & 4))
        if one.shapes[0] != table.shapes[layer]:
            raise ValueError(f"destination has shape {tuple(dest.shape)}, the layer {table.shapes[layer]}")
        return one

    def add_noise_one(self, table: LayerTable, layer: int, dest: torch.Tensor, std: torch.Tensor, seeds: torch.Tensor) -> None:
        """Write layer ``layer``'s ``fl(W + e)`` into ``dest`` (holding its ``W``): the bits the group's pass writes."""
        self.add_noise_layers(self._one_layer(table, layer, dest), std, seeds)

    def exact_restore_one(self, table: LayerTable, layer: int, dest: torch.Tensor, std: torch.Tensor, seeds: torch.Tensor,
                          record: ExactGroupRecord) -> None:
        """Undo layer ``layer`` of a group in ``dest`` (the live weight or a copy of its perturbed rows)."""
        turned = bool(table.layer_variants[layer] & 4)  # the table's tiles, whatever the switch says now: the record's
        if bool(codec_variant(dest, turned) & 4) != turned:
            # a copy laid out otherwise than the layer (row-major against transposed): its tiles would not be the
            # record's, so the rows are undone in a copy of the layer's layout
            m, n = dest.shape
            like = torch.empty((n, m) if turned else (m, n), dtype=dest.dtype, device=dest.device)
            like = like.t() if turned else like
            like.copy_(dest)
            self.exact_restore_one(table, layer, like, std, seeds, record)
            dest.copy_(like)
            return
        one = self._one_layer(table, layer, dest)
        first = table.tile_bases[layer]
        self.exact_restore_layers(one, std, seeds, record.slice(first, first + table.tiles[layer]), only_layer=layer)

    # one-layer forms (tests, and callers that handle a single weight)

    def exact_perturb(self, rows: torch.Tensor, std_rows: torch.Tensor, seeds: torch.Tensor, rows_per_block: int) -> ExactGroupRecord:
        """Write ``fl(W + e)`` into one layer's rows and return the record (``seeds[b]`` seeds row block ``b``)."""
        table = LayerTable([rows])
        assert table.layers[0, 5].item() == rows_per_block, "row blocks are rows_per_chunk(n) rows"
        return self.exact_perturb_layers(table, std_rows.to(torch.float32).contiguous(), seeds)

    def exact_restore(self, dest: torch.Tensor, std_rows: torch.Tensor, seeds: torch.Tensor, rows_per_block: int, record: ExactGroupRecord) -> None:
        """Write the original bits into ``dest`` (which holds ``fl(W + e)``) from a one-layer record."""
        self.exact_restore_layers(LayerTable([dest]), std_rows.to(torch.float32).contiguous(), seeds, record, only_layer=0)


_LARGEST_UNWAITED_RISE = 4.0
"""A pass whose noise level is more than this many times the one its buffers were counted at waits for its counts
(a cosine schedule's first steps, a resumed run, a jump of a user's schedule): scaling the buffers by a large rise
would reserve far more memory than the pass can need."""


def _largest_need(table: LayerTable) -> Tuple[int, int]:
    """The most stream words and exceptions any pass over ``table`` can need: every element with an 8-bit
    field (in whole words per tile), and every element an exception."""
    per_tile = max(rows * cols for rows, cols in map(tile_shape, table.variants))
    words_per_tile = (8 * per_tile + 63) // 64
    return table.n_tiles * words_per_tile, sum(m * n for m, n in table.shapes)


def _next_capacity(used: Sequence[int], headroom: float = 1.02) -> Tuple[int, int]:
    """The buffers (stream words, exceptions) for the next pass, from a pass's counts."""
    words, exceptions = used
    return int(words * headroom) + 1024, int(exceptions * headroom) + 1024


class PendingCounts:
    """A perturb pass's counts (stream words and exceptions needed) on their way to the host without the host
    waiting for them: a copy into pinned memory, and an event to ask. ``bounds`` (the record's tile marks) is kept
    for the warning of a pass that overflowed, which counts its tiles from them."""

    def __init__(self, counters: torch.Tensor, bounds: torch.Tensor, capacity: Tuple[int, int], step: int, sigma: float):
        self.event: Optional[torch.cuda.Event] = None
        if counters.is_cuda:
            self.host = torch.empty(2, dtype=torch.int64, pin_memory=True)
            self.host.copy_(counters, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:  # the interpreter's CPU tensors: already there
            self.host = counters
        self.bounds, self.capacity, self.step, self.sigma = bounds, capacity, step, sigma

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def read(self) -> List[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class ExactGroupRecord:
    """What the fused codec keeps between perturb and restore for a group of layers.

    ``bounds[t]`` is tile ``t``'s first word in ``stream`` (-1 for a tile left unperturbed, -2 for a
    tile without rows); a tile's words hold its groups' fields (2, 4 or 8 bits per ambiguous element); the exception
    buffers hold ``n_exceptions`` used slots (layer, layer-local flat index, original bits; layer
    -1 for void slots).
    """

    def __init__(self, bounds: torch.Tensor, stream: torch.Tensor, exc_layer: torch.Tensor, exc_index: torch.Tensor, exc_bits: torch.Tensor,
                 capacity: Tuple[int, int], n_exceptions: int = 0):
        self.bounds, self.stream = bounds, stream
        self.exc_layer, self.exc_index, self.exc_bits = exc_layer, exc_index, exc_bits
        self.word_capacity, self.exc_capacity = capacity
        self.n_exceptions = n_exceptions
        self._nbytes: Optional[int] = None

    @classmethod
    def allocate(cls, table: LayerTable, capacity: Tuple[int, int]) -> ExactGroupRecord:
        """Empty buffers of ``capacity`` (stream words, exceptions) for ``table``'s tiles."""
        words, exceptions = capacity
        if exceptions >= 2**31 or words >= 2**31:
            raise ValueError("the fused exact codec's record needs more than 2**31 slots: use smaller groups of layers")
        device = table.device
        return cls(
            torch.full((table.n_tiles,), -1, dtype=torch.int32, device=device),  # -1: not perturbed (yet)
            torch.zeros(words + 1, dtype=torch.int64, device=device),  # fields are OR-ed in: start from 0
            # layer -1 marks a slot unused: a pass whose counts are read later has its exceptions pass look at every slot
            torch.full((exceptions,), -1, dtype=torch.int16 if len(table) < 2**15 else torch.int32, device=device),
            torch.empty(exceptions, dtype=torch.int32, device=device),
            torch.empty(exceptions, dtype=torch.int16, device=device),
            capacity,
        )

    def slice(self, first_tile: int, end_tile: int) -> ExactGroupRecord:
        """The part for tiles ``first_tile:end_tile`` (word and exception slots stay absolute)."""
        return ExactGroupRecord(self.bounds[first_tile:end_tile], self.stream, self.exc_layer, self.exc_index, self.exc_bits,
                                (self.word_capacity, self.exc_capacity), self.n_exceptions)

    def nbytes(self) -> int:
        if self._nbytes is None:  # the buffers never change size; this is read for every layer at every step
            self._nbytes = sum(t.numel() * t.element_size() for t in (self.bounds, self.stream, self.exc_layer, self.exc_index, self.exc_bits))
        return self._nbytes

    def layer_nbytes(self, tiles: int) -> int:
        """A layer's share of the record: the bytes in proportion to its tiles (slots are not kept per layer)."""
        return self.nbytes() * tiles // self.bounds.shape[0]
