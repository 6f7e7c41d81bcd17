"""Tables that let one GPU kernel launch work on many layers at once.

Launching a kernel per layer costs tens of microseconds of host time each; a Llama of 16 blocks
has 112 target layers, so per-layer launches (several per layer) cost more than the GPU work
itself. The grouped kernels instead read each layer's pointer, shape and strides from a small
device table and find their layer from a per-program index, so a whole step is a few launches.

This module only builds the tables (plain torch, no Triton): :class:`LayerTable` describes a list
of ``m x n`` row views -- where each layer's row stds and block seeds live in the step's shared
buffers, and how its rows split into the exact codec's tiles -- and :class:`AdapterTables` the
adapters acting on each layer at this step.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch

from ..noise import rows_per_chunk

__all__ = ["TILE_ROWS", "TILE_COLS", "TRANSPOSED_TILE", "TRANSPOSED_TILES", "transposed_tiles", "tile_shape", "is_transposed_view",
           "ROWS_PER_PROGRAM", "DTYPE_CODES", "LayerTable", "AdapterTables", "adapter_rows", "FIELDS"]

TILE_ROWS = 4
TILE_COLS = 512
"""One program of the exact codec handles a ``TILE_ROWS x TILE_COLS`` tile of one row block, in one
pass. Column tiles of 512 divide the fan-ins of common models (2048, 4096, 5632, 14336), so few
lanes idle; whole rows of 1 KiB (bf16) keep the loads wide. 2048 elements per tile: on an H200,
8 x 512 tiles ran 25% slower (one program per multiprocessor, latency-bound) and 2 x 512 tiles
grew the record (one bound and part-filled words per tile) from 1.73% to 1.93% of the weights."""

TRANSPOSED_TILE = (256, 8)
"""The codec's tile (rows x columns, 2048 elements) for rows that are the columns of a contiguous matrix (a
transposed view: GPT-2's Conv1D weights, peft's ``fan_in_fan_out``). The kernel moves its transpose, 8 lines of
256 neighbours in memory (512 bytes of bf16 each), as the storage holds them, and turns it in registers. On an H200
(277 M bf16 elements) 256 x 8 beat 128 x 16 and 64 x 32 (perturb pass 4.8, 5.1, 5.5 ms with 4 warps and no register
limit); the row-major tiles of other layouts took 10.8 ms there."""


TRANSPOSED_TILES = os.environ.get("FLATLORA_TRANSPOSED_TILES", "1").strip().lower() not in ("0", "false", "off", "no")
"""Whether transposed views take the exact codec's transposed tiles (codec variant bit 2; about 5x faster passes for
them on an H200). On by default; ``FLATLORA_TRANSPOSED_TILES=0`` (or ``false``, ``off``, ``no``) when the package is
imported turns them off (the row-major tiles of every other layout then read such rows at the stride of a whole row).
Tables keep the setting they were built with. The GPU suite has run with them on and off
(``FLATLORA_TRANSPOSED_TILES=0 pytest tests/test_gpu.py`` runs every GPU test with the codec's tiles off). The switch
is the codec's only: virtual mode's noise kernel reads transposed views in turned tiles of its own either way."""


@contextmanager
def transposed_tiles(on: bool = True) -> Iterator[None]:
    """:data:`TRANSPOSED_TILES` set to ``on`` inside the block (tests and benchmarks); tables built inside keep it."""
    global TRANSPOSED_TILES
    saved, TRANSPOSED_TILES = TRANSPOSED_TILES, on
    try:
        yield
    finally:
        TRANSPOSED_TILES = saved


def tile_shape(variant: int) -> Tuple[int, int]:
    """The codec's tile for a layer of codec variant ``variant`` (see :func:`codec_variant`)."""
    return TRANSPOSED_TILE if variant & 4 else (TILE_ROWS, TILE_COLS)


ROWS_PER_PROGRAM = 64
"""Rows handled by one program of the row-std kernel (a multiple of 16). Its tensor-core form reads ``A`` once per 64 rows:
on an H200 (benchmarks/noise_time.py) 0.85 ms for the 1 B Llama's stds, 1.36 with 32 rows, 2.39 with 16."""

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
"""How a kernel is told which float type a table's pointer points to."""

FIELDS = ("ptr", "rows", "cols", "stride_row", "stride_col", "rows_per_block", "tiles_per_block", "tile_base", "std_base", "seed_base",
          "rowtile_base", "dtype", "col_tiles", "variant", "first_row")
"""Columns of the layer table, in order (all int64). ``variant`` says which compiled form of the
codec handles the layer (see :func:`codec_variant`). ``first_row`` is for a view that starts inside
a row block (an FSDP2 shard): the kernels see the view from the start of that block (``ptr``,
``rows`` and ``std_base`` count ``first_row`` rows more) and mask those rows off, so the noise of
every row is the one its global block draws."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class LayerTable:
    """The static description of ``m x n`` row views for the grouped kernels.

    ``std_bases``/``seed_bases`` say where each layer's row stds and first block seed sit in the
    step's shared buffers; by default layers are packed one after the other. A table is valid as
    long as the views keep their storage, shape and strides (:attr:`key` captures those).
    """

    def __init__(self, rows: Sequence[torch.Tensor], std_bases: Optional[Sequence[int]] = None, seed_bases: Optional[Sequence[int]] = None,
                 row_ranges: Optional[Sequence[Tuple[int, int]]] = None, turned: Optional[bool] = None):
        """``turned``: whether transposed views take the transposed tiles (:func:`codec_variant`; by default
        :data:`TRANSPOSED_TILES`)."""
        if not rows:
            raise ValueError("LayerTable needs at least one layer")
        self.device = rows[0].device
        self.row_ranges = [(0, int(r.shape[0])) for r in rows] if row_ranges is None else [(int(a), int(b)) for a, b in row_ranges]
        self.shapes: List[Tuple[int, int]] = [(int(r.shape[0]), int(r.shape[1])) for r in rows]
        self.dtypes = [r.dtype for r in rows]
        self.blocks: List[int] = []  # seeds per layer: the global row blocks (the noise's seeding unit)
        self.tiles: List[int] = []  # exact-codec tiles per layer
        self.tile_bases: List[int] = []
        self.std_bases: List[int] = []
        self.seed_bases: List[int] = []
        self.first_rows: List[int] = []  # rows of the first block held elsewhere (FSDP2), masked off
        self.layer_variants: List[int] = []  # each layer's codec variant (see codec_variant), which sets its tiles
        entries = []
        tile_count, rowtile_layer = 0, []
        std_next = seed_next = 0
        for index, r in enumerate(rows):
            m, n = self.shapes[index]
            first, global_rows = self.row_ranges[index]
            per_block = rows_per_chunk(n)
            skip = first % per_block  # rows of the first block held elsewhere (FSDP2), masked off
            seen_rows = m + skip
            self.first_rows.append(skip)
            view_blocks = _cdiv(seen_rows, per_block)
            variant = codec_variant(r, turned)
            self.layer_variants.append(variant)
            tile_rows, tile_cols = tile_shape(variant)
            col_tiles = _cdiv(n, tile_cols)
            tiles_per_block = _cdiv(min(per_block, seen_rows), tile_rows) * col_tiles
            std_base = std_next if std_bases is None else std_bases[index]
            seed_base = seed_next if seed_bases is None else seed_bases[index]
            n_seeds = _cdiv(global_rows, per_block)
            std_next, seed_next = std_next + m, seed_next + n_seeds
            self.blocks.append(n_seeds)
            self.tiles.append(view_blocks * tiles_per_block)
            self.tile_bases.append(tile_count)
            self.std_bases.append(std_base)
            self.seed_bases.append(seed_base)
            entries.append([r.data_ptr() - skip * r.stride(0) * r.element_size(), seen_rows, n, r.stride(0), r.stride(1), per_block,
                            tiles_per_block, tile_count, std_base - skip, seed_base + first // per_block, len(rowtile_layer),
                            DTYPE_CODES[r.dtype], col_tiles, variant, skip])
            tile_count += view_blocks * tiles_per_block
            rowtile_layer.extend([index] * _cdiv(seen_rows, ROWS_PER_PROGRAM))
        self.n_tiles = tile_count
        self.n_rowtiles = len(rowtile_layer)
        self.total_rows = std_next
        self.total_blocks = seed_next
        self.layers = to_device(torch.tensor(entries, dtype=torch.int64), self.device)
        self._index_type = torch.int16 if len(rows) < 2**15 else torch.int32
        self._tile_layer: Optional[torch.Tensor] = None
        self.rowtile_layer = to_device(torch.tensor(rowtile_layer, dtype=self._index_type), self.device)
        self.dtype_codes = sorted({DTYPE_CODES[d] for d in self.dtypes})
        self.variants = sorted(set(self.layer_variants))
        self.codec_capacity: Optional[Tuple[int, int]] = None  # the exact codec's buffer sizes for the next step
        self.codec_sigma: Optional[float] = None  # the noise level those sizes were counted at
        self.codec_pending: Any = None  # the counts of a pass the host did not wait for (triton_noise.PendingCounts)
        self.adapter_tables = AdapterTables(self)  # the row-std kernels' adapter tables, kept while unchanged

    @property
    def tile_layer(self) -> torch.Tensor:
        """Each codec tile's layer index (built on first use: only the codec needs it, and it has
        one entry per 2048 elements)."""
        if self._tile_layer is None:
            counts = torch.tensor(self.tiles, dtype=torch.int64)
            self._tile_layer = to_device(torch.repeat_interleave(torch.arange(len(self), dtype=self._index_type), counts), self.device)
        return self._tile_layer

    def __len__(self) -> int:
        return len(self.shapes)

    def nbytes(self) -> int:
        tables = (self.layers, self.rowtile_layer) + (() if self._tile_layer is None else (self._tile_layer,))
        return sum(t.numel() * t.element_size() for t in tables)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to ``device`` without making the host wait for the device.

    A copy from pageable host memory first waits for the stream to drain (CUDA's rule), so each step's
    small uploads (seeds, adapter tables) would stop the host from running ahead of the device. Staged
    in pinned memory from PyTorch's caching host allocator (which keeps the block until the copy has
    run), the copy is queued and the call returns at once.
    """
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def is_transposed_view(rows: torch.Tensor) -> bool:
    """Whether ``rows`` (``m x n``, ``m > 1``) are the columns of a matrix: its rows are neighbours in memory
    (``stride(0) == 1``) and its columns are not. The kernels move such views in tiles laid out for them."""
    return rows.shape[0] > 1 and rows.stride(0) == 1 and rows.stride(1) != 1


