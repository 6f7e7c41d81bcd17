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
    flat = FlatLoRA(torch.optim.AdamW(params), model, rho=0.05, schedule="constant")
    perturber = flat._perturber
    targets = flat.targets
    weights = [t.weight for t in targets]
    print(f"{len(targets)} targets, {sum(w.numel() for w in weights) / 1e6:.1f} M params")
    print(f"row stds + seeds, all layers:    {timed(lambda: perturber.describe_all(targets, 0.05, 0)):8.2f} ms")
    ps, _ = perturber.describe_all(targets, 0.05, 0)
    print(f"W+e formed twice, all layers:    {timed(lambda: [perturber.perturbed_rows(p) for p in ps for _ in range(2)]):8.2f} ms")
    print(f"clone twice, all layers (floor): {timed(lambda: [w.clone() for w in weights for _ in range(2)]):8.2f} ms")
    print(f"in-place exact perturb+restore:  {timed(lambda: (flat.perturb(), flat.restore())):8.2f} ms")
    host = []
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        flat.perturb()
        middle = time.perf_counter()
        flat.restore()
        host.append(((middle - start) * 1000, (time.perf_counter() - middle) * 1000))
        torch.cuda.synchronize()
    print(f"host time: perturb {statistics.median(h[0] for h in host):.2f} ms, restore {statistics.median(h[1] for h in host):.2f} ms")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        flat.perturb()
        flat.restore()
        [perturber.perturbed_rows(p) for p in ps]  # virtual mode's W + e, once per layer
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
