"""The whole step's noise in a handful of GPU launches, for every layer at once.

On CUDA with Triton, :class:`StepGroup` computes every target's row stds in one launch (per
weight/adapter type), uploads every row block's seed in one copy, and -- in in-place mode on
16-bit weights -- perturbs all those layers in one pass: with exact restore through the fused
codec (restored by one more pass; the records are sized from the previous step's counts, and the host
does not wait for the device after the perturb pass: it reads the pass's counts at the restore, at the end
of the backward, waiting on an event the device passed long before), with backup
restore after one multi-tensor copy of the weights (restored by copying them back). Per-layer
Python work is limited to reading each target's weight view and adapters.

The values are the per-layer path's: the same seeds (:func:`flatlora_optim.noise.noise_seeds`),
the same row-std kernel and the same codec, so a layer restored alone (a clean ``state_dict``
copy, say) and the group restore agree bit for bit.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from .host_restore import HostCopies, copy_stream, write_back
from .kernels.layer_table import to_device
from .noise import _stack_adapters, layer_key, noise_seeds
from .sharding import full, local
from .targets import LoRATarget

__all__ = ["StepGroup", "GroupSlot", "TableCache"]


class TableCache:
    """The last few layer tables, keyed by the views' addresses, shapes, strides and types."""

    def __init__(self, size: int = 4):
        self.size = size
        self._tables: OrderedDict[Any, Any] = OrderedDict()

    def get(self, rows: Sequence[torch.Tensor], std_bases: Optional[Sequence[int]] = None, seed_bases: Optional[Sequence[int]] = None,
            row_ranges: Optional[Sequence[Tuple[int, int]]] = None) -> Any:
        from .kernels.layer_table import LayerTable, table_key

        key = (table_key(rows), tuple(std_bases or ()), tuple(seed_bases or ()), tuple(row_ranges or ()))
        table = self._tables.get(key)
        if table is None:
            table = LayerTable(rows, std_bases, seed_bases, row_ranges)
            self._tables[key] = table
            while len(self._tables) > self.size:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table


def _adapter_args(target: LoRATarget) -> Tuple[Optional[Tuple[torch.Tensor, torch.Tensor, float]], bool]:
    """``(A, B, scaling)`` for the row-std kernel: the adapter's own tensors when there is one; and whether these are
    the layer's own tensors, which the kernel reads where they lie (so that they stay right at every step while they
    keep their storage), rather than a copy of this step's values.

    Under FSDP2 ``A`` is gathered whole (every rank's rows need all of it: a collective, called by
    every rank for the same layers in the same order) and ``B`` is this rank's rows."""
    adapters = target.adapters()
    if not adapters:
        return None, True
    if len(adapters) == 1 and adapters[0].A.dtype == adapters[0].B.dtype:  # read by address: no detach needed
        a = adapters[0]
        A, B = full(a.A), local(a.B)
        return (A, B, a.scaling), A is a.A and B is a.B
    A, B = _stack_adapters(adapters, target.weight.device)  # several adapters: fp32, scalings folded into B
    return (A, B, 1.0), False