def codec_variant(rows: torch.Tensor, turned: Optional[bool] = None) -> int:
    """Which compiled form of the codec suits a view: bit 0 -- the fan-in is a multiple of 8 (each
    row's noise starts at a fresh Philox counter, so a tile draws eight normals per evaluation);
    bit 1 -- rows are contiguous, 16-byte aligned and a whole number of 16-byte vectors long (the
    loads and stores can be vectorised); bit 2 -- the rows are a matrix's columns (a transposed view,
    each column contiguous: the codec moves its tiles transposed, :data:`TRANSPOSED_TILE`), when ``turned``
    (by default :data:`TRANSPOSED_TILES`)."""
    n = rows.shape[1]
    size = rows.element_size()
    if (TRANSPOSED_TILES if turned is None else turned) and is_transposed_view(rows):
        return int(n % 8 == 0) | 4
    aligned = rows.stride(1) == 1 and rows.data_ptr() % 16 == 0 and (rows.stride(0) * size) % 16 == 0 and (n * size) % 16 == 0
    return int(n % 8 == 0) | (2 * int(aligned))


def table_key(rows: Sequence[torch.Tensor]) -> Tuple:
    """What a :class:`LayerTable` depends on: every view's storage address, shape, strides and type."""
    return tuple((r.data_ptr(), tuple(r.shape), r.stride(), r.dtype) for r in rows)


