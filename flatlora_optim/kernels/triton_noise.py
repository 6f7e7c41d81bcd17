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
def _row_sumsq_kernel(w_ptr, out_ptr, n_cols, stride_row, stride_col, BLOCK: tl.constexpr, ACC_FP64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if ACC_FP64:
        acc = tl.zeros((BLOCK,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + row * stride_row + cols * stride_col, mask=cols < n_cols, other=0.0)
        if ACC_FP64:
            w = w.to(tl.float64)
        else:
            w = w.to(tl.float32)
        acc += w * w
    tl.store(out_ptr + row, tl.sum(acc, axis=0).to(tl.float64))


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


def _launch(out: torch.Tensor, rows: Optional[torch.Tensor], std: torch.Tensor, seeds: torch.Tensor, n_rows: int, n_cols: int,
            rows_per_block: int, work: torch.dtype) -> torch.Tensor:
    n_blocks = triton.cdiv(n_rows, rows_per_block)
    tiles = triton.cdiv(min(rows_per_block, n_rows) * n_cols, _BLOCK)
    source = rows if rows is not None else out
    _noise_kernel[(n_blocks, tiles)](
        out, source, std.to(torch.float32).contiguous(), seeds, n_rows, n_cols, rows_per_block, source.stride(0), source.stride(1),
        ADD=rows is not None, BLOCK=_BLOCK, WORK_FP64=work == torch.float64,
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
            BLOCK=256, R=max(triton.next_power_of_2(rank), 2), ACC_FP64=rows.element_size() >= 4,
        )
        return out

    def row_sumsq(self, rows: torch.Tensor) -> torch.Tensor:
        """``||W_i||^2`` per row as float64, accumulated in float32 (16-bit weights) or float64."""
        m, n_cols = rows.shape
        out = torch.empty(m, dtype=torch.float64, device=rows.device)
        _row_sumsq_kernel[(m,)](rows, out, n_cols, rows.stride(0), rows.stride(1), BLOCK=1024, ACC_FP64=rows.element_size() >= 4)
        return out
