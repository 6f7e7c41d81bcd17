"""Where a training step leaves the GPU idle: plain LoRA vs Flat-LoRA, from the device's own timeline.

``step_time.py`` shows that a Flat-LoRA step takes longer on the wall clock than its GPU work
(``--gpu-busy``): the difference is time in which the GPU waits for the host. This script finds where.
It records the kernels of a few steps with ``torch.profiler`` (CUDA activity only: CUPTI timestamps,
no host-side tracing that would slow the host down) and reports, per step, the GPU's busy time (union
of kernel and copy intervals), its idle time, and the idle time's parts:

* ``start``: from a marker kernel queued right after the previous step's synchronisation to the
  step's first kernel -- what a loop that syncs every step (``loss.item()``) pays for the host's work
  before its first launch;
* ``next to <kernel>``: idle gaps of 20 us or more just before one of Flat-LoRA's kernels (the host was
  busy issuing it), summed by kernel name;
* ``other``: the rest.

Two ways to run the steps: ``synced`` (a device synchronisation between steps, like ``step_time``'s
per-step timing) and ``back-to-back`` (no synchronisation; the marker then only opens the block).

    python benchmarks/gpu_idle.py [--methods lora,flat-virtual,flat-exact] [--steps 4] [--json out.json]

The model and the methods are ``step_time.py``'s GPU configuration (1 B Llama, bf16, LoRA r=8 on all
seven projections, batch 8 x 1024). CUDA only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from typing import Dict, List, Tuple

import torch

GAP_US = 20.0  # idle gaps shorter than this are launch latency, counted in "other"
OUR_KERNELS = ("_noise_kernel", "_row_std_kernel", "_codec_kernel", "_exceptions_kernel")


def _intervals(prof) -> List[Tuple[float, float, str]]:
    """``(start_us, end_us, name)`` of every device activity, in start order."""
    out = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            out.append((event.time_range.start, event.time_range.end, event.name))
    return sorted(out)


def _is_marker(name: str) -> bool:
    return "spin" in name.lower() or "sleep" in name.lower()


def split_idle(intervals: List[Tuple[float, float, str]]) -> List[Dict]:
    """One dict per step (steps open with a marker kernel): busy, idle, and the idle time's parts (ms)."""
    steps: List[List[Tuple[float, float, str]]] = []
    for interval in intervals:
        if _is_marker(interval[2]):
            steps.append([interval])
        elif steps:
            steps[-1].append(interval)
    out = []
    for step in steps:
        marker, kernels = step[0], step[1:]
        if not kernels:
            continue
        parts: Dict[str, float] = defaultdict(float)
        parts["start"] = max(0.0, kernels[0][0] - marker[1])
        busy, end = 0.0, kernels[0][0]
        for start, stop, name in kernels:
            gap = start - end
            if gap > 0:
                ours = next((k for k in OUR_KERNELS if k in name), None)
                parts[f"next to {ours}" if ours and gap >= GAP_US else "other"] += gap
            busy += max(0.0, stop - max(start, end))
            end = max(end, stop)
        span = end - marker[1]
        out.append({"span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_ms": (span - busy) / 1e3,
                    "idle_parts_ms": {k: round(v / 1e3, 3) for k, v in sorted(parts.items())}})
    return out


def profile_steps(step, n: int, synced: bool) -> List[Dict]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            if synced or i == 0:
                torch.cuda.synchronize()
                torch.cuda._sleep(1000)  # the step's marker: runs at once, the GPU being idle
            step()
        torch.cuda.synchronize()
    steps = split_idle(_intervals(prof))
    if not synced:  # one marker for the block: report the block per step
        return [{key: ({k: v / n for k, v in value.items()} if isinstance(value, dict) else value / n) for key, value in steps[0].items()}]
    return steps


def main() -> None:
    from step_time import CONFIGS, build_model, make_ids, make_method, make_step

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lora,flat-virtual,flat-exact")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = CONFIGS["gpu"]
    device = torch.device("cuda")
    model = build_model(cfg, device)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    ids = make_ids(cfg, device)
    results: Dict[str, Dict] = {}
    for method in args.methods.split(","):
        base, flat, reference = make_method(method, model, lora_params)
        step = make_step(model, ids, base, flat, reference)
        for _ in range(cfg["warmup"]):
            step()
        results[method] = {"synced": profile_steps(step, args.steps, True), "back_to_back": profile_steps(step, args.steps, False)}
        for how, steps in results[method].items():
            med = {key: statistics.median(s[key] for s in steps) for key in ("span_ms", "busy_ms", "idle_ms")}
            parts: Dict[str, List[float]] = defaultdict(list)
            for s in steps:
                for k, v in s["idle_parts_ms"].items():
                    parts[k].append(v)
            shown = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in parts.items())
            print(f"{method:<13} {how:<12} span {med['span_ms']:8.2f} ms  busy {med['busy_ms']:8.2f}  idle {med['idle_ms']:6.2f}  ({shown})", flush=True)
    if args.json:
        summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                   "steps": args.steps, "gap_us": GAP_US, "results": results}
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