def adapter_rows(adapters: Sequence[Optional[Tuple[torch.Tensor, torch.Tensor, float]]], std_scales: Sequence[float],
                 first_rows: Optional[Sequence[int]] = None) -> Tuple[List[List[int]], List[List[float]], List[int]]:
    """This step's adapters, one ``(A, B, scaling)`` or None per layer, as the two tables of the row-std kernels (host
    lists; :class:`AdapterTables` puts them on the device), and the adapter dtype codes present.

    The first table has a row of 8 int64 per layer (A's address and strides, B's address and strides, rank, dtype
    code); the second a row of 2 float64 (the adapter scaling, and the factor ``sigma / sqrt(n)`` that turns a row
    norm into a noise std). ``A`` is ``r x n`` and ``B`` ``m x r``, both of one float type; the tensors must stay
    alive until the kernels that read the table have run. ``first_rows`` are the layer table's (a shard's ``B``
    holds its own rows only: its address is moved back the same way).
    """
    rows, factors, codes = [], [], set()
    for index, (adapter, std_scale) in enumerate(zip(adapters, std_scales)):
        if adapter is None:
            rows.append([0, 0, 0, 0, 0, 0, 0, -1])
            factors.append([0.0, std_scale])
            continue
        A, B, scaling = adapter
        if B.dtype != A.dtype:
            raise ValueError(f"adapter_rows: A and B must share a dtype, got {A.dtype} and {B.dtype}")
        code = DTYPE_CODES[A.dtype]
        codes.add(code)
        b_ptr = B.data_ptr() - (first_rows[index] if first_rows else 0) * B.stride(0) * B.element_size()
        rows.append([A.data_ptr(), A.stride(0), A.stride(1), b_ptr, B.stride(0), B.stride(1), A.shape[0], code])
        factors.append([float(scaling), std_scale])
    present = sorted(codes) or [0]
    for row in rows:  # a layer without adapters is done by the first launch
        if row[7] < 0:
            row[7] = present[0]
    return rows, factors, present


