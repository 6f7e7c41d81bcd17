"""Where a warning should point: the first line outside this library and the frameworks that call into it.

A warning raised inside ``FlatLoRA.step()`` is reached through torch's step wrapper, and, depending on the loop,
through an LR scheduler's wrapper of it, ``GradScaler.step`` or accelerate's optimizer. A fixed ``stacklevel`` points
into one of those for all loops but one; this walks the stack instead.
"""

from __future__ import annotations

import os
import sys
from typing import Tuple

__all__ = ["stacklevel_outside"]

_FRAMEWORKS = ("torch", "accelerate")  # packages whose frames lie between the user's line and the library


def _package_dirs() -> Tuple[str, ...]:
    dirs = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
    for name in _FRAMEWORKS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            dirs.append(os.path.dirname(os.path.abspath(module.__file__)) + os.sep)
    return tuple(dirs)


def stacklevel_outside() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function that calls this one: that of the nearest frame
    outside this package, torch and accelerate (1 would be that function itself)."""
    inside = _package_dirs()
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame = frame.f_back
        level += 1
    return level
