"""The CUDA kernels' logic on CPU through Triton's interpreter (see ``triton_interpreter_checks.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_cuda_kernels_restore_bitwise_under_the_triton_interpreter():
    """Grouped exact codec (every compiled form, overflow and redo, one-layer restore, special values,
    hypothesis-drawn shapes and noise scales), codec = noise kernel, row stds = formula, FlatLoRA steps
    through the step-wide group in both modes."""
    pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(HERE / "triton_interpreter_checks.py")], env=env, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    assert "triton interpreter checks passed" in result.stdout


def test_codec_kernels_take_their_varying_sizes_unspecialised():
    """Triton compiles a kernel again for each new pattern (== 1, multiple of 16) of an integer
    argument; the codec's buffer capacities and slot counts change every step, so they must be
    plain runtime arguments (tests/test_gpu.py checks on a GPU that no recompile happens)."""
    pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it)")
    from flatlora_optim.kernels import triton_noise

    for kernel, names in [(triton_noise._codec_kernel, {"word_capacity", "exc_capacity"}),
                          (triton_noise._exceptions_kernel, {"n_slots", "only_layer"})]:
        unspecialised = {p.name for p in kernel.params if p.do_not_specialize}
        assert names <= unspecialised, (kernel.fn.__name__, unspecialised)


def test_launch_arithmetic_matches_tritons_helpers():
    """The launch code's own ``cdiv`` and ``next_power_of_2`` (``triton.cdiv`` and ``triton.next_power_of_2``
    are Triton-decorated functions costing microseconds of host time per call) give Triton's values."""
    triton = pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it)")
    from flatlora_optim.kernels.triton_noise import _cdiv, _next_power_of_2

    for n in range(1, 3000):
        assert _next_power_of_2(n) == triton.next_power_of_2(n), n
    for n in range(0, 3000, 7):
        for d in (1, 3, 4, 16, 248, 682, 2048):
            assert _cdiv(n, d) == triton.cdiv(n, d), (n, d)