def _upload(values: List[List[Any]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=dtype), device)


class AdapterTables:
    """:func:`adapter_rows` on the device for one :class:`LayerTable`, each table kept while its values stay the same.

    The adapters of a training run keep their storage from step to step, so the address table is usually the
    last step's, and the factors too under a constant noise level: comparing the host lists costs a fraction of
    building a tensor from them and uploading it (two uploads per step otherwise). The tables hold values, not
    references, so a kept table is right whenever its values are equal, whatever tensors they came from.
    """

    def __init__(self, table: LayerTable):
        self.device, self.first_rows = table.device, table.first_rows
        self._rows: Optional[Tuple[List[List[int]], torch.Tensor]] = None
        self._factors: Optional[Tuple[List[List[float]], torch.Tensor]] = None
        self._last: Optional[Tuple[Sequence[Any], List[float], List[int]]] = None  # the adapters list last given, as is

    def __call__(self, adapters: Sequence[Optional[Tuple[torch.Tensor, torch.Tensor, float]]],
                 std_scales: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        """The two tables for ``adapters``. The very list given last time (a step that kept the last step's reads,
        :class:`~flatlora_optim.steady.SteadyReads`: the same tensors, whose storage did not move) with the same
        ``std_scales`` gives the kept tables without reading the tensors' addresses again."""
        std_scales = list(std_scales)
        last = self._last
        if last is not None and last[0] is adapters and last[1] == std_scales and self._rows is not None and self._factors is not None:
            return self._rows[1], self._factors[1], last[2]
        self._last = None  # an upload below that fails (Ctrl-C, out of memory) must not leave the last tables kept for these
        rows, factors, present = adapter_rows(adapters, std_scales, self.first_rows)
        if self._rows is None or self._rows[0] != rows:
            self._rows = (rows, _upload(rows, torch.int64, self.device))
        if self._factors is None or self._factors[0] != factors:
            self._factors = (factors, _upload(factors, torch.float64, self.device))
        self._last = (adapters, std_scales, present)
        return self._rows[1], self._factors[1], present
