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
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .sharding import local as local_shard

__all__ = ["check_shared_memory", "warn_of_tensors_holding_targets"]

_CHUNK = 1 << 20
"""Elements whose offsets are formed at once when two strided tensors whose spans cross are compared element by
element (8 MiB of offsets, whatever the tensors' size)."""


def _local(tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor whose memory holds ``tensor``'s elements here (a DTensor's local shard), or None where there is no
    plain strided memory to compare (meta, empty, sparse, a wrapper subclass such as a quantized weight)."""
    try:
        local = local_shard(tensor)
        if local.layout != torch.strided or local.device.type == "meta" or local.numel() == 0:
            return None
        local.untyped_storage().data_ptr()
        local.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None
    return local


def _last_offset(tensor: torch.Tensor) -> int:
    """How many elements past its first the last element of ``tensor`` lies in memory."""
    return sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))


def _span(tensor: torch.Tensor) -> Tuple[Tuple[torch.device, int], int, int]:
    """``((device, storage address), first byte, end byte)`` of the memory ``tensor``'s elements lie in."""
    start = tensor.data_ptr()
    return (tensor.device, tensor.untyped_storage().data_ptr()), start, start + (_last_offset(tensor) + 1) * tensor.element_size()


def _dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements fill its span (no gaps another tensor's elements could sit in)."""
    return _last_offset(tensor) + 1 == tensor.numel()


def _element_offsets(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """Every element's offset in its storage (in elements), on the CPU, in chunks of at most about ``_CHUNK``."""
    shape, strides = tensor.shape, tensor.stride()
    step = max(1, _CHUNK // max(1, tensor[0].numel()))  # rows of the first dimension per chunk
    for first in range(0, shape[0], step):
        offsets = torch.arange(first, min(first + step, shape[0]), dtype=torch.int64) * strides[0]
        for n, s in zip(shape[1:], strides[1:]):
            offsets = offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * s
        yield offsets.reshape(-1) + tensor.storage_offset()


def _holds_any(tensor: torch.Tensor, offsets: torch.Tensor) -> Optional[bool]:
    """Whether one of ``offsets`` is an element of ``tensor`` (solved digit by digit over its strides, largest first,
    which is exact when each stride passes the span of the smaller ones, as in any slice or transpose of a
    contiguous tensor); None where the strides are not so nested."""
    dims = sorted((s, n) for n, s in zip(tensor.shape, tensor.stride()) if n > 1 and s != 0)
    below = 0  # the largest offset the smaller strides reach
    for stride, size in dims:
        if stride <= below:
            return None
        below += (size - 1) * stride
    dims.reverse()
    rest = offsets - tensor.storage_offset()
    inside = rest >= 0
    for stride, size in dims:
        digit = torch.div(rest, stride, rounding_mode="floor")
        inside &= digit < size
        rest = rest - digit * stride
    return bool((inside & (rest == 0)).any())


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (whose spans in one storage cross) have an element in common: exact for slices and
    transposes of one tensor, whatever their size; conservatively yes for anything else."""
    if _dense(a) or _dense(b) or a.element_size() != b.element_size():
        return True  # a dense span holds every element inside it; other element sizes: conservatively, yes
    if a.numel() > b.numel():
        a, b = b, a
    for offsets in _element_offsets(a):
        holds = _holds_any(b, offsets)
        if holds is None or holds:
            return True
    return False


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


def check_shared_memory(targets: Sequence) -> None:
    """Refuse targets whose weights share memory through different tensors (``targets``:
    :class:`~flatlora_optim.targets.LoRATarget` s): each would get the noise twice."""
    between_targets = _crossing(_weights(targets))
    if between_targets:
        a, b = between_targets[0]
        raise ValueError(
            f"The LoRA layers {a!r} and {b!r} hold base weights that share memory through different tensors (e.g. "
            "b.weight = nn.Parameter(a.weight.data), or overlapping slices of one parameter): Flat-LoRA would put noise into "
            "that memory twice and could not take it out. Tie them through one Parameter (b.weight = a.weight), which is "
            "perturbed once, or leave one out with targets=."
        )


def warn_of_tensors_holding_targets(model: nn.Module, targets: Sequence) -> None:
    """In-place mode: warn of parameters or buffers of ``model`` that hold a target's weight (a slice of a bigger
    tensor), whose ``state_dict()`` entries hold the noise while it is in (virtual mode writes nothing: no warning)."""
    weights = _weights(targets)
    weight_ids = {id(t.weight) for t in targets}
    others = []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        local = _local(tensor) if id(tensor) not in weight_ids else None
        if local is not None:
            others.append((f"state:{name}", local))
    if not weights or not others:
        return
    inside = sorted({(a if a.startswith("state:") else b)[len("state:"):] for a, b in _crossing(weights + others)
                     if a.startswith("state:") != b.startswith("state:")})
    if inside:
        warnings.warn(
            f"Parameters or buffers of the model share memory with perturbed weights ({inside[:3]}): while the noise is in, "
            "their entries of model.state_dict() hold it (only the perturbed weights' own entries are given clean). Save "
            "checkpoints outside opt.perturbed() and after the backward.",
            stacklevel=3,
        )


def _weights(targets: Sequence) -> List[Tuple[str, torch.Tensor]]:
    return [(t.name, w) for t in targets if (w := _local(t.weight)) is not None]
