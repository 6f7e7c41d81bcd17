"""Where Flat-LoRA's GPU time goes, per step, on the benchmark's GPU model (see step_time.py).

Times, for all 112 LoRA-wrapped weights of the 1 B Llama: the row stds; W + e formed twice (virtual
mode's forward and backward); a plain copy of every weight twice (the memory-bandwidth reference);
and in-place perturb and restore separately.

    python benchmarks/profile_gpu_overhead.py
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.step_time import CONFIGS, build_model
from flatlora_optim import FlatLoRA


def timed(fn, reps=10):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - start) * 1000)
    return statistics.median(out)


def main() -> None:
    model = build_model(CONFIGS["gpu"], torch.device("cuda"))
    params = [p for p in model.parameters() if p.requires_grad]
    flat = FlatLoRA(torch.optim.AdamW(params), model, rho=0.05, schedule="constant", mode="virtual")
    perturber = flat._perturber
    targets = flat.targets
    weights = [t.weight for t in targets]
    print(f"{len(targets)} targets, {sum(w.numel() for w in weights) / 1e6:.1f} M params")
    print(f"row stds, all layers:            {timed(lambda: [perturber.describe(t, 0.05, 0) for t in targets]):8.2f} ms")
    ps = [perturber.describe(t, 0.05, 0) for t in targets]
    for p in ps:
        perturber.perturbed_rows(p)  # seeds on the device
    print(f"W+e formed twice, all layers:    {timed(lambda: [perturber.perturbed_rows(p) for p in ps for _ in range(2)]):8.2f} ms")
    print(f"clone twice, all layers (floor): {timed(lambda: [w.clone() for w in weights for _ in range(2)]):8.2f} ms")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        [perturber.describe(t, 0.05, 0) for t in targets[:14]]
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
    inplace = FlatLoRA(torch.optim.AdamW(params), model, rho=0.05, schedule="constant", restore="backup")
    print(f"in-place perturb (backup):       {timed(lambda: (inplace.perturb(), inplace.restore())):8.2f} ms (perturb+restore)")


if __name__ == "__main__":
    main()
