"""Row blocks of many small layers through the restore strategy together (the torch kernel's path).

On small layers the cost of perturbing and restoring is the number of torch operations, not their
size: the exact codec is a few dozen operations whatever the block's size, so a model of many
small layers pays them once per layer. A :class:`BlockBatch` gathers consecutive row blocks (of one
dtype and device, up to :data:`BATCH_ELEMENTS`) into one flat tensor, draws every
block's noise from its own seed into its slice of one buffer (the very numbers
:meth:`~flatlora_optim.noise.TorchNoiseKernel.noise` draws for that block alone), runs the
strategy once over the whole batch, and writes the blocks back in one ``_foreach_copy_``.
Restore regenerates the batch's noise and undoes it with one strategy call too.

A batch of one block (a big layer's block fills the budget alone) skips the gather and works on
the weight's rows directly, exactly as before batching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from .noise import CHUNK_BYTES, TEMP_BYTES_PER_ELEMENT, TorchNoiseKernel, add_noise
from .restore import RestoreStrategy, noise_dtype
from .targets import LoRATarget

__all__ = ["BATCH_ELEMENTS", "BatchPart", "BlockBatch", "BatchSlot", "group_parts"]

BATCH_ELEMENTS = min(2**17, CHUNK_BYTES // TEMP_BYTES_PER_ELEMENT)
"""Most weight elements in one batch. Small enough that a batch's float64 temporaries (1 MiB)
stay in a core's L2 cache: the codec's passes are memory-bound, and on the 2-core benchmark
machine batches of 400k elements were slower than no batching at all, while 128k-256k were
the fastest (docs/benchmarks.md). Big layers' blocks exceed it and go alone."""


@dataclass
class BatchPart:
    """One row block of one layer: rows ``start:end`` of ``target.rows()``, its stds and seed."""

    target: LoRATarget
    block: int
    start: int
    end: int
    cols: int  # the fan-in n
    std: torch.Tensor  # float32 stds of these rows
    seed: int

    @property
    def numel(self) -> int:
        return (self.end - self.start) * self.cols


def group_parts(parts: Iterable[BatchPart], budget: Optional[int] = None) -> List[List[BatchPart]]:
    """Split ``parts`` (in order) into runs of one dtype and device holding at most ``budget``
    (default :data:`BATCH_ELEMENTS`) elements; a part bigger than that forms a run alone."""
    budget = BATCH_ELEMENTS if budget is None else budget
    groups: List[List[BatchPart]] = []
    size = 0
    key: Optional[Tuple[torch.dtype, torch.device]] = None
    for part in parts:
        weight = part.target.weight
        part_key = (weight.dtype, weight.device)
        numel = part.numel
        if not groups or part_key != key or size + numel > budget:
            groups.append([])
            size, key = 0, part_key
        groups[-1].append(part)
        size += numel
    return groups


