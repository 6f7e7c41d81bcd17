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
