"""Triton kernels for the noise on CUDA: one pass draws ``z``, scales it per row and adds it to ``W``.

The torch kernel draws a block's noise with ``torch.randn`` into a temporary, multiplies it by the
row stds and adds it to the weights: several passes over a block plus a generator re-seed. Here
``z`` comes from Philox inside the kernel, so forming ``fl(W + e)`` reads ``W`` once and writes the
result once, and the noise is regenerated from ``(seed, position)`` alone, with no generator state.

Element ``L`` of a row block (row-major position inside the block) takes lane ``L % 4`` of the
Philox output for counter ``L // 4`` under the block's seed (``tl.randn4x``: four normals per
Philox evaluation). A launch covers any number of row blocks, one grid row per block, so the
whole-layer launch of virtual mode and the per-block launches of in-place mode give the same bits.

The Triton stream differs from ``torch.randn``'s: on CUDA a seed reproduces a run with this kernel
(``FLATLORA_NOISE_KERNEL=torch`` selects the torch kernel instead).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

__all__ = ["TritonNoiseKernel"]

_BLOCK = 2048  # elements per program; a multiple of 4


@triton.jit
def _normals(seed, first_counter, QUARTER: tl.constexpr):
    """``4 * QUARTER`` standard normals for consecutive elements, four per Philox evaluation."""
    n1, n2, n3, n4 = tl.randn4x(seed, first_counter + tl.arange(0, QUARTER))
    z = tl.join(tl.join(n1, n3), tl.join(n2, n4))  # [QUARTER, 2, 2] = n1 n2 n3 n4 per counter
    return tl.reshape(z, (4 * QUARTER,))


@triton.jit
def _noise_kernel(out_ptr, w_ptr, std_ptr, seeds_ptr, n_rows, n_cols, rows_per_block, stride_row, stride_col,
                  ADD: tl.constexpr, BLOCK: tl.constexpr, WORK_FP64: tl.constexpr):
    # grid: (row block, tile inside the block)
    block = tl.program_id(0)
    tile = tl.program_id(1)
    first_row = block.to(tl.int64) * rows_per_block
    block_rows = tl.minimum(rows_per_block, n_rows - first_row)
    local = tile * BLOCK + tl.arange(0, BLOCK)  # position inside the row block
    mask = local < block_rows * n_cols
    seed = tl.load(seeds_ptr + block)
    z = _normals(seed, tile * (BLOCK // 4), BLOCK // 4)
    row = first_row + local // n_cols
    col = local % n_cols
    std = tl.load(std_ptr + row, mask=mask, other=0.0)
    if WORK_FP64:
        e = z.to(tl.float64) * std.to(tl.float64)
    else:
        e = z * std
    out_offsets = row * n_cols + col
    if ADD:
        w = tl.load(w_ptr + row * stride_row + col * stride_col, mask=mask, other=0.0)
        if WORK_FP64:
            value = w.to(tl.float64) + e
        else:
            value = w.to(tl.float32) + e
        tl.store(out_ptr + out_offsets, value.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + out_offsets, e, mask=mask)


@triton.jit
def _row_std_kernel(w_ptr, a_ptr, b_ptr, g_ptr, out_ptr, n_cols, rank, stride_row, stride_col, scale,
                    BLOCK: tl.constexpr, R: tl.constexpr, ACC_FP64: tl.constexpr):
    # One program per row i: ||W_i||^2 + 2 b_i (A W_i^T) + b_i G b_i^T, G = A A^T, then
    # std_i = scale * sqrt(max(., 0)), 0 where not finite. A is (rank x n), b (m x rank), fp32.
    row = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, R)
    r_mask = r < rank
    if ACC_FP64:
        squares = tl.zeros((BLOCK,), dtype=tl.float64)
    else:
        squares = tl.zeros((BLOCK,), dtype=tl.float32)
    projected = tl.zeros((R,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        col_mask = cols < n_cols
        w = tl.load(w_ptr + row * stride_row + cols * stride_col, mask=col_mask, other=0.0)
        if ACC_FP64:
            squares += w.to(tl.float64) * w.to(tl.float64)
        else:
            squares += w.to(tl.float32) * w.to(tl.float32)
        a = tl.load(a_ptr + r[:, None] * n_cols + cols[None, :], mask=r_mask[:, None] & col_mask[None, :], other=0.0)
        projected += tl.sum(a * w.to(tl.float32)[None, :], axis=1)
    b = tl.load(b_ptr + row * rank + r, mask=r_mask, other=0.0)
    g = tl.load(g_ptr + r[:, None] * rank + r[None, :], mask=r_mask[:, None] & r_mask[None, :], other=0.0)
    low_rank = tl.sum(tl.sum(g * b[None, :], axis=1) * b, axis=0)
    total = tl.sum(squares, axis=0).to(tl.float64) + 2.0 * tl.sum(projected * b, axis=0).to(tl.float64) + low_rank.to(tl.float64)
    std = (tl.sqrt(tl.maximum(total, 0.0)) * scale).to(tl.float32)
    finite = (std == std) & (tl.abs(std) < float("inf"))
    tl.store(out_ptr + row, tl.where(finite, std, 0.0))


@triton.jit
def _exact_kernel(w_ptr, std_ptr, seeds_ptr, counts_ptr, amb_offsets_ptr, exc_offsets_ptr, codes_ptr, exc_index_ptr, exc_bits_ptr,
                  n_rows, n_cols, rows_per_block, stride_row, stride_col, tiles_per_block,
                  PHASE: tl.constexpr, MANT: tl.constexpr, BLOCK: tl.constexpr):
    """The exact-restore codec of restore.ExactRestore, fused, for 16-bit weights (work dtype fp32).

    PHASE 0 counts each tile's ambiguous elements and exceptions; PHASE 1 writes W + e in place,
    the 4-bit key offsets of ambiguous elements (packed 8 per int32, at the tile's prefix-sum
    offset) and the exceptions; PHASE 2 restores W from W + e (possibly in a copy) and the codes.
    """
    block = tl.program_id(0)
    tile = tl.program_id(1)
    tile_id = block * tiles_per_block + tile
    first_row = block.to(tl.int64) * rows_per_block
    block_rows = tl.minimum(rows_per_block, n_rows - first_row)
    local = tile * BLOCK + tl.arange(0, BLOCK)
    mask = local < block_rows * n_cols
    seed = tl.load(seeds_ptr + block)
    z = _normals(seed, tile * (BLOCK // 4), BLOCK // 4)
    row = first_row + local // n_cols
    col = local % n_cols
    e = z * tl.load(std_ptr + row, mask=mask, other=0.0)
    pointers = w_ptr + row * stride_row + col * stride_col
    w = tl.load(pointers, mask=mask, other=0.0)
    if PHASE == 2:
        new = w
    else:
        new = (w.to(tl.float32) + e).to(w_ptr.dtype.element_ty)
    candidate = (new.to(tl.float32) - e).to(w_ptr.dtype.element_ty)
    new_bits = new.to(tl.int16, bitcast=True).to(tl.int32)
    cand_bits = candidate.to(tl.int16, bitcast=True).to(tl.int32)
    ambiguous = (((new_bits & 0x7FFF) >> MANT) > ((cand_bits & 0x7FFF) >> MANT)) & mask
    cand_key = cand_bits ^ ((cand_bits >> 31) & 0x7FFF)
    position = tl.cumsum(ambiguous.to(tl.int32), axis=0) - 1
    if PHASE == 2:
        base = tl.load(amb_offsets_ptr + tile_id)
        slot = base + position
        word = tl.load(codes_ptr + (slot >> 3), mask=ambiguous, other=0)
        code = (word >> ((slot & 7) * 4)) & 15
        key = cand_key + tl.where(ambiguous, code - 8, 0)
        restored = (key ^ ((key >> 31) & 0x7FFF)).to(tl.int16).to(w_ptr.dtype.element_ty, bitcast=True)
        tl.store(pointers, restored, mask=mask)
    else:
        w_bits = w.to(tl.int16, bitcast=True).to(tl.int32)
        offset = (w_bits ^ ((w_bits >> 31) & 0x7FFF)) - cand_key
        fits = (offset >= -8) & (offset <= 7)
        exception = mask & ((ambiguous & ~fits) | (~ambiguous & (w_bits != cand_bits)))
        if PHASE == 0:
            tl.store(counts_ptr + 2 * tile_id, tl.sum(ambiguous.to(tl.int32), axis=0))
            tl.store(counts_ptr + 2 * tile_id + 1, tl.sum(exception.to(tl.int32), axis=0))
        else:
            slot = tl.load(amb_offsets_ptr + tile_id) + position
            code = tl.where(fits, offset + 8, 8)
            tl.atomic_or(codes_ptr + (slot >> 3), code << ((slot & 7) * 4), mask=ambiguous)
            exc_slot = tl.load(exc_offsets_ptr + tile_id) + tl.cumsum(exception.to(tl.int32), axis=0) - 1
            tl.store(exc_index_ptr + exc_slot, (row * n_cols + col).to(exc_index_ptr.dtype.element_ty), mask=exception)
            tl.store(exc_bits_ptr + exc_slot, w.to(tl.int16, bitcast=True), mask=exception)
            tl.store(pointers, new, mask=mask)


class FusedExactRecord:
    """What the fused codec keeps between perturb and restore, for one layer."""

    def __init__(self, codes, amb_offsets, exc_offsets, exc_index, exc_bits, counts):
        self.codes, self.amb_offsets, self.exc_offsets = codes, amb_offsets, exc_offsets
        self.exc_index, self.exc_bits, self.counts = exc_index, exc_bits, counts

    def nbytes(self) -> int:
        tensors = (self.codes, self.amb_offsets, self.exc_offsets, self.exc_index, self.exc_bits)
        return sum(t.numel() * t.element_size() for t in tensors)


_MANTISSA = {torch.bfloat16: 7, torch.float16: 10}


def _launch(out: torch.Tensor, rows: Optional[torch.Tensor], std: torch.Tensor, seeds: torch.Tensor, n_rows: int, n_cols: int,
            rows_per_block: int, work: torch.dtype) -> torch.Tensor:
    n_blocks = triton.cdiv(n_rows, rows_per_block)
    tiles = triton.cdiv(min(rows_per_block, n_rows) * n_cols, _BLOCK)
    source = rows if rows is not None else out
    _noise_kernel[(n_blocks, tiles)](
        out, source, std.to(torch.float32).contiguous(), seeds, n_rows, n_cols, rows_per_block, source.stride(0), source.stride(1),
        ADD=rows is not None, BLOCK=_BLOCK, WORK_FP64=work == torch.float64, enable_fp_fusion=False,
    )
    return out


class TritonNoiseKernel:
    """Same interface as :class:`flatlora_optim.noise.TorchNoiseKernel`, fused on CUDA."""

    name = "triton"

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
        m, n_cols = rows.shape
        out = torch.empty((m, n_cols), dtype=rows.dtype, device=rows.device)
        return _launch(out, rows, std_rows, seeds, m, n_cols, rows_per_block, work)

    def row_std(self, rows: torch.Tensor, A: Optional[torch.Tensor], B: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        """Per-row noise std ``scale * ||W_i + (B A)_i||`` (float32, 0 where not finite), one launch.

        ``A`` (``R x n``) and ``B`` (``m x R``, scalings folded in) are float32, or None without adapters.
        """
        m, n_cols = rows.shape
        if A is None:
            A = torch.zeros((1, n_cols), dtype=torch.float32, device=rows.device)
            B = torch.zeros((m, 1), dtype=torch.float32, device=rows.device)
        A = A.contiguous()
        B = B.contiguous()
        rank = A.shape[0]
        G = (A @ A.t()).contiguous()
        out = torch.empty(m, dtype=torch.float32, device=rows.device)
        _row_std_kernel[(m,)](
            rows, A, B, G, out, n_cols, rank, rows.stride(0), rows.stride(1), scale,
            BLOCK=256, R=max(triton.next_power_of_2(rank), 2), ACC_FP64=rows.element_size() >= 4, enable_fp_fusion=False,
        )
        return out

    @staticmethod
    def fused_exact_supported(dtype: torch.dtype) -> bool:
        return dtype in _MANTISSA

    def _exact(self, phase: int, rows: torch.Tensor, std: torch.Tensor, seeds: torch.Tensor, rows_per_block: int, record=None, counts=None):
        m, n_cols = rows.shape
        n_blocks = triton.cdiv(m, rows_per_block)
        tiles = triton.cdiv(min(rows_per_block, m) * n_cols, _BLOCK)
        dummy = std  # unused pointer arguments of a phase
        r = record
        _exact_kernel[(n_blocks, tiles)](
            rows, std, seeds,
            counts if counts is not None else dummy,
            r.amb_offsets if r is not None else dummy, r.exc_offsets if r is not None else dummy,
            r.codes if r is not None else dummy, r.exc_index if r is not None else dummy, r.exc_bits if r is not None else dummy,
            m, n_cols, rows_per_block, rows.stride(0), rows.stride(1), tiles,
            PHASE=phase, MANT=_MANTISSA[rows.dtype], BLOCK=_BLOCK, enable_fp_fusion=False,
        )
        return n_blocks * tiles

    def exact_perturb(self, rows: torch.Tensor, std_rows: torch.Tensor, seeds: torch.Tensor, rows_per_block: int) -> FusedExactRecord:
        """Write ``fl(W + e)`` into ``rows`` and return the exact-restore record (two passes, one sync)."""
        std = std_rows.to(torch.float32).contiguous()
        m, n_cols = rows.shape
        n_tiles = triton.cdiv(m, rows_per_block) * triton.cdiv(min(rows_per_block, m) * n_cols, _BLOCK)
        counts = torch.empty(2 * n_tiles, dtype=torch.int32, device=rows.device)
        self._exact(0, rows, std, seeds, rows_per_block, counts=counts)
        per_tile = counts.view(n_tiles, 2).to(torch.int64)
        ends = per_tile.cumsum(0)
        n_amb, n_exc = (int(v) for v in ends[-1].tolist())  # the one host sync per layer
        starts = (ends - per_tile).to(torch.int32)
        index_dtype = torch.int32 if m * n_cols < 2**31 else torch.int64
        record = FusedExactRecord(
            torch.zeros(n_amb // 8 + 1, dtype=torch.int32, device=rows.device),
            starts[:, 0].contiguous(), starts[:, 1].contiguous(),
            torch.empty(n_exc, dtype=index_dtype, device=rows.device), torch.empty(n_exc, dtype=torch.int16, device=rows.device),
            (n_amb, n_exc),
        )
        self._exact(1, rows, std, seeds, rows_per_block, record=record)
        return record

    def exact_restore(self, dest: torch.Tensor, std_rows: torch.Tensor, seeds: torch.Tensor, rows_per_block: int, record: FusedExactRecord) -> None:
        """Write the original bits into ``dest`` (which holds ``fl(W + e)``) from the record."""
        std = std_rows.to(torch.float32).contiguous()
        self._exact(2, dest, std, seeds, rows_per_block, record=record)
        if record.exc_index.numel():
            index = record.exc_index.long()
            n_cols = dest.shape[1]
            dest.view(torch.int16)[index // n_cols, index % n_cols] = record.exc_bits
