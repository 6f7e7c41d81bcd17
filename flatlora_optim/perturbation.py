"""Perturb one target weight with the paper's noise, and bring it back.

One call of :meth:`Perturber.perturb` handles one layer: it computes the per-row noise std from
the full weight ``W + sBA`` (see :mod:`flatlora_optim.noise`), then walks the rows in blocks,
draws each block's noise from its own seed, writes ``fl(W + e)`` and keeps what the restore
strategy needs. :meth:`Perturber.restore` regenerates every block's noise from the same seeds
and undoes the blocks in reverse order. Nothing but the row stds (``m`` floats) and the
strategy's records is kept in between.

:meth:`Perturber.perturb_all` computes every block's seed for the whole step at once and, on the
torch kernel, sends the row blocks of small layers through the strategy in batches
(:mod:`flatlora_optim.batched`), so that a model of many small layers does not pay the codec's
fixed cost once per layer.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .batched import BatchPart, BatchSlot, BlockBatch, group_parts
from .devices import autocast_off
from .grouped import StepGroup, TableCache
from .host_restore import HostCopies
from .interrupts import interrupts_deferred
from .kernels.layer_table import to_device
from .noise import ShardNoiseKernel, TorchNoiseKernel, chunk_bounds, kernel_for, layer_key, noise_seed, noise_seeds, row_std, rows_per_chunk
from .restore import RestoreStrategy, noise_dtype
from .sharding import gathered
from .steady import SteadyReads
from .targets import LoRATarget

__all__ = ["TargetPerturbation", "Perturber"]


@dataclass
class TargetPerturbation:
    """What is needed to regenerate one layer's noise and undo it."""

    target: LoRATarget
    step: int
    sigma: float
    std: Optional[torch.Tensor]  # per-row noise std, float32, length m (None until first needed)
    blocks: List[Tuple[int, int, int, int, int, Any]] = field(default_factory=list)  # (block, start, end, skip, block_rows, record)
    block_seeds: Optional[torch.Tensor] = None  # the blocks' seeds on the device (fused GPU kernel)
    seeds: Optional[List[int]] = None  # every global row block's seed, computed once per step
    kernel: Any = None  # the noise kernel, chosen once per step (see Perturber._kernel)
    former: Optional[Callable[[], torch.Tensor]] = None  # forms fl(W + e) anew on each call (virtual mode; see Perturber.former)
    former_at: int = 0  # the address of the weight memory ``former`` reads
    slot: Optional[Tuple[StepGroup, int]] = None
    """Its place in the step's :class:`StepGroup`, whose buffers hold its stds and seeds (``std`` and ``block_seeds``
    are views of them, taken on first use: most steps never need them per layer)."""

    def nbytes(self, strategy: RestoreStrategy) -> int:
        """Bytes held for this layer between perturb and restore (row stds + records)."""
        if self.std is not None:
            std_bytes = self.std.numel() * self.std.element_size()
        else:
            std_bytes = 0 if self.slot is None else self.slot[0].std_nbytes(self.slot[1])
        return std_bytes + sum(r.nbytes() if callable(getattr(r, "nbytes", None)) else strategy.nbytes(r) for *_, r in self.blocks)

    def scales(self) -> torch.Tensor:
        """The per-row stds, computed on first use from the current ``W`` and adapters.

        Virtual mode defers them to the layer's first forward, where their kernel launches overlap
        the GPU work of the layers before it instead of stalling the start of the step.
        """
        if self.std is None and self.slot is not None:
            self.std = self.slot[0].std_of(self.slot[1])
        if self.std is None:
            with autocast_off():  # virtual mode's first forward may run under the caller's autocast
                self.std = row_std(self.target.rows(), self.target.adapters(), self.sigma)
        return self.std


_TORCH_KERNEL = TorchNoiseKernel()
_GROUPED = -1  # block index of a record kept by a StepGroup (fused GPU codec, whole layer)
_BATCHED = -2  # block index of a record kept by a BlockBatch (torch kernel, several layers' blocks)
_FEW_BLOCKS = 16  # up to this many blocks, Python noise_seed beats numpy noise_seeds (about 25 us per call)


def _global_blocks(target: LoRATarget) -> int:
    """How many global row blocks cover ``target`` (all ranks' rows under FSDP2)."""
    _, global_rows = target.row_range()
    per_block = rows_per_chunk(target.shape[1])
    return -(-global_rows // per_block)


class _Once:
    """Calls ``fn`` (if any) on the first call only."""

    def __init__(self, fn: Optional[Callable[[], None]]):
        self.fn = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


class Perturber:
    """Applies and undoes the noise of ``(seed, step)`` on targets, one layer at a time."""

    def __init__(self, seed: int, strategy: RestoreStrategy):
        self.seed = seed
        self.strategy = strategy
        self.stream = 0  # the noise stream: 0 for one process; the rank under DDP with independent noise
        self._tables = TableCache()
        self.host_copies = HostCopies() if strategy.name == "host" else None  # kept from step to step (fused pass)

    def stream_seed(self) -> int:
        """The seed of this process's noise stream; stream 0 is ``seed`` itself, so rank 0 of a
        data-parallel run draws exactly what a single-process run draws."""
        return self.seed if self.stream == 0 else noise_seed(self.seed, self.stream, 0x5EED, 0)

    def block_seed(self, p: TargetPerturbation, block: int) -> int:
        if p.seeds is None:
            self.assign_seeds([p])
        return p.seeds[block]  # type: ignore[index]

    def assign_seeds(self, perturbations: List[TargetPerturbation]) -> None:
        """Fill ``p.seeds`` (every global block's ``noise_seed``) for every ``p`` that lacks them:
        for a whole step in one vectorised :func:`~flatlora_optim.noise.noise_seeds` call; for
        a handful of blocks with :func:`~flatlora_optim.noise.noise_seed` (cheaper than numpy's
        fixed cost). Both give the same numbers."""
        missing = [p for p in perturbations if p.seeds is None]
        if not missing:
            return
        stream = self.stream_seed()
        counts = [_global_blocks(p.target) for p in missing]
        if sum(counts) <= _FEW_BLOCKS or any(p.step != missing[0].step for p in missing):
            for p, count in zip(missing, counts):
                key = layer_key(p.target.name)
                p.seeds = [noise_seed(stream, p.step, key, block) for block in range(count)]
            return
        seeds = noise_seeds(stream, missing[0].step, [layer_key(p.target.name) for p in missing], counts).tolist()
        offset = 0
        for p, count in zip(missing, counts):
            p.seeds = seeds[offset : offset + count]
            offset += count

    def _device_seeds(self, p: TargetPerturbation) -> torch.Tensor:
        """Every block's seed in one device tensor, uploaded once per layer and step (GPU kernel)."""
        if p.block_seeds is None and p.slot is not None:
            p.block_seeds = p.slot[0].seeds_of(p.slot[1])
        if p.block_seeds is None:
            self.assign_seeds([p])  # usually done already, for the whole step, by describe_all
            p.block_seeds = to_device(torch.tensor(p.seeds, dtype=torch.int64), p.target.weight.device)
        return p.block_seeds

    @staticmethod
    def _kernel_of(target: LoRATarget) -> Any:
        # a sharded (FSDP2) weight draws whole global blocks and keeps its rows, so it adds noise it
        # was given: the torch kernel, or on CUDA the fused kernel's noise added with torch ops
        kernel = kernel_for(target.weight.device)
        if not target.sharded:
            return kernel
        return ShardNoiseKernel(kernel) if getattr(kernel, "takes_device_seeds", False) else _TORCH_KERNEL

    def _kernel(self, p: TargetPerturbation) -> Any:
        if p.kernel is None:
            p.kernel = self._kernel_of(p.target)
        return p.kernel

    def _seed_arg(self, p: TargetPerturbation, block: int, kernel: Any) -> Any:
        if getattr(kernel, "takes_device_seeds", False):
            return self._device_seeds(p)[block : block + 1]
        return self.block_seed(p, block)

    @staticmethod
    def _blocks(p: TargetPerturbation) -> Iterator[Tuple[int, int, int, int, int]]:
        """``(block, start, end, skip, block_rows)``: the global row blocks that cover this process's rows.

        ``start:end`` are local rows; ``skip`` is how many rows of the block come before ``start``.
        Without sharding every block is whole (``skip == 0``, ``end - start == block_rows``).
        """
        rows = p.target.rows()
        first, global_rows = p.target.row_range()
        for block, block_start, block_end in chunk_bounds(global_rows, rows.shape[1]):
            start, end = max(block_start, first), min(block_end, first + rows.shape[0])
            if start < end:
                yield block, start - first, end - first, start - block_start, block_end - block_start

    def _block_noise(self, p: TargetPerturbation, block: int, start: int, end: int, skip: int = 0, block_rows: Optional[int] = None) -> torch.Tensor:
        rows = p.target.rows()
        kernel = self._kernel(p)
        std = p.scales()[start:end]
        if block_rows is not None and (skip or block_rows != end - start):  # part of a global block
            whole = torch.zeros(block_rows, dtype=std.dtype, device=std.device)
            whole[skip : skip + end - start] = std
            noise = kernel.noise(whole, rows.shape[1], self._seed_arg(p, block, kernel), noise_dtype(rows.dtype))
            return noise[skip : skip + end - start]
        return kernel.noise(std, rows.shape[1], self._seed_arg(p, block, kernel), noise_dtype(rows.dtype))

    def describe(self, target: LoRATarget, sigma: float, step: int, lazy: bool = False) -> TargetPerturbation:
        """This step's noise for ``target`` (nothing is written); ``lazy`` defers the row stds to first use."""
        p = TargetPerturbation(target, step, sigma, None)
        if not lazy:
            p.scales()
        return p

    def perturbed_rows(self, p: TargetPerturbation) -> torch.Tensor:
        """A new ``m x n`` tensor holding ``fl(W + e)`` of the weight as it is now (see :meth:`former`)."""
        return self.former(p, p.target.weight)()

    def former(self, p: TargetPerturbation, weight: torch.Tensor) -> Callable[[], torch.Tensor]:
        """What forms ``fl(W + e)`` of ``weight`` (``p``'s weight, as a forward finds it) into a new ``m x n`` tensor at
        each call: virtual mode's temporary, in forward and, through the same former, again in backward.

        Set up on the step's first call and kept while the weight's memory stays (on CUDA one launch per layer, its
        arguments computed once: this runs 224 times per step of a 16-block Llama, and its host time shows whenever the
        GPU has no queued work to hide it). A conversion (``.half()``, ``.to()``) swaps the parameter's ``.data``: the
        next forward gets a former of the new memory, while a backward still pending forms ``W + e`` from the detached
        weight its forward used, as autograd keeps a plain layer's saved weight."""
        former, at = p.former, weight.data_ptr()
        if former is None or p.former_at != at:
            kernel = self._kernel(p)
            rows = p.target.rows().detach()
            if hasattr(kernel, "layer_former"):  # GPU: every block in one launch, same values
                former = kernel.layer_former(rows, p.scales(), self._device_seeds(p), rows_per_chunk(rows.shape[1]), noise_dtype(rows.dtype))
            else:
                former = functools.partial(self._perturbed_blocks, p, rows)
            p.former, p.former_at = former, at
        return former  # (no autocast-affected op in it: its row stds, p.scales(), turn autocast off themselves)

    @torch.no_grad()
    def _perturbed_blocks(self, p: TargetPerturbation, rows: torch.Tensor) -> torch.Tensor:
        """``fl(W + e)`` of ``rows`` (``p``'s weight) block by block, through the per-block interface (the torch kernel;
        an FSDP2 shard)."""
        kernel = self._kernel(p)
        work = noise_dtype(rows.dtype)
        bounds = list(chunk_bounds(*rows.shape))
        if len(bounds) == 1:  # the whole layer is one block: no copy into an output buffer
            return kernel.perturbed(rows, p.scales(), self._seed_arg(p, 0, kernel), work)
        out = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
        for block, start, end in bounds:
            out[start:end] = kernel.perturbed(rows[start:end], p.scales()[start:end], self._seed_arg(p, block, kernel), work)
        return out

    @torch.no_grad()
    def perturb(self, target: LoRATarget, sigma: float, step: int) -> TargetPerturbation:
        """Write ``W + e`` into ``target``'s weight; return what restores it."""
        return self.perturb_all([target], sigma, step)[0]

    def describe_all(self, targets: List[LoRATarget], sigma: float, step: int,
                     reads: Optional[SteadyReads] = None) -> Tuple[List[TargetPerturbation], Optional[StepGroup]]:
        """This step's noise for every target (nothing written): on CUDA all row stds in one launch. ``reads``: the
        step's :class:`~flatlora_optim.steady.SteadyReads` (what the last step read, while no layer changed)."""
        described, group, _ = self._describe_all(targets, sigma, step, writes=False, reads=reads)
        return described, group

    def _describe_all(self, targets: List[LoRATarget], sigma: float, step: int, writes: bool = True,
                      reads: Optional[SteadyReads] = None) -> Tuple[List[TargetPerturbation], Optional[StepGroup], List[bool]]:
        """:meth:`describe_all`, and for every target whether it goes through the step-wide pass (:meth:`_fusable`;
        with ``writes`` false, for FSDP2 shards only, the others' being left False).

        A target's stds and seeds come from the :class:`StepGroup` when its device's kernel has grouped launches
        (CUDA with Triton); an FSDP2 shard only when it goes through the fused pass (the per-block path indexes
        its seeds by global block). Each device's kernel is looked up once (the targets share one device)."""
        kernels: Dict[torch.device, Any] = {targets[0].weight.device: kernel_for(targets[0].weight.device)} if targets else {}
        kept = reads.get(f"describe-{writes}") if reads is not None else None
        if kept is not None and kept[0] == kernels:  # the same layers as the last step, and the same kernel for them
            _, fusable, grouped = kept
        else:
            fusable, grouped = [], []
            for target in targets:
                device = target.weight.device
                kernel = kernels.get(device)
                if kernel is None:
                    kernel = kernels[device] = kernel_for(device)
                fused = (writes or target.sharded) and self._fusable(target, kernel)
                fusable.append(fused)
                if (fused if target.sharded else hasattr(kernel, "row_stds")):
                    grouped.append(target)
            if reads is not None:
                reads.keep(f"describe-{writes}", (kernels, fusable, grouped))
        group = StepGroup(kernels[grouped[0].weight.device], self._tables, grouped, sigma, self.stream_seed(), step, reads) if grouped else None
        described = []
        for target in targets:
            k = group.index_of(target) if group is not None else None
            if k is None:
                described.append(self.describe(target, sigma, step, lazy=True))
            else:
                described.append(TargetPerturbation(target, step, sigma, None, slot=(group, k)))
        self.assign_seeds([p for p in described if p.slot is None])
        return described, group, fusable

    @torch.no_grad()
    def perturb_all(self, targets: List[LoRATarget], sigma: float, step: int,
                    while_waiting: Optional[Callable[[], None]] = None, reads: Optional[SteadyReads] = None) -> List[TargetPerturbation]:
        """Write ``W + e`` into every target; return what restores each (restore with :meth:`restore_all`).

        On CUDA, 16-bit weights with exact or backup restore go through one step-wide pass together
        (a few launches for the whole list); every other target is perturbed block by block.
        ``while_waiting`` runs exactly once: right after the step-wide pass is queued (before any host
        wait, so that its work overlaps the pass), else at the end. If it raises,
        the weights are restored and the error propagates. ``reads``: as for :meth:`describe_all`.
        """
        once = _Once(while_waiting)
        sharded_factors = [a.A for t in targets if t.sharded for a in t.adapters()]
        with gathered(sharded_factors), autocast_off():  # every sharded A whole, in one collective (FSDP2's row stds need them)
            described = self._perturb_all(targets, sigma, step, once, reads)
        try:
            once()
        except BaseException:
            self.restore_all(described)
            raise
        return described

    def _perturb_all(self, targets: List[LoRATarget], sigma: float, step: int, while_waiting: Callable[[], None],
                     reads: Optional[SteadyReads] = None) -> List[TargetPerturbation]:
        described, group, fusable = self._describe_all(targets, sigma, step, reads=reads)
        fused = [k for k, p in enumerate(described) if p.slot is not None and fusable[k]]
        in_group = set(fused)
        rest = [p for k, p in enumerate(described) if k not in in_group]
        done: List[TargetPerturbation] = []
        try:
            if fused:
                slots = group.perturb(self._tables, [described[k].slot[1] for k in fused], backup=self.strategy.name == "backup",
                                      while_waiting=while_waiting, host=self.host_copies)
                for k, slot in zip(fused, slots):
                    rows = described[k].target.rows()
                    described[k].blocks.append((_GROUPED, 0, rows.shape[0], 0, rows.shape[0], slot))
                    done.append(described[k])
            batchable = {id(p): p for p in rest if self._batchable(p)}
            owners = {id(p.target): p for p in batchable.values()}
            for parts in group_parts(part for p in batchable.values() for part in self._parts(p)):
                self._perturb_batch(parts, owners, done)
            for p in rest:
                if id(p) not in batchable:
                    self._perturb_blocks(p)
                    done.append(p)
        except BaseException:
            self.restore_all(done)  # leave nothing half-perturbed
            raise
        return described

    def _batchable(self, p: TargetPerturbation) -> bool:
        """Whether ``p``'s blocks can go through a :class:`BlockBatch`: the torch kernel, whole blocks; not with host
        restore, whose layers are written back (and their noise put back) one by one during the step."""
        return (p.slot is None and not p.target.sharded and isinstance(self._kernel(p), TorchNoiseKernel)
                and self.strategy.name != "host")

    def _parts(self, p: TargetPerturbation) -> Iterator[BatchPart]:
        rows = p.target.rows()
        std = p.scales()
        for block, start, end in chunk_bounds(*rows.shape):
            yield BatchPart(p.target, block, start, end, rows.shape[1], std[start:end], self.block_seed(p, block))

    def _perturb_batch(self, parts: List[BatchPart], owners: Dict[int, TargetPerturbation], done: List[TargetPerturbation]) -> None:
        """Perturb one batch of blocks; each layer in it gets one slot (the first layer's counts the record)."""
        batch = BlockBatch(self.strategy, self._kernel(owners[id(parts[0].target)]), parts)
        batch.perturb()
        spans: Dict[int, Tuple[int, int]] = {}
        for part in parts:
            start, end = spans.get(id(part.target), (part.start, part.end))
            spans[id(part.target)] = (min(start, part.start), max(end, part.end))
        for k, (key, (start, end)) in enumerate(spans.items()):
            p = owners[key]
            p.blocks.append((_BATCHED, start, end, 0, end - start, BatchSlot(batch, p.target, counts_record=k == 0)))
            if not any(q is p for q in done):
                done.append(p)

    def _fusable(self, target: LoRATarget, kernel: Any) -> bool:
        """Whether ``target`` goes through the step-wide one-pass path: exact, backup or host restore, 16-bit
        weights, the CUDA kernel (``kernel``: its device's; subtract and other weight types go block by block).
        FSDP2 shards too: the kernels see a shard from the start of its first global row block."""
        if self.strategy.name not in ("exact", "backup", "host"):
            return False
        if not (hasattr(kernel, "exact_perturb_layers") and kernel.fused_exact_supported(target.weight.dtype)):
            return False
        rows = target.rows()
        seen_rows = rows.shape[0] + target.row_range()[0] % rows_per_chunk(rows.shape[1])  # a shard is seen from its block's start
        return seen_rows * rows.shape[1] < 2**31

    def _perturb_blocks(self, p: TargetPerturbation) -> None:
        rows = p.target.rows()
        kernel = self._kernel(p)
        work = noise_dtype(rows.dtype)
        try:
            for block, start, end, skip, block_rows in self._blocks(p):
                noise = self._block_noise(p, block, start, end, skip, block_rows)
                perturbed = kernel.perturbed(rows[start:end], p.scales()[start:end], self._seed_arg(p, block, kernel), work, noise=noise)
                p.blocks.append((block, start, end, skip, block_rows, self.strategy.perturb(rows[start:end], perturbed, noise)))
        except BaseException:
            self.restore(p)
            raise

    @torch.no_grad()
    def restore(self, p: TargetPerturbation, dest: Optional[torch.Tensor] = None) -> None:
        """Undo ``p`` in the live weight, or in ``dest`` (a copy of the perturbed rows); a Ctrl-C
        meanwhile is delivered once it is done (:mod:`flatlora_optim.interrupts`)."""
        rows = p.target.rows() if dest is None else dest
        with interrupts_deferred(), autocast_off():
            for block, start, end, skip, block_rows, record in reversed(p.blocks):
                if block in (_GROUPED, _BATCHED):  # a slot of a record shared with other layers
                    record.restore(dest)
                    continue
                noise = self._block_noise(p, block, start, end, skip, block_rows) if self.strategy.restore_needs_noise else None
                self.strategy.restore(rows[start:end], noise, record)

    @torch.no_grad()
    def restore_early(self, p: TargetPerturbation) -> None:
        """Undo ``p`` in its live weight now (during a backward: see :class:`~flatlora_optim.host_restore.EarlyRestore`);
        the step's :meth:`restore_all` then leaves it alone. A slot of the fused pass marks itself restored; the
        blocks of the per-block path are dropped from ``p`` once undone."""
        if len(p.blocks) == 1 and p.blocks[0][0] == _GROUPED:  # the fused pass: a copy queued, nothing else (called per layer in backward)
            p.blocks[0][-1].restore(None)
            return
        if any(block == _BATCHED for block, *_ in p.blocks):
            raise ValueError("restore_early: a layer in a batch of blocks is restored with its batch")
        with interrupts_deferred():  # a Ctrl-C during the restore lands after the records are dropped: p.blocks says clean
            self.restore(p)
            p.blocks = [entry for entry in p.blocks if entry[0] == _GROUPED]

    @torch.no_grad()
    def perturb_again(self, p: TargetPerturbation) -> None:
        """Put ``p``'s noise back after :meth:`restore_early` (a forward of the layer before the step's restore): the same
        ``fl(W + e)`` as before. Host restore only: the layer is written back from its copy first, whatever state a
        write-back that was interrupted or failed part-way left it in (the copy makes that repeatable), then perturbed."""
        with interrupts_deferred(), autocast_off():
            if p.blocks and p.blocks[0][0] == _GROUPED:
                p.blocks[0][-1].perturb_again()
                return
            if p.blocks:  # a write-back that stopped part-way: finish it from the records
                self.restore(p)
                p.blocks = []
            try:
                self._perturb_blocks(p)
            except BaseException:  # it restored what it wrote: the layer is clean, and a retry must perturb it anew
                p.blocks = []
                raise

    @torch.no_grad()
    def restore_all(self, perturbations: List[TargetPerturbation], failed: Optional[List[TargetPerturbation]] = None) -> None:
        """Undo every perturbation in its live weight, the fused groups and the batches each in
        one call; every layer is attempted before the first error is raised, and ``failed`` (when
        given) receives the perturbations whose restore raised, still in their weights. A Ctrl-C
        meanwhile is delivered once every layer is restored: a layer left half restored could not
        be mended."""
        with interrupts_deferred(), autocast_off():
            self._restore_all(perturbations, [] if failed is None else failed)
        groups = {id(record.group): record.group for p in perturbations for block, *_, record in p.blocks if block == _GROUPED}
        for group in groups.values():  # warnings only now that every layer is restored (one turned into an error is safe)
            report = group.take_report()
            if report is not None:
                warnings.warn(report, RuntimeWarning, stacklevel=3)

    def _restore_all(self, perturbations: List[TargetPerturbation], failed: List[TargetPerturbation]) -> None:
        error: Optional[BaseException] = None
        shared: Dict[int, Tuple[Callable[[], None], List[TargetPerturbation]]] = {}  # one restore call per StepGroup / BlockBatch
        for p in reversed(perturbations):
            for block, *_, record in reversed(p.blocks):
                if block == _GROUPED:
                    shared.setdefault(id(record.group), (record.group.restore_all, []))[1].append(p)
                elif block == _BATCHED:
                    shared.setdefault(id(record.batch), (record.batch.restore, []))[1].append(p)
            if any(block in (_GROUPED, _BATCHED) for block, *_ in p.blocks):
                continue
            try:
                self.restore(p)
            except BaseException as exc:
                error = error or exc
                failed.append(p)
        for restore, members in shared.values():
            try:
                restore()
            except BaseException as exc:
                error = error or exc
                failed.extend(members)
        if error is not None:
            raise error

    @torch.no_grad()
    def noise(self, p: TargetPerturbation) -> torch.Tensor:
        """The ``m x n`` noise drawn for ``p`` on this process's rows (for inspection; allocates it whole)."""
        rows = p.target.rows()
        # the device from the rows: a rank holding no rows of an FSDP2 layer must not compute its stds (a collective
        # the other ranks, whose stds are cached, would not join)
        out = torch.zeros(rows.shape, dtype=noise_dtype(rows.dtype), device=rows.device)
        for block, start, end, skip, block_rows in self._blocks(p):
            out[start:end] = self._block_noise(p, block, start, end, skip, block_rows)
        return out
