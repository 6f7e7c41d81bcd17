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
