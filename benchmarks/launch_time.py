"""Host microseconds per layer of virtual mode's ``W + e``: Triton's launcher against the library's path around it.

Virtual mode forms ``fl(W + e)`` once per layer in forward and once in backward: 224 launches per step of
the 1 B Llama. Each costs host time, which the GPU sees only when it has run out of queued work (the
start of a step, or a loop that syncs every step). This script times, per layer, on the 1 B Llama of
``step_time.py --config gpu`` inside a virtual-mode ``perturbed()`` block, with the GPU kept busy by a
sleep kernel so that no launch waits for a free queue slot:

* ``triton``: the noise kernel's launch alone, its arguments computed beforehand (Triton's launcher);
* ``layer``: ``TritonNoiseKernel.perturbed_layer`` (the output's allocation, the launch's arguments, the launch);
* ``perturber``: ``Perturber.perturbed_rows``, what virtual mode's forward and backward call;
* ``forward``: the rerouted ``nn.Linear`` forward on a one-token input (autograd Function included),
  against ``F.linear`` on the same input (``linear``) and the module's own forward outside the block (``module``);
* ``step_first`` and ``step_repeat``: a step's first launch of each layer (what forward does, setting up the
  launch plan) and its second (what backward does), each pass in a new ``perturbed()`` block.

The rows above ``step_first`` repeat each call within one block, so from their second pass on they measure
repeated launches only.

    python benchmarks/launch_time.py [--reps 20] [--json out.json]

Median over ``reps`` passes of all 112 layers. CUDA only.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

SLEEP_CYCLES = 400_000_000  # about 0.2 s on an H200: longer than one timed pass of the host


def busy_gpu() -> None:
    """An idle GPU, then a sleep kernel queued: the launches timed next wait for no queue slot."""
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)


def per_layer_us(calls: List[Callable[[], object]], reps: int) -> float:
    """Median host microseconds per call over ``reps`` passes of ``calls``."""
    times = []
    for _ in range(reps):
        busy_gpu()
        start = time.perf_counter()
        for call in calls:
            call()
        times.append((time.perf_counter() - start) * 1e6 / len(calls))
    torch.cuda.synchronize()
    return statistics.median(times)


def first_and_repeated(flat, reps: int) -> Tuple[float, float]:
    """Host µs per layer of a step's first ``W + e`` launch (forward's) and of its second (backward's), each
    step a new ``perturbed()`` block, so that every first launch sets its plan up as in training."""
    first, repeated = [], []
    with torch.no_grad():
        for _ in range(reps):
            with flat.perturbed():
                perturber, ps = flat._perturber, flat._perturbations
                busy_gpu()
                start = time.perf_counter()
                for p in ps:
                    perturber.perturbed_rows(p)
                middle = time.perf_counter()
                for p in ps:
                    perturber.perturbed_rows(p)
                end = time.perf_counter()
                first.append((middle - start) * 1e6 / len(ps))
                repeated.append((end - middle) * 1e6 / len(ps))
            torch.cuda.synchronize()
    return statistics.median(first), statistics.median(repeated)


def main() -> None:
    from step_time import CONFIGS, build_model

    from flatlora_optim import FlatLoRA
    from flatlora_optim.kernels.triton_noise import _launch_args, _noise_kernel
    from flatlora_optim.noise import rows_per_chunk
    from flatlora_optim.restore import noise_dtype

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json")
    parser.add_argument("--profile", action="store_true", help="also print the host functions of the rerouted forward (cProfile)")
    args = parser.parse_args()
    cfg = CONFIGS["gpu"]
    model = build_model(cfg, torch.device("cuda"))
    flat = FlatLoRA(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model, rho=0.05, schedule="constant", mode="virtual")
    results: Dict[str, float] = {}
    with torch.no_grad(), flat.perturbed():
        perturber, ps = flat._perturber, flat._perturbations
        kernel = perturber._kernel(ps[0])
        launches = []
        for p in ps:
            rows = p.target.rows()
            out = torch.empty_like(rows)
            grid, launch_args, options = _launch_args(out, rows, p.scales(), perturber._device_seeds(p), rows.shape[0], rows.shape[1],
                                                      rows_per_chunk(rows.shape[1]), noise_dtype(rows.dtype))
            launches.append(lambda grid=grid, a=launch_args, o=options: _noise_kernel[grid](*a, **o))
        results["triton"] = per_layer_us(launches, args.reps)
        compiled = [launch() for launch in launches]  # the CompiledKernel of each launch
        try:  # Triton 3.x: a compiled kernel's own runner takes every parameter in order, no binding or cache lookup
            direct = []
            for launch, kernel_of in zip(launches, compiled):
                grid, a, o = launch.__defaults__
                values = dict(zip(_noise_kernel.arg_names, a), **o)
                direct.append(lambda k=kernel_of[(grid[0], 1, 1)], v=tuple(values[n] for n in _noise_kernel.arg_names): k(*v))
            results["compiled"] = per_layer_us(direct, args.reps)
        except Exception as error:  # another Triton: report what failed, keep the rest
            print(f"compiled runner not timed: {error!r}")
        del launches, compiled
        layer_calls = [lambda p=p: kernel.perturbed_layer(p.target.rows(), p.scales(), perturber._device_seeds(p), rows_per_chunk(p.target.shape[1]),
                                                          noise_dtype(p.target.weight.dtype)) for p in ps]
        results["layer"] = per_layer_us(layer_calls, args.reps)
        results["perturber"] = per_layer_us([lambda p=p: perturber.perturbed_rows(p) for p in ps], args.reps)
        with torch.enable_grad():  # as in training: the input requires grad, autograd records the Function
            owners = [(p.target.owner, torch.randn(1, p.target.shape[1], device="cuda", dtype=p.target.weight.dtype, requires_grad=True)) for p in ps]
            results["forward"] = per_layer_us([lambda m=m, x=x: m(x) for m, x in owners], args.reps)
            results["linear"] = per_layer_us([lambda m=m, x=x: F.linear(x, m.weight) for m, x in owners], args.reps)
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                per_layer_us([lambda m=m, x=x: m(x) for m, x in owners], 5)
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    with torch.enable_grad():  # the same modules outside the block: their own forward
        results["module"] = per_layer_us([lambda m=m, x=x: m(x) for m, x in owners], args.reps)
    results["step_first"], results["step_repeat"] = first_and_repeated(flat, args.reps)
    for name, us in results.items():
        print(f"{name:<10} {us:7.1f} us per layer", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                       "reps": args.reps, "us_per_layer": results}, f, indent=1)


if __name__ == "__main__":
    main()
