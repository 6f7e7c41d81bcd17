"""Triton kernels for the noise on CUDA: one pass draws ``z``, scales it per row and adds it to ``W``.

The torch kernel draws the block's noise with ``torch.randn`` into a temporary, multiplies by the
row stds and adds it to the weights: three passes over a block plus a generator re-seed. Here
``z`` comes from Philox inside the kernel (``tl.randn(seed, offset)``, the offset being the element's
position in the row block), so forming ``fl(W + e)`` reads ``W`` once and writes the result once,
and the noise is regenerated from ``(seed, offset)`` alone, with no generator state to carry.

The Triton stream differs from ``torch.randn``'s: on CUDA a seed reproduces a run with this kernel
(``FLATLORA_NOISE_KERNEL=torch`` selects the torch kernel instead).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["TritonNoiseKernel"]

_BLOCK = 1024


@triton.jit
def _noise_kernel(out_ptr, std_ptr, seed, n_cols, n_elements, BLOCK: tl.constexpr, WORK_FP64: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    z = tl.randn(seed, offsets)
    std = tl.load(std_ptr + offsets // n_cols, mask=mask, other=0.0)
    if WORK_FP64:
        e = z.to(tl.float64) * std.to(tl.float64)
    else:
        e = z * std
    tl.store(out_ptr + offsets, e, mask=mask)


@triton.jit
def _perturbed_kernel(w_ptr, out_ptr, std_ptr, seed, n_cols, stride_row, stride_col, n_elements, BLOCK: tl.constexpr, WORK_FP64: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    row = offsets // n_cols
    col = offsets - row * n_cols
    w = tl.load(w_ptr + row * stride_row + col * stride_col, mask=mask, other=0.0)
    z = tl.randn(seed, offsets)
    std = tl.load(std_ptr + row, mask=mask, other=0.0)
    if WORK_FP64:
        e = z.to(tl.float64) * std.to(tl.float64)
        value = w.to(tl.float64) + e
    else:
        e = z * std
        value = w.to(tl.float32) + e
    tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_kernel(w_ptr, out_ptr, std_ptr, seeds_ptr, n_cols, rows_per_block, stride_row, stride_col, n_elements,
                  BLOCK: tl.constexpr, WORK_FP64: tl.constexpr):
    # The whole layer in one launch: element (row, col) takes the seed of its row block and the
    # offset it has inside that block, so it gets exactly the value the per-block kernel gives.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    row = offsets // n_cols
    col = offsets - row * n_cols
    block = row // rows_per_block
    seed = tl.load(seeds_ptr + block, mask=mask, other=0)
    local = ((row - block * rows_per_block) * n_cols + col).to(tl.int32)
    w = tl.load(w_ptr + row * stride_row + col * stride_col, mask=mask, other=0.0)
    z = tl.randn(seed, local)
    std = tl.load(std_ptr + row, mask=mask, other=0.0)
    if WORK_FP64:
        value = w.to(tl.float64) + z.to(tl.float64) * std.to(tl.float64)
    else:
        value = w.to(tl.float32) + z * std
    tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty), mask=mask)


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


class TritonNoiseKernel:
    """Same interface as :class:`flatlora_optim.noise.TorchNoiseKernel`, fused on CUDA."""

    name = "triton"

    def noise(self, std_rows: torch.Tensor, n_cols: int, seed: int, work: torch.dtype) -> torch.Tensor:
        rows = std_rows.shape[0]
        out = torch.empty((rows, n_cols), dtype=work, device=std_rows.device)
        n = rows * n_cols
        std = std_rows.to(torch.float32).contiguous()
        _noise_kernel[(triton.cdiv(n, _BLOCK),)](out, std, seed, n_cols, n, BLOCK=_BLOCK, WORK_FP64=work == torch.float64)
        return out

    def perturbed(self, block: torch.Tensor, std_rows: torch.Tensor, seed: int, work: torch.dtype, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        # ``noise`` is ignored: the fused kernel regenerates it, so every mode gets the same W + e.
        rows, n_cols = block.shape
        out = torch.empty((rows, n_cols), dtype=block.dtype, device=block.device)
        n = rows * n_cols
        std = std_rows.to(torch.float32).contiguous()
        _perturbed_kernel[(triton.cdiv(n, _BLOCK),)](
            block, out, std, seed, n_cols, block.stride(0), block.stride(1), n, BLOCK=_BLOCK, WORK_FP64=work == torch.float64
        )
        return out

    def perturbed_layer(self, rows: torch.Tensor, std_rows: torch.Tensor, seeds: torch.Tensor, rows_per_block: int, work: torch.dtype) -> torch.Tensor:
        """``fl(W + e)`` for a whole ``m x n`` layer in one launch (``seeds[b]`` seeds row block ``b``)."""
        m, n_cols = rows.shape
        out = torch.empty((m, n_cols), dtype=rows.dtype, device=rows.device)
        n = m * n_cols
        std = std_rows.to(torch.float32).contiguous()
        _layer_kernel[(triton.cdiv(n, _BLOCK),)](
            rows, out, std, seeds, n_cols, rows_per_block, rows.stride(0), rows.stride(1), n, BLOCK=_BLOCK, WORK_FP64=work == torch.float64
        )
        return out

    def row_sumsq(self, rows: torch.Tensor) -> torch.Tensor:
        """``||W_i||^2`` per row as float64, accumulated in float32 (16-bit weights) or float64."""
        m, n_cols = rows.shape
        out = torch.empty(m, dtype=torch.float64, device=rows.device)
        _row_sumsq_kernel[(m,)](rows, out, n_cols, rows.stride(0), rows.stride(1), BLOCK=1024, ACC_FP64=rows.element_size() >= 4)
        return out
