"""The paper's filter-wise noise: per-row scales, seeding and chunked generation.

For a target weight ``W`` (``m x n``, rows = output units, ``n`` = fan-in) with active adapters
``(A_a, B_a, s_a)``, Flat-LoRA draws

.. math::
    \\epsilon_{ij} \\sim \\mathcal{N}\\!\\left(0, \\frac{\\sigma_t^2}{n} \\, \\lVert W_i + \\textstyle\\sum_a s_a (B_a A_a)_i \\rVert^2\\right)

so each row's noise std is ``sigma_t`` times the RMS of that row of the full weight ``W' = W + sBA``.

The row norms come from the expansion
``||W_i + b_i A||^2 = ||W_i||^2 + 2 b_i (A W_i^T) + b_i (A A^T) b_i^T`` (``b_i`` = row ``i`` of
the stacked ``[s_1 B_1, ..., s_k B_k]``, ``A`` = the stacked ``[A_1; ...; A_k]``), which needs
``O(m r + r^2 n)`` extra memory instead of an ``m x n`` copy of ``W + sBA``.

Noise is generated in blocks of rows so that temporaries stay bounded (about 64 MiB), from a
private ``torch.Generator`` per device re-seeded for every ``(seed, step, layer, block)``: the
global CPU and CUDA RNGs are never used, any block can be regenerated alone (which is how
restore works), and the same seed gives the same noise.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .sharding import full, local
from .targets import Adapter

__all__ = [
    "CHUNK_BYTES",
    "rows_per_chunk",
    "chunk_bounds",
    "layer_key",
    "noise_seed",
    "noise_seeds",
    "GeneratorPool",
    "row_norms",
    "row_std",
    "TorchNoiseKernel",
    "kernel_for",
    "add_noise",
]

CHUNK_BYTES = 64 * 2**20
"""Budget for the temporaries of one block of rows (noise, candidates, codes)."""

TEMP_BYTES_PER_ELEMENT = 48
"""Upper bound on the bytes of temporaries per weight element while a block is perturbed or
restored (noise 8, work copy 8, perturbed and candidate values 8, integer keys 16, masks 3, and
slack); ``tests/test_memory.py`` checks the bound with the profiler."""


def rows_per_chunk(n_cols: int) -> int:
    """Rows per block: depends only on the fan-in, so the noise does not depend on the device."""
    return max(1, CHUNK_BYTES // (TEMP_BYTES_PER_ELEMENT * max(1, n_cols)))


def chunk_bounds(n_rows: int, n_cols: int) -> Iterator[Tuple[int, int, int]]:
    """Yield ``(block_index, first_row, end_row)`` covering ``n_rows`` rows."""
    step = rows_per_chunk(n_cols)
    for index, start in enumerate(range(0, n_rows, step)):
        yield index, start, min(n_rows, start + step)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=4096)
def layer_key(name: str) -> int:
    """A stable 64-bit key for a layer name (Python's ``hash`` is salted per process); cached, as
    the same names come back every step."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def noise_seed(seed: int, step: int, layer: int, block: int) -> int:
    """Mix ``(seed, step, layer, block)`` into one 63-bit generator seed."""
    x = 0
    for part in (seed, step, layer, block):
        x = _splitmix64(x ^ (part & _MASK64))
    return x >> 1


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def noise_seeds(seed: int, step: int, layers: Sequence[int], blocks: Sequence[int]) -> np.ndarray:
    """``noise_seed(seed, step, layers[l], b)`` for every layer ``l`` and block ``b < blocks[l]``, in
    that order, as int64: the same numbers, computed for a whole step at once (numpy, wrapping
    uint64 arithmetic) instead of one Python call per block."""
    prefix = _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))
    with np.errstate(over="ignore"):
        per_layer = _splitmix64_array(np.uint64(prefix) ^ np.array([k & _MASK64 for k in layers], dtype=np.uint64))
        counts = np.asarray(blocks, dtype=np.int64)
        block_index = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        mixed = _splitmix64_array(np.repeat(per_layer, counts) ^ block_index.astype(np.uint64))
    return (mixed >> np.uint64(1)).astype(np.int64)