def _foreach_copy(dests: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    copy = getattr(torch, "_foreach_copy_", None)
    if copy is not None:
        copy(list(dests), list(sources))
    else:  # pragma: no cover - torch without _foreach_copy_
        for dest, source in zip(dests, sources):
            dest.copy_(source)


class BlockBatch:
    """Row blocks perturbed and restored by one strategy call; what ``TargetPerturbation.blocks`` points to."""

    def __init__(self, strategy: RestoreStrategy, kernel: TorchNoiseKernel, parts: List[BatchPart]):
        self.strategy = strategy
        self.kernel = kernel
        self.parts = parts
        weight = parts[0].target.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.work = noise_dtype(self.dtype)
        self.spans: List[Tuple[int, int]] = []
        offset = 0
        for part in parts:
            self.spans.append((offset, offset + part.numel))
            offset += part.numel
        self.size = offset
        self.record: Any = None
        self.restored: Set[int] = set()  # ids of the targets whose live weights are restored

    def _views(self, rows: Dict[int, torch.Tensor]) -> List[torch.Tensor]:
        return [rows[id(part.target)][part.start : part.end] for part in self.parts]

    def _live_rows(self) -> Dict[int, torch.Tensor]:
        targets = {id(part.target): part.target for part in self.parts}
        return {key: target.rows() for key, target in targets.items()}

    def noise(self) -> torch.Tensor:
        """Every block's noise, flat in batch order, in the work dtype.

        Each slice gets ``normal_`` from its block's seed: the numbers ``torch.randn`` draws for
        that block alone (the CPU normal fill depends only on the generator and the element count).
        """
        normals = torch.empty(self.size, dtype=torch.float32, device=self.device)
        for part, (lo, hi) in zip(self.parts, self.spans):
            normals[lo:hi].normal_(generator=self.kernel.generators.seeded(self.device, part.seed))
        noise = normals.to(self.work)
        for part, (lo, hi) in zip(self.parts, self.spans):
            noise[lo:hi].view(part.end - part.start, part.cols).mul_(part.std.to(self.work)[:, None])
        return noise

    def _block_noise(self) -> torch.Tensor:
        """A one-block batch's noise, drawn as the per-block path draws it."""
        part = self.parts[0]
        return self.kernel.noise(part.std, part.cols, part.seed, self.work)

    @torch.no_grad()
    def perturb(self) -> None:
        """Write ``fl(W + e)`` into every block and keep the strategy's record of the batch."""
        views = self._views(self._live_rows())
        if len(views) == 1:
            noise = self._block_noise()
            self.record = self.strategy.perturb(views[0], add_noise(views[0], noise), noise)
            return
        gathered = torch.cat([view.reshape(-1) for view in views])
        noise = self.noise()
        perturbed = add_noise(gathered, noise)
        self.record = self.strategy.perturb(gathered, perturbed, noise)
        _foreach_copy(views, self._slices(perturbed))

    def _slices(self, flat: torch.Tensor) -> List[torch.Tensor]:
        return [flat[lo:hi].view(part.end - part.start, part.cols) for part, (lo, hi) in zip(self.parts, self.spans)]

    @torch.no_grad()
    def restore(self, target: Optional[LoRATarget] = None, dest: Optional[torch.Tensor] = None) -> None:
        """Undo the batch in the live weights; or, with ``target``, only that layer's blocks,
        into ``dest`` (its ``m x n`` rows, holding the perturbed values) or its live weight.

        A single layer is restored by undoing the whole batch in a gathered copy (the other
        layers' rows read from their live weights) and writing back that layer's blocks only.
        A layer restored alone in its live weight is not written again; while the rest is
        undone, its perturbed values are formed anew from its clean rows (``fl(W + e)`` is
        deterministic), so the record still decodes.
        """
        live = dest is None
        wanted = {id(part.target) for part in self.parts} if target is None else {id(target)}
        if live and wanted <= self.restored:
            return
        rows = self._live_rows()
        if target is not None and dest is not None:
            rows[id(target)] = dest
        views = self._views(rows)
        noise = (self._block_noise() if len(views) == 1 else self.noise()) if self.strategy.restore_needs_noise else None
        gathered = views[0] if len(views) == 1 else torch.cat([view.reshape(-1) for view in views])
        self._reform_restored(gathered, noise)
        self.strategy.restore(gathered, noise, self.record)
        if len(views) > 1:
            slices = self._slices(gathered)
            keep = [k for k, part in enumerate(self.parts) if id(part.target) in wanted and not (live and id(part.target) in self.restored)]
            _foreach_copy([views[k] for k in keep], [slices[k] for k in keep])
        if live:
            self.restored |= wanted

    def _reform_restored(self, gathered: torch.Tensor, noise: Optional[torch.Tensor]) -> None:
        """Put ``fl(W + e)`` back into the gathered slices of layers already restored alone."""
        if noise is None or not self.restored:  # (a strategy without noise keeps a full copy: nothing to form)
            return
        if len(self.parts) == 1:  # the weight's own rows (maybe strided) and the block's noise
            gathered.copy_(add_noise(gathered, noise))
            return
        for part, (lo, hi) in zip(self.parts, self.spans):
            if id(part.target) in self.restored:
                gathered[lo:hi] = add_noise(gathered[lo:hi], noise[lo:hi])

    def nbytes(self) -> int:
        return self.strategy.nbytes(self.record) if self.record is not None else 0


class BatchSlot:
    """A layer's entry in a :class:`BlockBatch` (what ``TargetPerturbation.blocks`` holds).

    The batch's record is counted once, by the slot of its first layer.
    """

    def __init__(self, batch: BlockBatch, target: LoRATarget, counts_record: bool):
        self.batch = batch
        self.target = target
        self.counts_record = counts_record

    def restore(self, dest: Optional[torch.Tensor]) -> None:
        self.batch.restore(self.target, dest)

    def nbytes(self) -> int:
        return self.batch.nbytes() if self.counts_record else 0
