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

from typing import List, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from .layer_table import DTYPE_CODES, ROWS_PER_PROGRAM, TILE, LayerTable, adapter_table

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


_NF = 12  # columns of the layer table (layer_table.FIELDS)


@triton.jit
def _row_std_kernel(layers_ptr, adapters_ptr, factors_ptr, rowtile_layer_ptr, out_ptr,
                    W_CODE: tl.constexpr, AB_CODE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, ACC_FP64: tl.constexpr):
    """``sigma / sqrt(n) * ||W_i + s (B A)_i||`` for ``ROWS`` rows of one layer, many layers per launch.

    The full row ``W_i + s b_i A`` is formed tile by tile (``rank`` fused multiply-adds per
    element, never stored), squared and summed; 0 where the result is not finite. Programs whose
    layer has another weight or adapter type return at once (those get their own launch).
    """
    t = tl.program_id(0)
    layer = tl.load(rowtile_layer_ptr + t).to(tl.int64)
    info = layers_ptr + layer * _NF
    adapter = adapters_ptr + layer * 8
    if (tl.load(info + 11) != W_CODE) | (tl.load(adapter + 7) != AB_CODE):
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
    s = tl.load(factors_ptr + 2 * layer).to(tl.float32)
    scale = tl.load(factors_ptr + 2 * layer + 1)
    rows = (t - tl.load(info + 10)) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    if ACC_FP64:
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)
        low_rank = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for k in range(0, rank):
            b = tl.load(b_ptr + rows * b_row + k * b_col, mask=row_mask, other=0.0).to(tl.float32) * s
            a = tl.load(a_ptr + k * a_row + cols * a_col, mask=col_mask, other=0.0).to(tl.float32)
            low_rank += b[:, None] * a[None, :]
        if ACC_FP64:
            full = w.to(tl.float64) + low_rank.to(tl.float64)
        else:
            full = w.to(tl.float32) + low_rank
        acc += full * full
    total = tl.sum(acc, axis=1).to(tl.float64)
    std = (tl.sqrt(total) * scale).to(tl.float32)
    finite = (std == std) & (tl.abs(std) < float("inf"))
    tl.store(out_ptr + tl.load(info + 8) + rows, tl.where(finite, std, 0.0), mask=row_mask)


