"""Base weights that share memory other than through one tensor object.

Tied weights are found by identity (one ``Parameter`` held by several modules) and perturbed once. Memory can also be
shared through different tensor objects: ``b.weight = nn.Parameter(a.weight.data)``, or a weight that is a slice of a
bigger parameter. Two targets over the same memory would each add noise to it, and the second restore would undo the
wrong value (exact restore raised that the weight was modified, and left the noise in); that is refused when the
targets are found. A target inside another parameter or buffer of the model is allowed, but that tensor's entry of a
``state_dict()`` taken while perturbed holds the noise (only the perturbed weights' own entries are given clean), which
a warning says.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["check_shared_memory"]

_EXACT_CHECK_LIMIT = 1 << 24
"""Elements up to which two strided tensors whose spans cross are compared element by element (beyond: taken as
overlapping, which refuses rather than risks a double perturbation)."""


def _local(tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor whose memory holds ``tensor``'s elements here (a DTensor's local shard), or None without memory."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    if local.device.type == "meta" or local.numel() == 0:
        return None
    return local


def _span(tensor: torch.Tensor) -> Tuple[Tuple[torch.device, int], int, int]:
    """``((device, storage address), first byte, end byte)`` of the memory ``tensor``'s elements lie in."""
    size = tensor.element_size()
    last = sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr()
    return (tensor.device, tensor.untyped_storage().data_ptr()), start, start + (last + 1) * size


def _dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements fill its span (no gaps another tensor's elements could sit in)."""
    last = sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))
    return last + 1 == tensor.numel()


def _element_offsets(tensor: torch.Tensor) -> torch.Tensor:
    """Every element's offset in its storage (in elements), on the CPU."""
    offsets = torch.zeros((), dtype=torch.int64)
    for n, s in zip(tensor.shape, tensor.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * s
    return offsets.reshape(-1) + tensor.storage_offset()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (whose spans in one storage cross) have an element in common."""
    if _dense(a) or _dense(b) or a.element_size() != b.element_size():
        return True  # a dense span holds every element inside it; other element sizes: conservatively, yes
    if max(a.numel(), b.numel()) > _EXACT_CHECK_LIMIT:
        return True
    return bool(torch.isin(_element_offsets(a), _element_offsets(b)).any())


def _crossing(tensors: Sequence[Tuple[str, torch.Tensor]]) -> List[Tuple[str, str]]:
    """Pairs of names whose tensors share an element (same storage, crossing spans, a common element)."""
    by_storage: Dict[Tuple[torch.device, int], List[Tuple[int, int, str, torch.Tensor]]] = {}
    for name, tensor in tensors:
        key, start, end = _span(tensor)
        by_storage.setdefault(key, []).append((start, end, name, tensor))
    pairs = []
    for spans in by_storage.values():
        spans.sort(key=lambda span: span[0])
        for i, (_, end, name, tensor) in enumerate(spans):
            for other_start, _, other_name, other in spans[i + 1:]:
                if other_start >= end:
                    break
                if _overlap(tensor, other):
                    pairs.append((name, other_name))
    return pairs


def check_shared_memory(model: nn.Module, targets: Sequence) -> None:
    """Refuse targets whose weights share memory through different tensors; warn of another parameter or buffer of
    ``model`` that holds a target's weight (``targets``: :class:`~flatlora_optim.targets.LoRATarget` s)."""
    weights = [(t.name, w) for t in targets if (w := _local(t.weight)) is not None]
    if not weights:
        return
    between_targets = _crossing(weights)
    if between_targets:
        a, b = between_targets[0]
        raise ValueError(
            f"The LoRA layers {a!r} and {b!r} hold base weights that share memory through different tensors (e.g. "
            "b.weight = nn.Parameter(a.weight.data), or overlapping slices of one parameter): Flat-LoRA would put noise into "
            "that memory twice and could not take it out. Tie them through one Parameter (b.weight = a.weight), which is "
            "perturbed once, or leave one out with targets=."
        )
    weight_ids = {id(t.weight) for t in targets}
    others = []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        local = _local(tensor) if id(tensor) not in weight_ids else None
        if local is not None:
            others.append((f"state:{name}", local))
    inside = sorted({(a if a.startswith("state:") else b)[len("state:"):] for a, b in _crossing(weights + others)
                     if a.startswith("state:") != b.startswith("state:")})
    if inside:
        warnings.warn(
            f"Parameters or buffers of the model share memory with perturbed weights ({inside[:3]}): while the noise is in, "
            "their entries of model.state_dict() hold it (only the perturbed weights' own entries are given clean). Save "
            "checkpoints outside opt.perturbed() and after the backward.",
            stacklevel=4,
        )
