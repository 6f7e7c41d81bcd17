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

from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from .layer_table import DTYPE_CODES, ROWS_PER_PROGRAM, TILE, LayerTable, adapter_table

__all__ = ["TritonNoiseKernel"]

_BLOCK = 2048  # elements per program of the noise kernel; a multiple of 4
_EXACT_WARPS = 16  # warps per exact-codec program: TILE / (32 * 16) = 8 elements per thread stay in registers (fastest of 4, 8, 16 on an H200)


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


_NF = tl.constexpr(12)  # columns of the layer table (layer_table.FIELDS)


@triton.jit
def _row_std_kernel(layers_ptr, adapters_ptr, factors_ptr, rowtile_layer_ptr, out_ptr,
                    W_CODE: tl.constexpr, AB_CODE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr,
                    ACC_FP64: tl.constexpr):
    """``sigma / sqrt(n) * ||W_i + s (B A)_i||`` for ``ROWS`` rows of one layer, many layers per launch.

    The full rows ``W + s B A`` are formed tile by tile (``B``'s rows are loaded once, ``s B A``
    as an exact float32 product padded to rank ``R``, never stored), squared and summed; 0 where
    the result is not finite. Programs whose layer has another weight or adapter type return at
    once (those get their own launch).
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
    r = tl.arange(0, R)
    r_mask = r < rank
    b = tl.load(b_ptr + rows[:, None] * b_row + r[None, :] * b_col, mask=row_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32) * s
    if ACC_FP64:
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        w = tl.load(w_ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        a = tl.load(a_ptr + r[:, None] * a_row + cols[None, :] * a_col, mask=r_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        low_rank = tl.dot(b, a, input_precision="ieee")
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
def _exact_kernel(layers_ptr, tile_layer_ptr, std_ptr, seeds_ptr, counters_ptr, amb_capacity, exc_capacity, bounds_ptr, bounds_stride,
                  codes_ptr, exc_layer_ptr, exc_index_ptr, exc_bits_ptr,
                  RESTORE: tl.constexpr, W_CODE: tl.constexpr, MANT: tl.constexpr, TILE: tl.constexpr):
    """The exact-restore codec of restore.ExactRestore, fused, for 16-bit weights, many layers per launch.

    One program handles ``TILE`` consecutive elements of one row block of one layer, in one pass.
    Perturb (``RESTORE`` false): form ``W + e``, find the ambiguous elements and the exceptions,
    reserve slots for them with one atomic add per buffer, then write the 4-bit key offsets (8 per
    int32 word), the exceptions (layer, layer-local flat index, original bits) and ``W + e``, and
    keep the tile's first slots in ``bounds[:, t]``. A tile whose slots would pass a buffer's
    capacity writes nothing (its weights stay clean), marks itself with -1 and voids the exception
    slots it reserved; the host sees the counters pass the capacity, undoes the rest and redoes
    the step with bigger buffers. Restore: recompute the same positions and write back every
    element the codes determine (exceptions are put back by ``_exceptions_kernel``).
    """
    t = tl.program_id(0)
    layer = tl.load(tile_layer_ptr + t).to(tl.int64)
    info = layers_ptr + layer * _NF
    if tl.load(info + 11) != W_CODE:
        return
    if RESTORE:
        amb_base = tl.load(bounds_ptr + t)
        if amb_base < 0:  # skipped at perturb time: nothing to undo
            return
    w_ptr = _typed(tl.load(info), W_CODE)
    # positions inside a row block fit in int32 (a block is at most CHUNK_BYTES / 48 elements):
    # 32-bit division is several times cheaper than 64-bit on the GPU
    n_rows = tl.load(info + 1).to(tl.int32)
    n_cols = tl.load(info + 2).to(tl.int32)
    stride_row = tl.load(info + 3)
    stride_col = tl.load(info + 4)
    rows_per_block = tl.load(info + 5).to(tl.int32)
    tiles_per_block = tl.load(info + 6).to(tl.int32)
    in_layer = (t - tl.load(info + 7)).to(tl.int32)
    block = in_layer // tiles_per_block
    tile = in_layer - block * tiles_per_block
    first_row = block * rows_per_block
    block_elements = tl.minimum(rows_per_block, n_rows - first_row) * n_cols
    seed = tl.load(seeds_ptr + tl.load(info + 9) + block)
    first = tile * TILE
    local = first + tl.arange(0, TILE)  # row-major position inside the row block (int32)
    mask = local < block_elements
    z = _normals(seed, first // 4, TILE // 4)
    row = local // n_cols  # inside the block
    col = local - row * n_cols
    e = z * tl.load(std_ptr + tl.load(info + 8) + first_row + row, mask=mask, other=0.0)
    pointers = w_ptr + first_row.to(tl.int64) * stride_row + row.to(tl.int64) * stride_row + col.to(tl.int64) * stride_col
    w = tl.load(pointers, mask=mask, other=0.0)
    if RESTORE:
        new = w
    else:
        new = (w.to(tl.float32) + e).to(w_ptr.dtype.element_ty)
    candidate = (new.to(tl.float32) - e).to(w_ptr.dtype.element_ty)
    new_bits = new.to(tl.int16, bitcast=True).to(tl.int32)
    cand_bits = candidate.to(tl.int16, bitcast=True).to(tl.int32)
    ambiguous = (((new_bits & 0x7FFF) >> MANT) > ((cand_bits & 0x7FFF) >> MANT)) & mask
    cand_key = cand_bits ^ ((cand_bits >> 31) & 0x7FFF)
    position = tl.cumsum(ambiguous.to(tl.int32), axis=0) - 1
    if RESTORE:
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
        n_amb = tl.sum(ambiguous.to(tl.int64), axis=0)
        n_exc = tl.sum(exception.to(tl.int64), axis=0)
        amb_base = tl.atomic_add(counters_ptr, n_amb)
        exc_base = tl.atomic_add(counters_ptr + 1, n_exc)
        exc_position = tl.cumsum(exception.to(tl.int32), axis=0) - 1
        if (amb_base + n_amb <= amb_capacity) & (exc_base + n_exc <= exc_capacity):
            slot = amb_base + position
            code = tl.where(fits, offset + 8, 8)
            tl.atomic_or(codes_ptr + (slot >> 3), code << ((slot & 7) * 4).to(tl.int32), mask=ambiguous)
            exc_slot = exc_base + exc_position
            flat = ((first_row + row) * n_cols + col).to(exc_index_ptr.dtype.element_ty)
            tl.store(exc_index_ptr + exc_slot, flat, mask=exception)
            tl.store(exc_layer_ptr + exc_slot, layer.to(exc_layer_ptr.dtype.element_ty), mask=exception)
            tl.store(exc_bits_ptr + exc_slot, w.to(tl.int16, bitcast=True), mask=exception)
            tl.store(pointers, new, mask=mask)
            tl.store(bounds_ptr + t, amb_base)
        else:
            void = exc_base + exc_position
            tl.store(exc_layer_ptr + void, tl.full((TILE,), -1, exc_layer_ptr.dtype.element_ty), mask=exception & (void < exc_capacity))
            tl.store(bounds_ptr + t, -1)


@triton.jit
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
        rank = max([a[0].shape[0] for a in adapters if a is not None] + [1])
        for w_code in table.dtype_codes:
            for ab_code in ab_codes:
                _row_std_kernel[(table.n_rowtiles,)](
                    table.layers, adapter_rows, factors, table.rowtile_layer, out,
                    W_CODE=w_code, AB_CODE=ab_code, ROWS=ROWS_PER_PROGRAM, BLOCK_N=64, R=max(16, triton.next_power_of_2(rank)),
                    ACC_FP64=w_code in (0, 3), enable_fp_fusion=False,
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

    def _exact(self, table: LayerTable, std: torch.Tensor, seeds: torch.Tensor, record: ExactGroupRecord, restore: bool,
               counters: Optional[torch.Tensor] = None) -> None:
        for code in table.dtype_codes:
            dtype = next(d for d, c in DTYPE_CODES.items() if c == code)
            _exact_kernel[(table.n_tiles,)](
                table.layers, table.tile_layer, std, seeds, counters if counters is not None else std, record.amb_capacity, record.exc_capacity,
                record.bounds, record.bounds.stride(0), record.codes, record.exc_layer, record.exc_index, record.exc_bits,
                RESTORE=restore, W_CODE=code, MANT=_MANTISSA[dtype], TILE=TILE, enable_fp_fusion=False, num_warps=_EXACT_WARPS,
            )

    def exact_perturb_layers(self, table: LayerTable, std: torch.Tensor, seeds: torch.Tensor) -> ExactGroupRecord:
        """Write ``fl(W + e)`` into every layer of ``table`` and return the exact-restore record.

        One pass over the weights and one host sync for the whole group (to read how many slots
        were used). The buffers are sized from the previous step's counts plus headroom (kept on
        the table); when they turn out too small, what was written is undone and the step redone.
        """
        if not all(d in _MANTISSA for d in table.dtypes):
            raise ValueError("the fused exact codec takes bfloat16 and float16 weights only")
        device = table.device
        # the first step has no counts to go by: a pass with no room counts them (every tile is
        # skipped, nothing is written), then the real pass runs with exact buffers
        amb_capacity, exc_capacity = table.codec_capacity or (0, 0)
        while True:
            counters = torch.zeros(2, dtype=torch.int64, device=device)
            record = ExactGroupRecord(
                torch.empty((1, table.n_tiles), dtype=torch.int64, device=device),
                torch.zeros(amb_capacity // 8 + 1, dtype=torch.int32, device=device),
                torch.empty(exc_capacity, dtype=torch.int16 if len(table) < 2**15 else torch.int32, device=device),
                torch.empty(exc_capacity, dtype=torch.int32, device=device),
                torch.empty(exc_capacity, dtype=torch.int16, device=device), amb_capacity, exc_capacity,
            )
            self._exact(table, std, seeds, record, restore=False, counters=counters)
            n_amb, n_exc = counters.tolist()  # the one host sync
            record.n_exceptions = min(n_exc, exc_capacity)
            if n_amb <= amb_capacity and n_exc <= exc_capacity:
                table.codec_capacity = (int(n_amb * 1.02) + 4096, int(n_exc * 1.02) + 4096)  # next step's buffers
                return record
            self.exact_restore_layers(table, std, seeds, record)  # undo the tiles that were written
            amb_capacity, exc_capacity = max(amb_capacity, int(n_amb * 1.1) + 4096), max(exc_capacity, int(n_exc * 1.1) + 4096)

    def exact_restore_layers(self, table: LayerTable, std: torch.Tensor, seeds: torch.Tensor, record: ExactGroupRecord,
                             only_layer: int = -1) -> None:
        """Write the original bits back into every layer of ``table`` (which hold ``fl(W + e)``).

        ``only_layer`` restores one layer of the record into a one-layer ``table`` (see exact_restore_one).
        """
        self._exact(table, std, seeds, record, restore=True)
        if record.n_exceptions:
            _exceptions_kernel[(triton.cdiv(record.n_exceptions, 256),)](
                table.layers, record.exc_layer, record.exc_index, record.exc_bits, record.n_exceptions, only_layer, BLOCK=256,
            )

    def exact_restore_one(self, table: LayerTable, layer: int, dest: torch.Tensor, std: torch.Tensor, seeds: torch.Tensor,
                          record: ExactGroupRecord) -> None:
        """Undo layer ``layer`` of a group in ``dest`` (the live weight or a copy of its perturbed rows)."""
        one = LayerTable([dest], std_bases=[table.std_bases[layer]], seed_bases=[table.seed_bases[layer]])
        if one.shapes[0] != table.shapes[layer]:
            raise ValueError(f"restore destination has shape {tuple(dest.shape)}, the layer {table.shapes[layer]}")
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


class ExactGroupRecord:
    """What the fused codec keeps between perturb and restore for a group of layers.

    ``bounds[0, t]`` is tile ``t``'s first code slot (-1 for a tile left unperturbed); ``codes``
    holds 8 4-bit codes per int32 word; the exception buffers hold ``n_exceptions`` used slots
    (layer, layer-local flat index, original bits; layer -1 for void slots).
    """

    def __init__(self, bounds: torch.Tensor, codes: torch.Tensor, exc_layer: torch.Tensor, exc_index: torch.Tensor, exc_bits: torch.Tensor,
                 amb_capacity: int, exc_capacity: int, n_exceptions: int = 0):
        self.bounds, self.codes = bounds, codes
        self.exc_layer, self.exc_index, self.exc_bits = exc_layer, exc_index, exc_bits
        self.amb_capacity, self.exc_capacity = amb_capacity, exc_capacity
        self.n_exceptions = n_exceptions

    def slice(self, first_tile: int, end_tile: int) -> ExactGroupRecord:
        """The part for tiles ``first_tile:end_tile`` (code and exception slots stay absolute)."""
        return ExactGroupRecord(self.bounds[:, first_tile:end_tile], self.codes, self.exc_layer, self.exc_index, self.exc_bits,
                                self.amb_capacity, self.exc_capacity, self.n_exceptions)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bounds, self.codes, self.exc_layer, self.exc_index, self.exc_bits))

    def layer_nbytes(self, tiles: int) -> int:
        """A layer's share of the record: the bytes in proportion to its tiles (slots are not kept per layer)."""
        return self.nbytes() * tiles // self.bounds.shape[1]