@triton.jit
def _exact_kernel(layers_ptr, tile_layer_ptr, std_ptr, seeds_ptr, counts_ptr, bounds_ptr, codes_ptr, exc_layer_ptr, exc_index_ptr, exc_bits_ptr,
                  PHASE: tl.constexpr, W_CODE: tl.constexpr, MANT: tl.constexpr, TILE: tl.constexpr, SUB: tl.constexpr):
    """The exact-restore codec of restore.ExactRestore, fused, for 16-bit weights, many layers per launch.

    One program handles ``TILE`` consecutive elements of one row block of one layer. PHASE 0
    counts the tile's ambiguous elements and exceptions; PHASE 1 writes ``W + e`` in place, the
    4-bit key offsets of the ambiguous elements (8 per int32 word, from the tile's prefix-sum slot
    in ``bounds``) and the exceptions (layer, layer-local flat index, original bits); PHASE 2 writes back
    every element the codes determine (the exceptions are put back by ``_exceptions_kernel``).
    """
    t = tl.program_id(0)
    layer = tl.load(tile_layer_ptr + t).to(tl.int64)
    info = layers_ptr + layer * _NF
    if tl.load(info + 11) != W_CODE:
        return
    w_ptr = _typed(tl.load(info), W_CODE)
    n_rows = tl.load(info + 1)
    n_cols = tl.load(info + 2)
    stride_row = tl.load(info + 3)
    stride_col = tl.load(info + 4)
    rows_per_block = tl.load(info + 5)
    tiles_per_block = tl.load(info + 6)
    in_layer = t - tl.load(info + 7)
    block = in_layer // tiles_per_block
    tile = in_layer % tiles_per_block
    first_row = block * rows_per_block
    block_elements = tl.minimum(rows_per_block, n_rows - first_row) * n_cols
    seed = tl.load(seeds_ptr + tl.load(info + 9) + block)
    std_base = tl.load(info + 8)
    amb_seen = tl.sum(tl.zeros((1,), dtype=tl.int32), axis=0)
    exc_seen = tl.sum(tl.zeros((1,), dtype=tl.int32), axis=0)
    if PHASE != 0:
        amb_base = tl.load(bounds_ptr + 2 * t)
        exc_base = tl.load(bounds_ptr + 2 * t + 1)
    for part in tl.static_range(TILE // SUB):
        first = tile * TILE + part * SUB
        local = first + tl.arange(0, SUB)  # row-major position inside the row block
        mask = local < block_elements
        z = _normals(seed, first // 4, SUB // 4)
        row = first_row + local // n_cols
        col = local % n_cols
        e = z * tl.load(std_ptr + std_base + row, mask=mask, other=0.0)
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
        position = amb_seen + tl.cumsum(ambiguous.to(tl.int32), axis=0) - 1
        if PHASE == 2:
            slot = amb_base + position
            word = tl.load(codes_ptr + (slot >> 3), mask=ambiguous, other=0)
            code = (word >> ((slot & 7) * 4).to(tl.int32)) & 15
            key = cand_key + tl.where(ambiguous, code - 8, 0)
            restored = (key ^ ((key >> 31) & 0x7FFF)).to(tl.int16).to(w_ptr.dtype.element_ty, bitcast=True)
            tl.store(pointers, restored, mask=mask)
        else:
            w_bits = w.to(tl.int16, bitcast=True).to(tl.int32)
            offset = (w_bits ^ ((w_bits >> 31) & 0x7FFF)) - cand_key
            fits = (offset >= -8) & (offset <= 7)
            exception = mask & ((ambiguous & ~fits) | (~ambiguous & (w_bits != cand_bits)))
            if PHASE == 1:
                slot = amb_base + position
                code = tl.where(fits, offset + 8, 8)
                tl.atomic_or(codes_ptr + (slot >> 3), code << ((slot & 7) * 4).to(tl.int32), mask=ambiguous)
                exc_slot = exc_base + exc_seen + tl.cumsum(exception.to(tl.int32), axis=0) - 1
                flat = (row * n_cols + col).to(exc_index_ptr.dtype.element_ty)
                tl.store(exc_index_ptr + exc_slot, flat, mask=exception)
                tl.store(exc_layer_ptr + exc_slot, layer.to(tl.int32), mask=exception)
                tl.store(exc_bits_ptr + exc_slot, w.to(tl.int16, bitcast=True), mask=exception)
                tl.store(pointers, new, mask=mask)
            exc_seen += tl.sum(exception.to(tl.int32), axis=0)
        amb_seen += tl.sum(ambiguous.to(tl.int32), axis=0)
    if PHASE == 0:
        tl.store(counts_ptr + 2 * t, amb_seen)
        tl.store(counts_ptr + 2 * t + 1, exc_seen)


@triton.jit
def _exceptions_kernel(layers_ptr, exc_layer_ptr, exc_index_ptr, exc_bits_ptr, first_slot, n_slots, ONE_LAYER: tl.constexpr, BLOCK: tl.constexpr):
    """Put back the original bits of exceptions ``first_slot:first_slot + n_slots`` (after PHASE 2).

    With ``ONE_LAYER`` every exception belongs to the table's only layer (a one-layer restore).
    """
    slots = first_slot + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = slots < first_slot + n_slots
    if ONE_LAYER:
        layer = tl.zeros((BLOCK,), dtype=tl.int64)
    else:
        layer = tl.load(exc_layer_ptr + slots, mask=mask, other=0).to(tl.int64)
    info = layers_ptr + layer * _NF
    w_ptr = tl.load(info, mask=mask, other=0).to(tl.pointer_type(tl.int16))
    n_cols = tl.load(info + 2, mask=mask, other=1)
    stride_row = tl.load(info + 3, mask=mask, other=0)
    stride_col = tl.load(info + 4, mask=mask, other=0)
    flat = tl.load(exc_index_ptr + slots, mask=mask, other=0).to(tl.int64)
    bits = tl.load(exc_bits_ptr + slots, mask=mask, other=0)
    tl.store(w_ptr + (flat // n_cols) * stride_row + (flat % n_cols) * stride_col, bits, mask=mask)


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


    # ----------------------------------------------------------------- grouped (many layers per launch)

    def row_stds(self, table: LayerTable, adapters: Sequence[Optional[Tuple[torch.Tensor, torch.Tensor, float]]], std_scales: Sequence[float],
                 out: torch.Tensor) -> None:
        """Write ``std_scales[l] * ||W_i + s (B A)_i||`` for every row of every layer into ``out``
        (float32, at the table's ``std_bases``); ``std_scales[l]`` is ``sigma / sqrt(n)``."""
        adapter_rows, factors, ab_codes = adapter_table(adapters, std_scales, table.device)
        for w_code in table.dtype_codes:
            for ab_code in ab_codes:
                _row_std_kernel[(table.n_rowtiles,)](
                    table.layers, adapter_rows, factors, table.rowtile_layer, out,
                    W_CODE=w_code, AB_CODE=ab_code, ROWS=ROWS_PER_PROGRAM, BLOCK_N=128, ACC_FP64=w_code in (0, 3), enable_fp_fusion=False,
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

    def _exact(self, phase: int, table: LayerTable, std: torch.Tensor, seeds: torch.Tensor, counts=None, record=None) -> None:
        dummy = std  # pointer arguments a phase does not use
        r = record
        for code in table.dtype_codes:
            dtype = next(d for d, c in DTYPE_CODES.items() if c == code)
            _exact_kernel[(table.n_tiles,)](
                table.layers, table.tile_layer, std, seeds,
                counts if counts is not None else dummy,
                r.bounds if r is not None else dummy, r.codes if r is not None else dummy,
                r.exc_layer if r is not None else dummy, r.exc_index if r is not None else dummy, r.exc_bits if r is not None else dummy,
                PHASE=phase, W_CODE=code, MANT=_MANTISSA[dtype], TILE=TILE, SUB=_BLOCK, enable_fp_fusion=False,
            )

    def exact_perturb_layers(self, table: LayerTable, std: torch.Tensor, seeds: torch.Tensor) -> ExactGroupRecord:
        """Write ``fl(W + e)`` into every layer of ``table`` and return the exact-restore record.

        Two passes over the weights (count, then write) and one host sync in between, for the whole
        group: the sync sizes the code and exception buffers exactly.
        """
        if not all(d in _MANTISSA for d in table.dtypes):
            raise ValueError("the fused exact codec takes bfloat16 and float16 weights only")
        device = table.device
        counts = torch.empty(2 * table.n_tiles, dtype=torch.int32, device=device)
        self._exact(0, table, std, seeds, counts=counts)
        bounds = torch.zeros((table.n_tiles + 1, 2), dtype=torch.int64, device=device)
        torch.cumsum(counts.view(-1, 2), dim=0, out=bounds[1:])
        del counts
        edges = torch.tensor(table.tile_bases + [table.n_tiles], dtype=torch.int64).to(device, non_blocking=True)
        layer_bounds = bounds.index_select(0, edges).tolist()  # the one host sync
        n_amb, n_exc = layer_bounds[-1]
        index_dtype = torch.int32
        record = ExactGroupRecord(
            bounds, torch.zeros(n_amb // 8 + 1, dtype=torch.int32, device=device), torch.empty(n_exc, dtype=torch.int32, device=device),
            torch.empty(n_exc, dtype=index_dtype, device=device), torch.empty(n_exc, dtype=torch.int16, device=device), layer_bounds,
        )
        self._exact(1, table, std, seeds, record=record)
        return record

    def exact_restore_layers(self, table: LayerTable, std: torch.Tensor, seeds: torch.Tensor, record: ExactGroupRecord) -> None:
        """Write the original bits back into every layer of ``table`` (which hold ``fl(W + e)``)."""
        self._exact(2, table, std, seeds, record=record)
        first, end = record.exceptions
        if end > first:
            _exceptions_kernel[(triton.cdiv(end - first, 256),)](
                table.layers, record.exc_layer, record.exc_index, record.exc_bits, first, end - first, ONE_LAYER=len(table) == 1, BLOCK=256,
            )

    def exact_restore_one(self, table: LayerTable, layer: int, dest: torch.Tensor, std: torch.Tensor, seeds: torch.Tensor,
                          record: ExactGroupRecord) -> None:
        """Undo layer ``layer`` of a group in ``dest`` (the live weight or a copy of its perturbed rows)."""
        one = LayerTable([dest], std_bases=[table.std_bases[layer]], seed_bases=[table.seed_bases[layer]])
        if one.shapes[0] != table.shapes[layer]:
            raise ValueError(f"restore destination has shape {tuple(dest.shape)}, the layer {table.shapes[layer]}")
        first = table.tile_bases[layer]
        self.exact_restore_layers(one, std, seeds, record.slice(layer, first, first + table.tiles[layer]))

    # one-layer forms (tests, and callers that handle a single weight)

    def exact_perturb(self, rows: torch.Tensor, std_rows: torch.Tensor, seeds: torch.Tensor, rows_per_block: int) -> ExactGroupRecord:
        """Write ``fl(W + e)`` into one layer's rows and return the record (``seeds[b]`` seeds row block ``b``)."""
        table = LayerTable([rows])
        assert table.layers[0, 5].item() == rows_per_block, "row blocks are rows_per_chunk(n) rows"
        return self.exact_perturb_layers(table, std_rows.to(torch.float32).contiguous(), seeds)

    def exact_restore(self, dest: torch.Tensor, std_rows: torch.Tensor, seeds: torch.Tensor, rows_per_block: int, record: ExactGroupRecord) -> None:
        """Write the original bits into ``dest`` (which holds ``fl(W + e)``) from a one-layer record."""
        self.exact_restore_layers(LayerTable([dest]), std_rows.to(torch.float32).contiguous(), seeds, record)


class ExactGroupRecord:
    """What the fused codec keeps between perturb and restore for a group of layers.

    ``bounds[t]`` holds tile ``t``'s first code slot and first exception slot (int64, one row per
    tile plus the totals); ``layer_bounds`` the same on the host at each layer's first tile (and
    the totals); ``exceptions`` the range of exception slots this record restores.
    """

    def __init__(self, bounds: torch.Tensor, codes: torch.Tensor, exc_layer: torch.Tensor, exc_index: torch.Tensor, exc_bits: torch.Tensor,
                 layer_bounds: List[List[int]], exceptions: Optional[Tuple[int, int]] = None):
        self.bounds, self.codes = bounds, codes
        self.exc_layer, self.exc_index, self.exc_bits = exc_layer, exc_index, exc_bits
        self.layer_bounds = layer_bounds
        self.exceptions = exceptions if exceptions is not None else (0, layer_bounds[-1][1])

    def slice(self, layer: int, first_tile: int, end_tile: int) -> ExactGroupRecord:
        """Layer ``layer``'s part (tiles ``first_tile:end_tile``); code and exception slots stay absolute."""
        exceptions = (self.layer_bounds[layer][1], self.layer_bounds[layer + 1][1])
        return ExactGroupRecord(self.bounds[first_tile : end_tile + 1], self.codes, self.exc_layer, self.exc_index, self.exc_bits,
                                self.layer_bounds, exceptions)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bounds, self.codes, self.exc_layer, self.exc_index, self.exc_bits))

    def layer_nbytes(self, layer: int, tiles: int) -> int:
        """Bytes attributable to one layer: its codes, exceptions and tile bounds."""
        (amb0, exc0), (amb1, exc1) = self.layer_bounds[layer], self.layer_bounds[layer + 1]
        return (amb1 - amb0 + 1) // 2 + 10 * (exc1 - exc0) + 16 * tiles
