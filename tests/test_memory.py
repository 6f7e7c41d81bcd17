"""Temporaries stay bounded: perturbing a 50,000 x 4,096 layer allocates about 64 MiB at most.

Measured as the rise of the process's peak resident memory in a fresh subprocess, with glibc told
to return every large block to the OS (MALLOC_MMAP_THRESHOLD_), so the peak is the real one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from torch import nn
    from flatlora_optim import FlatLoRA, LoRALinear
    rows, dtype = int(sys.argv[1]), getattr(torch, sys.argv[2])
    layer = LoRALinear(nn.Linear(4096, rows, bias=False, dtype=dtype), r=8, alpha=16)
    nn.init.normal_(layer.lora_B, std=0.01)
    opt = FlatLoRA(torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1), nn.Sequential(layer), rho=0.1, schedule="constant")
    small = LoRALinear(nn.Linear(64, 64, dtype=dtype), r=2, alpha=4)  # warm the code path first
    warm = FlatLoRA(torch.optim.SGD([small.lora_A], lr=0.1), nn.Sequential(small), rho=0.1, schedule="constant")
    warm.perturb(); warm.restore()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    opt.perturb(); opt.restore()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024, opt.peak_restore_bytes, layer.weight.numel() * layer.weight.element_size())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and MALLOC_MMAP_THRESHOLD_ are Linux/glibc")
@pytest.mark.parametrize("rows, dtype", [(50_000, "bfloat16"), (12_000, "float32")])
def test_perturb_restore_temporaries_are_bounded(rows, dtype):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(rows), dtype], capture_output=True, text=True, env=env, check=True)
    peak_rise, restore_bytes, weight_bytes = map(float, out.stdout.split())
    temporaries = peak_rise - restore_bytes
    assert temporaries <= 64 * 2**20 * 1.1, f"{temporaries / 2**20:.1f} MiB of temporaries"
    assert restore_bytes <= 0.10 * weight_bytes  # the exact-restore record, held until restore