class StepGroup:
    """One step's row stds and seeds for a list of targets on one CUDA device."""

    def __init__(self, kernel: Any, cache: TableCache, targets: Sequence[LoRATarget], sigma: float, stream_seed: int, step: int,
                 reads: Any = None):
        """``reads``: the step's :class:`~flatlora_optim.steady.SteadyReads`: the row ranges, layer table and adapters the
        last step read, while no layer changed (the adapters only when each is read by address, not stacked into a copy)."""
        self.kernel = kernel
        self.sigma, self.step = sigma, step
        self.targets = list(targets)
        self._position = {id(t): k for k, t in enumerate(self.targets)}
        self.rows = [t.rows() for t in self.targets]
        kept = reads.get("group") if reads is not None else None
        if kept is not None and kept[0] is targets:  # the describe step's list, kept as well: the same layers
            _, self.row_ranges, self.table, adapters = kept
        else:
            self.row_ranges = [t.row_range() for t in self.targets]  # (first global row, global rows): FSDP2 shards
            self.table = cache.get(self.rows, row_ranges=self.row_ranges)
            adapters, own = zip(*(_adapter_args(t) for t in self.targets)) if self.targets else ((), ())
            adapters = list(adapters)
            if reads is not None and all(own):  # (the adapters' factors are kept: small, and the row stds read them by address)
                reads.keep("group", (targets, self.row_ranges, self.table, adapters))
        device = self.table.device
        self.std = torch.empty(self.table.total_rows, dtype=torch.float32, device=device)
        kernel.row_stds(self.table, adapters, [sigma / n**0.5 for _, n in self.table.shapes], self.std)
        seeds = noise_seeds(stream_seed, step, [layer_key(t.name) for t in self.targets], self.table.blocks)
        self.seeds = to_device(torch.from_numpy(seeds), device)
        self.record: Any = None  # exact restore: the fused codec's record
        self.report: Optional[str] = None  # the record's overflow warning, read at restore
        self.backups: Optional[List[torch.Tensor]] = None  # backup restore: a copy of every layer's W (host restore: in host memory)
        self.host: Optional[List[Any]] = None  # host restore: the layers' entries in the HostCopies kept from step to step
        self._copy_stream: Any = None  # host restore on CUDA: the stream the copies back are queued on
        self._compute_stream: Any = None  # ... and the stream the noise pass ran on, which waits for them at the end
        self.codec_table: Any = None
        self.restored: List[bool] = []
        self._codec_rows: List[torch.Tensor] = []  # the live views of the layers the pass wrote

    def index_of(self, target: LoRATarget) -> Optional[int]:
        """``target``'s position in the group, or None when it is not in it."""
        return self._position.get(id(target))

    def std_of(self, index: int) -> torch.Tensor:
        base = self.table.std_bases[index]
        return self.std[base : base + self.table.shapes[index][0]]

    def std_nbytes(self, index: int) -> int:
        """Bytes of layer ``index``'s row stds in the step's buffer (float32)."""
        return self.table.shapes[index][0] * self.std.element_size()

    def seeds_of(self, index: int) -> torch.Tensor:
        base = self.table.seed_bases[index]
        return self.seeds[base : base + self.table.blocks[index]]

    def perturb(self, cache: TableCache, indices: Sequence[int], backup: bool = False,
                while_waiting: Optional[Callable[[], None]] = None, host: Optional[HostCopies] = None) -> List[GroupSlot]:
        """Write ``W + e`` into the layers ``indices`` in one pass; one slot per layer.

        Exact restore keeps the fused codec's record; ``backup`` keeps a copy of every layer's ``W``
        (taken with one multi-tensor copy before the pass) and writes the same ``W + e``; ``host`` (host
        restore) takes the copies from there, kept from step to step, and writes the same ``W + e``.
        ``while_waiting`` runs after the pass is queued (for exact restore: before any host wait).
        """
        rows = self._codec_rows = [self.rows[i] for i in indices]
        if len(indices) == len(self.rows) and all(i == k for k, i in enumerate(indices)):
            self.codec_table = self.table  # every layer, in order: the same layout (and its codec sizes), no second lookup
        else:
            self.codec_table = cache.get(rows, [self.table.std_bases[i] for i in indices], [self.table.seed_bases[i] for i in indices],
                                         [self.row_ranges[i] for i in indices])
        self.restored = [False] * len(indices)
        if host is None and not backup:
            self.record = self.kernel.exact_perturb_layers(self.codec_table, self.std, self.seeds, while_waiting, step=self.step, sigma=self.sigma)
            return [GroupSlot(self, k) for k in range(len(indices))]
        if host is not None:
            self.host = host.copies_for(rows)
            self.backups = [entry.tensor for entry in self.host]
            if self.table.device.type == "cuda":
                self._copy_stream = copy_stream(self.table.device)
                self._compute_stream = torch.cuda.current_stream(self.table.device)
        else:
            self.backups = [torch.empty_like(r) for r in rows]
            torch._foreach_copy_(self.backups, rows)
        try:
            self.kernel.add_noise_layers(self.codec_table, self.std, self.seeds)
            if while_waiting is not None:
                while_waiting()
        except BaseException:  # a later launch or while_waiting failed or was interrupted: put back what was written
            self.restore_all()
            raise
        return [GroupSlot(self, k) for k in range(len(indices))]

    def restore_all(self) -> None:
        """Undo every layer not restored yet: one grouped restore when none was restored alone."""
        if self.record is None and self.backups is None:
            return
        if not any(self.restored) and self.host is None:
            if self.backups is not None:
                torch._foreach_copy_(self._codec_rows, self.backups)
            else:
                self.kernel.exact_restore_layers(self.codec_table, self.std, self.seeds, self.record)
            self.restored = [True] * len(self.restored)
        else:
            for k, done in enumerate(self.restored):
                if not done:
                    self.restore_one(k, None)
        if self._copy_stream is not None:  # host restore: what comes next on the compute streams waits for the copies
            current = torch.cuda.current_stream(self.table.device)
            for stream in (self._compute_stream, current) if current != self._compute_stream else (current,):
                stream.wait_stream(self._copy_stream)
        if self.record is not None:
            # the pass's counts: by the end of the backward the device is past the pass (or busy with this step's queued
            # work, so this wait does not leave it idle); a report waits for the caller, who gives it once all is restored
            self.report = self.kernel.settle_counts(self.codec_table, wait=True)

    def take_report(self) -> Optional[str]:
        """The warning of this step's pass, if its buffers were too small (given once)."""
        report, self.report = self.report, None
        return report

    def restore_one(self, k: int, dest: Optional[torch.Tensor]) -> None:
        """Undo codec layer ``k`` in ``dest`` (a copy of its perturbed rows), or in the live weight."""
        live = dest is None
        if live and self.restored[k]:
            return
        rows = self._codec_rows[k] if live else dest
        if self.host is not None and live:
            write_back(rows, self.backups[k], self._copy_stream)  # on CUDA queued on the copy stream, no wait
            self.host[k].version = rows._version  # the write moved it: the copy is current
        elif self.backups is not None:
            rows.copy_(self.backups[k])
        else:
            self.kernel.exact_restore_one(self.codec_table, k, rows, self.std, self.seeds, self.record)
        if live:
            self.restored[k] = True

    def perturb_again(self, k: int) -> None:
        """Host restore: put codec layer ``k``'s noise back into its live weight after it was written back early (the
        same ``fl(W + e)``). The copy is written back first, on the compute stream after the copies back queued so
        far, whatever an interrupted write-back left (the flags may lag the weight); the step's restore writes it
        back again."""
        rows = self._codec_rows[k]
        if self._copy_stream is not None:
            torch.cuda.current_stream(self.table.device).wait_stream(self._copy_stream)
        self.restored[k] = True
        try:
            rows.copy_(self.backups[k], non_blocking=True)
            self.restored[k] = False
            self.kernel.add_noise_one(self.codec_table, k, rows, self.std, self.seeds)
        except BaseException:  # part of the noise may be in: write the copy back, so that a retry adds it anew
            self.restored[k] = False
            self.restore_one(k, None)
            raise
        finally:
            self.host[k].version = rows._version

    def slot_nbytes(self, k: int) -> int:
        """Bytes held for codec layer ``k`` until restore: its backup, or its share of the record."""
        if self.backups is not None:
            return self.backups[k].numel() * self.backups[k].element_size()
        return self.record.layer_nbytes(self.codec_table.tiles[k])


class GroupSlot:
    """A layer's entry in a :class:`StepGroup`'s fused record (what ``TargetPerturbation.blocks`` holds)."""

    def __init__(self, group: StepGroup, k: int):
        self.group, self.k = group, k

    def restore(self, dest: Optional[torch.Tensor]) -> None:
        self.group.restore_one(self.k, dest)

    def perturb_again(self) -> None:
        self.group.perturb_again(self.k)

    def nbytes(self) -> int:
        return self.group.slot_nbytes(self.k)
