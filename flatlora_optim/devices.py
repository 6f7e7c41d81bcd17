"""Triton launches its kernels on the *current* CUDA device, whatever the tensors' device.

PyTorch's own operators follow their tensors; a model moved with ``model.to("cuda:1")`` while device 0 is
current would have its noise kernels launched on device 0 (an illegal memory access). Every launch of this
library therefore runs under :func:`made_current` of its weights' device.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

__all__ = ["made_current"]


def made_current(device: torch.device) -> ContextManager[Any]:
    """``torch.cuda.device(device)`` when ``device`` is a CUDA device other than the current one; else a no-op."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
