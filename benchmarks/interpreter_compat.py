"""Workarounds for running the Triton kernels in Triton 3.6's interpreter (``TRITON_INTERPRET=1``) with NumPy 2.

- The interpreter turns a scalar into an int with ``int(array)``, which NumPy 2 refuses for its one-element 1-D
  arrays; a ``range`` over a value loaded in a kernel (the row-std kernel's column loop) hits it.
- Its ``tl.dot`` multiplies bfloat16 operands as their raw 16-bit patterns (NumPy has no bfloat16), so the
  row-std kernel's tensor-core form gave nonsense for bfloat16 weights there; it now widens them to float32
  first, which is exact.
- It casts float32 to bfloat16 by truncation, where the GPU rounds to nearest even (``cvt.rn.bf16.f32``), as torch
  does. Under truncation most bfloat16 elements became exceptions of the exact codec, so its bfloat16 fields went
  nearly untested in CI; the cast now rounds to nearest even (NaN stays NaN).

Used by ``tests/triton_interpreter_checks.py`` and by the benchmarks' smoke runs under the interpreter.
"""

from __future__ import annotations

import numpy as np


def patch_interpreter() -> None:
    """Give the interpreter's tensors an ``__index__`` that reads their one element, make its ``tl.dot`` take
    bfloat16 operands by value, and its float32 -> bfloat16 cast round to nearest even (idempotent)."""
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
    _patch_bfloat16_rounding(interpreter)


def _patch_bfloat16_rounding(interpreter) -> None:  # type: ignore[no-untyped-def]
    import triton.language as tl

    original = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):  # type: ignore[no-untyped-def]
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return original(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # to nearest, ties to even (a carry moves into the exponent)
        out = np.where(np.isnan(src.data), (bits >> 16) | 0x40, rounded).astype(np.uint16)  # a NaN stays a (quiet) NaN
        return interpreter.TensorHandle(out, dst_type.scalar)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


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
