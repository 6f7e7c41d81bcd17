"""FSDP2 row sharding: which global rows a rank holds, without importing torch.distributed eagerly.

Under ``fully_shard`` every parameter is a ``DTensor`` sharded on dim 0 (``Shard(0)``): a rank holds
a contiguous range of a weight's output rows, and the noise is the paper's per-row noise, so each
rank can perturb its own rows in place. To make the noise of a row independent of how many ranks
share the model, rows are drawn in *global* row blocks: a rank that holds part of a block draws the
whole block's normals and keeps its rows (at most one block's worth of extra work per layer).
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

__all__ = ["is_dtensor", "local", "full", "gathered", "row_range", "check_row_sharded"]

_GATHERED: Dict[int, torch.Tensor] = {}  # id(DTensor) -> its whole value, inside a ``gathered`` block


def is_dtensor(tensor: object) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard (a view of the DTensor's local storage), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a DTensor: call it on all ranks in the same order)."""
    if not is_dtensor(tensor):
        return tensor
    whole = _GATHERED.get(id(tensor))
    return whole if whole is not None else tensor.full_tensor()


@contextlib.contextmanager
def gathered(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the block, :func:`full` of these DTensors returns values gathered by one collective per
    (process group, dtype) instead of one all-gather each.

    A step needs every layer's whole ``A`` for the row stds; under FSDP2 each ``full_tensor()`` is a
    collective plus DTensor dispatch on the host (112 of them per step on a 16-layer Llama). Call on
    every rank with the same tensors in the same order. Tensors that are not ``Shard(0)`` on a 1-D mesh
    keep the one-by-one path.
    """
    groups: Dict[Tuple, List[torch.Tensor]] = {}
    others: List[torch.Tensor] = []
    for t in tensors:
        if is_dtensor(t) and id(t) not in _GATHERED:
            if _is_row_sharded(t):
                groups.setdefault((id(t.device_mesh), t.dtype, t.to_local().device), []).append(t)
            else:
                others.append(t)
    added: List[int] = []
    try:
        # other layouts one by one, but now, on every rank: gathered later, at first use, a rank that
        # holds no rows of the weight (and so never asks for its row stds) would skip the collective
        for t in others:
            _GATHERED[id(t)] = t.full_tensor()
            added.append(id(t))
        for members in groups.values():
            for t, whole in zip(members, _gather_rows(members)):
                _GATHERED[id(t)] = whole
                added.append(id(t))
        yield
    finally:
        for key in added:
            _GATHERED.pop(key, None)


def _is_row_sharded(t: torch.Tensor) -> bool:
    placements = tuple(getattr(t, "placements", ()))
    return t.device_mesh.ndim == 1 and len(placements) == 1 and type(placements[0]).__name__ == "Shard" and placements[0].dim == 0


def _gather_rows(members: List[torch.Tensor]) -> List[torch.Tensor]:
    """The whole values of DTensors sharded ``Shard(0)`` on one 1-D mesh, with one all-gather.

    Rank ``i`` holds rows ``[i c, (i + 1) c)`` of each (``c = ceil(rows / world)``, torch.chunk's
    layout, the one FSDP2 and DTensor use); each rank sends its rows padded to ``c``, all flattened into
    one buffer, and every tensor is cut back out of the gathered buffers.
    """
    import torch.distributed as dist

    mesh = members[0].device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    chunks = [-(-t.shape[0] // world) for t in members]
    sizes = [c * math.prod(t.shape[1:]) for c, t in zip(chunks, members)]
    send = torch.zeros(sum(sizes), dtype=members[0].dtype, device=members[0].to_local().device)
    offset = 0
    for t, c, size in zip(members, chunks, sizes):
        piece = t.to_local().detach().reshape(-1)
        expected_rows = max(0, min(c, t.shape[0] - rank * c))
        if t.to_local().shape[0] != expected_rows:  # Shard(0) is torch.chunk's layout by definition
            raise RuntimeError(f"a Shard(0) DTensor of {t.shape[0]} rows holds {t.to_local().shape[0]} on rank {rank}, "
                               f"not torch.chunk's {expected_rows}: please report this with your torch version")
        send[offset : offset + piece.numel()] = piece
        offset += size
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send, group=mesh.get_group())
    wholes, offset = [], 0
    for t, c, size in zip(members, chunks, sizes):
        rows = torch.cat([r[offset : offset + size].view(c, *t.shape[1:]) for r in received])[: t.shape[0]]
        wholes.append(rows)
        offset += size
    return wholes


def row_range(weight: torch.Tensor) -> Tuple[int, int]:
    """``(first global row held here, global number of rows)`` of a weight sharded on dim 0."""
    if not is_dtensor(weight):
        return 0, weight.shape[0]
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
        return int(offset[0]), weight.shape[0]
    except (ImportError, AttributeError):  # pragma: no cover - older torch: torch.chunk's layout
        world = weight.device_mesh.size()
        chunk = -(-weight.shape[0] // world)
        return weight.device_mesh.get_local_rank() * chunk, weight.shape[0]


def check_row_sharded(name: str, weight: torch.Tensor, transposed: bool, mode: str, factors_b: Sequence[torch.Tensor] = ()) -> None:
    """Raise ``ValueError`` unless ``weight`` is a DTensor Flat-LoRA can perturb shard by shard."""
    if mode != "inplace":
        raise ValueError(f"{name}: mode='virtual' does not support FSDP2 / DTensor weights; use mode='inplace' (each rank perturbs its own rows).")
    if not _is_row_sharded(weight):
        placements = tuple(weight.placements)
        raise ValueError(f"{name}: sharded as {placements} on a {weight.device_mesh.ndim}-D mesh; Flat-LoRA supports FSDP2's Shard(0) on a 1-D mesh.")
    if transposed:
        raise ValueError(f"{name}: a transposed (fan_in_fan_out / Conv1D) weight sharded on dim 0 splits its fan-in, not its rows; not supported.")
    for b in factors_b:  # B's rows must be the weight's rows: the row stds use this rank's rows of B
        if not (is_dtensor(b) and _is_row_sharded(b) and b.device_mesh == weight.device_mesh):
            placed = tuple(getattr(b, "placements", ())) or "a plain tensor"
            raise ValueError(f"{name}: its adapter's B is placed as {placed}; Flat-LoRA needs B sharded like the weight "
                             "(Shard(0) on the same 1-D mesh, FSDP2's default).")