class GeneratorPool:
    """One private ``torch.Generator`` per device, created on first use."""

    def __init__(self) -> None:
        self._generators: Dict[torch.device, torch.Generator] = {}

    def seeded(self, device: torch.device, seed: int) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            self._generators[device] = generator
        generator.manual_seed(seed)
        return generator


def _stack_adapters(adapters: List[Adapter], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with the scalings folded into ``B``: ``sum_a s_a B_a A_a = B @ A``, in fp32."""
    # Under FSDP2 A (r x n) is gathered whole (small) and B (m x r) is this rank's rows, like W's.
    if len(adapters) == 1:  # the common case: no concatenation
        a = adapters[0]
        return full(a.A).detach().to(device=device, dtype=torch.float32), local(a.B.detach()).to(device=device, dtype=torch.float32) * a.scaling
    A = torch.cat([full(a.A).detach().to(device=device, dtype=torch.float32) for a in adapters], dim=0)
    B = torch.cat([local(a.B.detach()).to(device=device, dtype=torch.float32) * a.scaling for a in adapters], dim=1)
    return A, B


def _block_squares(block: torch.Tensor, A: Optional[torch.Tensor], B: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(||W_i||^2 + 2 b_i (A W_i^T), ||W_i||^2)`` for the rows of one block, as float64 (``B``: the block's rows)."""
    squares = torch.linalg.vector_norm(block, dim=1, dtype=torch.float64).square()
    if A is None:
        return squares, squares
    projected = block.to(torch.float32) @ A.t()  # (rows x r): A W_i^T for each row
    return squares + 2.0 * (projected * B).sum(dim=1, dtype=torch.float64), squares


_CANCELLATION = 1e-2
"""A row whose ``||W_i + s B_i A||^2`` comes out below this fraction of ``||W_i||^2 + ||s B_i A||^2`` (the adapter
nearly cancels the row) is formed and summed explicitly in float64: the expansion's float32 products would leave
it with a relative error of about ``1e-7`` over that fraction (40% and more at 1e-6 of the row's norm)."""


@torch.no_grad()
def row_norms(rows: torch.Tensor, adapters: List[Adapter]) -> torch.Tensor:
    """``||W_i + sum_a s_a (B_a A_a)_i||`` for every row ``i`` of ``rows`` (``m x n``), as float64.

    ``||W_i||^2`` is accumulated in float64 (no overflow for any float32 weight); the adapter
    terms use float32 matrix products over row blocks, never an ``m x n`` temporary. A layer of
    one block (most layers) is computed without the per-block output buffer.
    """
    m, n = rows.shape
    A, B = _stack_adapters(adapters, rows.device) if adapters else (None, None)
    bounds = list(chunk_bounds(m, n))
    if len(bounds) == 1:
        total, squares = _block_squares(rows, A, B)
    else:
        total = torch.empty(m, dtype=torch.float64, device=rows.device)
        squares = torch.empty(m, dtype=torch.float64, device=rows.device)
        for _, start, end in bounds:
            total[start:end], squares[start:end] = _block_squares(rows[start:end], A, None if B is None else B[start:end])
    if A is not None:
        quadratic = ((B @ (A @ A.t())) * B).sum(dim=1, dtype=torch.float64)
        total += quadratic
        cancelled = total < _CANCELLATION * (squares + quadratic)
        if bool(cancelled.any()):  # rare: form those rows of W + sBA and sum them exactly
            cancelled = cancelled.nonzero().flatten()
            explicit = rows[cancelled].to(torch.float64) + B[cancelled].to(torch.float64) @ A.to(torch.float64)
            total[cancelled] = torch.linalg.vector_norm(explicit, dim=1).square()
    return total.clamp_(min=0.0).sqrt_()


def row_std(rows: torch.Tensor, adapters: List[Adapter], sigma: float) -> torch.Tensor:
    """Per-row noise std ``sigma / sqrt(n) * ||W'_i||`` as float32; 0 where it is not finite.

    A row whose norm overflows or holds inf/NaN has no meaningful scale: it is left unperturbed.
    On CUDA with Triton the whole computation is one kernel per layer.
    """
    n = rows.shape[1]
    kernel = kernel_for(rows.device)
    if hasattr(kernel, "row_std"):
        A, B = _stack_adapters(adapters, rows.device) if adapters else (None, None)
        return kernel.row_std(rows, A, B, sigma / n**0.5)
    std = (row_norms(rows, adapters) * (sigma / n**0.5)).to(torch.float32)
    return torch.nan_to_num_(std, nan=0.0, posinf=0.0, neginf=0.0)


class TorchNoiseKernel:
    """Noise and perturbed values with plain torch ops (CPU, and GPUs without Triton).

    The draw is ``z ~ N(0, 1)`` in float32 from a generator seeded for the block; the noise is
    ``e = z * std_i`` computed in the *work* dtype (float32 for 16-bit weights, float64 for
    float32/float64 weights), and the perturbed weight is ``fl(W + e)`` rounded once to the
    weight's dtype. Both modes (in-place and virtual) form ``W + e`` through :meth:`perturbed`,
    so they see the same values.
    """

    name = "torch"

    def __init__(self) -> None:
        self.generators = GeneratorPool()

    def noise(self, std_rows: torch.Tensor, n_cols: int, seed: int, work: torch.dtype) -> torch.Tensor:
        """``e`` for one block: ``len(std_rows) x n_cols`` in the work dtype."""
        generator = self.generators.seeded(std_rows.device, seed)
        z = torch.randn((std_rows.shape[0], n_cols), generator=generator, device=std_rows.device, dtype=torch.float32)
        return z.to(work).mul_(std_rows.to(work)[:, None])

    def perturbed(self, block: torch.Tensor, std_rows: torch.Tensor, seed: int, work: torch.dtype, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``fl(W + e)`` for one block, as a new tensor of the weight's dtype."""
        if noise is None:  # the noise is ours: form the sum in its buffer (one pass and one allocation less)
            return self.noise(std_rows, block.shape[1], seed, work).add_(block).to(block.dtype)
        return add_noise(block, noise)


class ShardNoiseKernel:
    """The fused GPU kernel's noise, added with torch ops: for FSDP2 shards on CUDA.

    A shard may begin or end inside a global row block, and the fused kernels only form ``W + e``
    for whole blocks; a shard therefore draws each block it touches whole and keeps its rows (see
    :mod:`flatlora_optim.sharding`). Drawing with the fused kernel keeps the noise of a row what a
    single GPU process draws for it, whatever the number of ranks. The sum is rounded as the fused
    kernel rounds it (once, from the work dtype), so the values are the same too.
    """

    name = "triton-shard"
    takes_device_seeds = True

    def __init__(self, fused: Any) -> None:
        self.fused = fused

    def noise(self, std_rows: torch.Tensor, n_cols: int, seed: Any, work: torch.dtype) -> torch.Tensor:
        return self.fused.noise(std_rows, n_cols, seed, work)

    def perturbed(self, block: torch.Tensor, std_rows: torch.Tensor, seed: Any, work: torch.dtype, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        return add_noise(block, self.noise(std_rows, block.shape[1], seed, work) if noise is None else noise)


def add_noise(block: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``fl(W + e)``: the sum in the noise's (work) dtype, rounded once to the weight's dtype."""
    return (block.to(noise.dtype) + noise).to(block.dtype)


_KERNELS: Dict[str, object] = {}


def kernel_for(device: torch.device) -> TorchNoiseKernel:
    """The fastest available noise kernel for ``device``: Triton on CUDA when installed, else torch.

    ``FLATLORA_NOISE_KERNEL=torch`` forces the torch kernel (for comparisons). The kernels draw
    different streams, so a seed reproduces a run with the same kernel and device type.
    """
    if device.type == "cuda" and os.environ.get("FLATLORA_NOISE_KERNEL", "auto") != "torch":
        if "triton" not in _KERNELS:
            try:
                from .kernels.triton_noise import TritonNoiseKernel

                _KERNELS["triton"] = TritonNoiseKernel()
            except ImportError:
                _KERNELS["triton"] = None
        if _KERNELS["triton"] is not None:
            return _KERNELS["triton"]  # type: ignore[return-value]
    if "torch" not in _KERNELS:
        _KERNELS["torch"] = TorchNoiseKernel()
    return _KERNELS["torch"]  # type: ignore[return-value]
