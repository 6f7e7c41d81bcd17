"""FSDP2 row sharding: which global rows a rank holds, without importing torch.distributed eagerly.

Under ``fully_shard`` every parameter is a ``DTensor`` sharded on dim 0 (``Shard(0)``): a rank holds
a contiguous range of a weight's output rows, and the noise is the paper's per-row noise, so each
rank can perturb its own rows in place. To make the noise of a row independent of how many ranks
share the model, rows are drawn in *global* row blocks: a rank that holds part of a block draws the
whole block's normals and keeps its rows (at most one block's worth of extra work per layer).
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["is_dtensor", "local", "full", "row_range", "check_row_sharded"]


def is_dtensor(tensor: object) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard (a view of the DTensor's local storage), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a DTensor: call it on all ranks in the same order)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


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


def check_row_sharded(name: str, weight: torch.Tensor, transposed: bool, mode: str) -> None:
    """Raise ``ValueError`` unless ``weight`` is a DTensor Flat-LoRA can perturb shard by shard."""
    placements = tuple(getattr(weight, "placements", ()))
    kinds = [type(p).__name__ for p in placements]
    if mode != "inplace":
        raise ValueError(f"{name}: mode='virtual' does not support FSDP2 / DTensor weights; use mode='inplace' (each rank perturbs its own rows).")
    if weight.device_mesh.ndim != 1 or kinds != ["Shard"] or placements[0].dim != 0:
        raise ValueError(f"{name}: sharded as {placements} on a {weight.device_mesh.ndim}-D mesh; Flat-LoRA supports FSDP2's Shard(0) on a 1-D mesh.")
    if transposed:
        raise ValueError(f"{name}: a transposed (fan_in_fan_out / Conv1D) weight sharded on dim 0 splits its fan-in, not its rows; not supported.")
