"""Where a synchronised step's extra time goes: each phase's GPU span when the host starts from an idle GPU,
against the same phase's GPU work alone.

A loop that synchronises every step (``loss.item()`` for a log line) starts each step with an idle GPU: the
device waits for the host's first launch, and again wherever the host falls behind. This script times the
``step_time.py`` step of each method phase by phase with CUDA events recorded between the phases:

* ``synced``: after a synchronisation, as such a loop runs (the events' spans include the GPU's waits for the host);
* ``gpu work``: the same step queued behind a sleep kernel, so the host's launches are all issued before the GPU
  reaches them (the spans are the GPU's own work).

The difference per phase is the time the GPU waited for the host there. Phases: ``perturb`` (entering
``perturbed()``: row stds and the noise pass; empty for plain LoRA), ``forward``, ``backward`` (``loss.backward()``,
with exact restore's pass at its end and host restore's write-backs during it), ``step`` (``step()`` and
``zero_grad()``), ``copies`` (what the step left on host restore's copy stream). Also the host's own milliseconds
per phase in the synced steps. Medians over ``--steps``; CUDA only.

    PYTHONPATH=. python3 benchmarks/synced_phases.py [--config gpu] [--methods lora,flat-exact,flat-host] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import CONFIGS, GPU_BUSY_SLEEP_CYCLES, build_model, checksum, make_ids, make_method, make_step  # noqa: E402

PHASES = ("perturb", "forward", "backward", "step", "copies")


def phased_step(model, ids, base, flat, reference, method: str) -> Callable[[Callable[[str], None]], None]:
    """``step_time.py``'s step of ``method`` (its ``make_step``), calling ``mark(phase)`` at the end of each phase, and
    then once more after what the step left on host restore's copy stream."""
    from flatlora_optim.host_restore import copy_stream

    recorder: List[Callable[[str], None]] = [lambda phase: None]  # the current step's mark
    step = make_step(model, ids, base, flat, reference, held=method.endswith("-held"), released=method.endswith("-released"),
                     mark=lambda phase: recorder[0](phase))

    def run(mark: Callable[[str], None]) -> None:
        recorder[0] = mark
        step()
        torch.cuda.current_stream().wait_stream(copy_stream(ids.device))  # host restore's last write-backs
        mark("copies")

    return run


def time_phases(step: Callable[[Callable[[str], None]], None], busy: bool) -> Dict[str, float]:
    """One step: GPU milliseconds per phase (from CUDA events) and, when not ``busy``, host milliseconds per phase."""
    torch.cuda.synchronize()
    if busy:
        torch.cuda._sleep(GPU_BUSY_SLEEP_CYCLES)
    events = [torch.cuda.Event(enable_timing=True)]
    host = [time.perf_counter()]
    events[0].record()

    def mark(phase: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append(event)
        host.append(time.perf_counter())

    step(mark)
    torch.cuda.synchronize()
    out = {f"gpu_{p}": events[i].elapsed_time(events[i + 1]) for i, p in enumerate(PHASES)}
    out["gpu_total"] = events[0].elapsed_time(events[-1])
    out.update({f"host_{p}": (host[i + 1] - host[i]) * 1000 for i, p in enumerate(PHASES)})
    return out


def median_of(rows: List[Dict[str, float]]) -> Dict[str, float]:
    return {key: round(statistics.median(r[key] for r in rows), 3) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=[c for c in CONFIGS if c.startswith("gpu")], default="gpu")
    parser.add_argument("--methods", default="lora,flat-exact,flat-host")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg, device = CONFIGS[args.config], torch.device("cuda")
    model = build_model(cfg, device)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    ids = make_ids(cfg, device)
    clean = checksum(model)
    results: Dict[str, Dict] = {}
    methods = args.methods.split(",")
    for method in methods:
        base, flat, reference = make_method(method, model, lora_params)
        step = phased_step(model, ids, base, flat, reference, method)
        for _ in range(args.warmup):
            time_phases(step, busy=False)
        synced = median_of([time_phases(step, busy=False) for _ in range(args.steps)])
        busy = median_of([time_phases(step, busy=True) for _ in range(args.steps)])
        key = method if method not in results else f"{method} (again)"  # a method listed twice: drift over the run
        results[key] = {"synced": synced, "gpu_work": busy, "bitwise": checksum(model) == clean}
    print(f"{'method':12s} {'phase':9s} {'synced GPU span':>15s} {'GPU work':>9s} {'waiting':>8s} {'host':>7s}   (ms, medians)")
    for method, r in results.items():
        for phase in PHASES + ("total",):
            s, b = r["synced"][f"gpu_{phase}"], r["gpu_work"][f"gpu_{phase}"]
            host = r["synced"].get(f"host_{phase}", sum(r["synced"][f"host_{p}"] for p in PHASES))
            print(f"{method:12s} {phase:9s} {s:15.3f} {b:9.3f} {s - b:8.3f} {host:7.3f}")
        ratio = r["synced"]["gpu_total"] / results[methods[0]]["synced"]["gpu_total"]  # the first listed
        print(f"{method:12s} frozen weights bitwise: {r['bitwise']}; synced step {ratio:.3f}x {methods[0]}")
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "config": args.config, "steps": args.steps}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
