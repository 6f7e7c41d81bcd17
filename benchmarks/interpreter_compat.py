"""A workaround for running the Triton kernels in Triton 3.6's interpreter (``TRITON_INTERPRET=1``) with NumPy 2.

The interpreter turns a scalar into an int with ``int(array)``, which NumPy 2 refuses for its one-element 1-D
arrays; a ``range`` over a value loaded in a kernel (the row-std kernel's column loop) hits it. Used by
``tests/triton_interpreter_checks.py`` and by the benchmarks' smoke runs under the interpreter.
"""

from __future__ import annotations

import numpy as np


def patch_interpreter_scalars() -> None:
    """Give the interpreter's tensors an ``__index__`` that reads their one element (idempotent)."""
    import triton.runtime.interpreter as interpreter

    if getattr(interpreter._patch_lang_tensor, "_flatlora_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patch_lang_tensor._flatlora_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor
