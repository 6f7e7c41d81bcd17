"""The device context the library's own tensor work runs in, whatever the caller's.

Triton launches its kernels on the *current* CUDA device, whatever the tensors' device. PyTorch's own
operators follow their tensors; a model moved with ``model.to("cuda:1")`` while device 0 is current would
have its noise kernels launched on device 0 (an illegal memory access). Every launch of this library
therefore runs under :func:`made_current` of its weights' device.

A perturb or restore can also run inside the user's ``torch.autocast`` region (a ``backward()`` after the
block restores from its end callback; a loop may enter the block under autocast). Autocast would run the
row norms' products in bf16/fp16 (other stds than outside it, so virtual and in-place mode would differ) and
refuses some operators outright (``torch.cat`` of float16 tensors under CPU bfloat16 autocast), which once left
weights noisy. :func:`autocast_off` turns it off for the library's work; the model's forward keeps it.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

__all__ = ["autocast_off", "made_current"]

_AUTOCAST_DEVICES = ("cpu", "cuda")


def made_current(device: torch.device) -> ContextManager[Any]:
    """``torch.cuda.device(device)`` when ``device`` is a CUDA device other than the current one; else a no-op."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))  # torch >= 2.4
    except TypeError:
        return bool(torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled())


_OFF = contextlib.nullcontext()


def autocast_off() -> ContextManager[Any]:
    """Autocast disabled on every device type where it is on (a no-op, and no context entered, when it is off).
    Enters the contexts when called: use it directly in a ``with``."""
    enabled = [kind for kind in _AUTOCAST_DEVICES if _autocast_enabled(kind)]
    if not enabled:
        return _OFF
    stack = contextlib.ExitStack()
    for kind in enabled:
        stack.enter_context(torch.autocast(kind, enabled=False))
    return stack
