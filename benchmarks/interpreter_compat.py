"""Workarounds for running the Triton kernels in Triton 3.6's interpreter (``TRITON_INTERPRET=1``) with NumPy 2.

- The interpreter turns a scalar into an int with ``int(array)``, which NumPy 2 refuses for its one-element 1-D
  arrays; a ``range`` over a value loaded in a kernel (the row-std kernel's column loop) hits it.
- Its ``tl.dot`` multiplies bfloat16 operands as their raw 16-bit patterns (NumPy has no bfloat16), so the
  row-std kernel's tensor-core form gave nonsense for bfloat16 weights there; it now widens them to float32
  first, which is exact.

Used by ``tests/triton_interpreter_checks.py`` and by the benchmarks' smoke runs under the interpreter.
"""

from __future__ import annotations

import numpy as np


def patch_interpreter() -> None:
    """Give the interpreter's tensors an ``__index__`` that reads their one element, and make its ``tl.dot``
    take bfloat16 operands by value (idempotent)."""
    import triton.runtime.interpreter as interpreter

    if getattr(interpreter._patch_lang_tensor, "_flatlora_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patch_lang_tensor._flatlora_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor
    _patch_bfloat16_dot(interpreter)


def _patch_bfloat16_dot(interpreter) -> None:  # type: ignore[no-untyped-def]
    import triton.language as tl

    original = interpreter.InterpreterBuilder.create_dot

    def widened(handle):  # type: ignore[no-untyped-def]
        if handle.dtype.scalar != tl.bfloat16:
            return handle.data
        return (handle.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # a bfloat16's bits are a float32's top half

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        return interpreter.TensorHandle(np.matmul(widened(a), widened(b), dtype=d.data.dtype) + d.data, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot
