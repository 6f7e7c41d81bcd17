"""Host (Python) time of one perturb and one restore on the CUDA step-wide path, on any machine.

On the GPU, perturb and restore queue a handful of kernel launches for the whole step; what the
host spends around them (reading each layer's weight and adapters, building the step's tables,
installing the while-perturbed guards) decides how soon the GPU gets its first launch, and with
exact restore how long it idles after the step's one sync. This script times that host work alone:
the Triton kernel is replaced by a stub that launches nothing, so it runs on a CPU, and the model is
the GPU benchmark's Llama (16 blocks, LoRA on all seven projections: 112 layers) at a tiny width, so
the Python work per layer is the real one.

    python benchmarks/host_time.py [--reps 200] [--profile] [--json out.json]
    python benchmarks/host_time.py --steps [--reps 30] [--profile]

``--steps`` times whole training steps instead (forward, backward, AdamW, on the same tiny-width model, one thread,
process time, the methods taking turns round by round): plain LoRA against each method, so the difference is
Flat-LoRA's host work per step, the per-layer work of the rerouted forward and backward (virtual) and of the
guards' hooks (in-place) included; the stub's ``W + e`` is a copy of ``W``.

Reports the median host milliseconds of ``perturb()`` and of ``restore()`` for in-place exact and
backup restore, and for virtual mode (whose ``perturb()`` is what a step does before its first launch: row
stds, seeds, the rerouted forwards). The stub's ``row_stds`` still builds the adapter table (host work the real kernel
does); its perturb pass runs ``while_waiting`` as the real one does before its host sync. The figures
are a lower bound: the real kernel's own host work (its checks, the record's buffers, Triton's launcher
for each launch, backup's copies, exact's sync) is left out.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

import torch

METHODS = ("flat-exact", "flat-backup", "flat-virtual")  # step_time's methods: in-place exact or backup; virtual mode (its perturb: stds, seeds, patches)


class _Record:
    """What the stub's exact perturb pass returns: no buffers."""

    def layer_nbytes(self, tiles: int) -> int:
        return 0


class StubKernel:
    """The grouped interface of ``TritonNoiseKernel``, doing the host work only."""

    name = "triton"
    takes_device_seeds = True

    def row_stds(self, table, adapters, std_scales, out) -> None:
        table.adapter_tables(adapters, std_scales)
        out.fill_(1e-3)

    def fused_exact_supported(self, dtype: torch.dtype) -> bool:
        return dtype in (torch.bfloat16, torch.float16)

    def add_noise_layers(self, table, std, seeds) -> None:
        pass

    def exact_perturb_layers(self, table, std, seeds, while_waiting=None, step=None, sigma=None) -> _Record:
        if while_waiting is not None:
            while_waiting()
        return _Record()

    def exact_restore_layers(self, table, std, seeds, record, only_layer: int = -1) -> None:
        pass

    def settle_counts(self, table, wait: bool) -> None:
        pass

    def layer_former(self, rows, std_rows, seeds, rows_per_block, work):
        """Virtual mode's per-layer ``W + e``: a copy of ``W`` (the real kernel's launch is not host work here)."""
        return lambda: rows.clone()


@contextmanager
def stub_kernel(stub: Optional[StubKernel] = None) -> Iterator[StubKernel]:
    """Every CUDA-path decision sees ``stub`` (a new :class:`StubKernel` by default) as the device's kernel."""
    import flatlora_optim.noise as noise
    import flatlora_optim.perturbation as perturbation

    stub = StubKernel() if stub is None else stub
    saved = noise.kernel_for, perturbation.kernel_for
    noise.kernel_for = perturbation.kernel_for = lambda device: stub
    try:
        yield stub
    finally:
        noise.kernel_for, perturbation.kernel_for = saved


def build_model(layers: int = 16):
    """The GPU benchmark's model (``step_time.build_model``: Llama, LoRA r=8 on all seven projections) at
    width 64, bf16."""
    from step_time import build_model as build

    return build(dict(hidden=64, layers=layers, mlp=128, vocab=128, heads=4, seq=64, dtype="bfloat16"), torch.device("cpu"))


def run(reps: int = 200, layers: int = 16, profile: bool = False) -> Dict:
    from step_time import make_method

    model = build_model(layers)
    params = [p for p in model.parameters() if p.requires_grad]
    results: Dict[str, Dict] = {}
    with stub_kernel():
        for method in METHODS:
            _, flat, _ = make_method(method, model, params)
            name = method.split("-", 1)[1]  # reported as exact, backup, virtual
            for _ in range(5):
                flat.perturb()
                flat.restore()
            perturb_ms: List[float] = []
            restore_ms: List[float] = []
            for _ in range(reps):
                start = time.perf_counter()
                flat.perturb()
                middle = time.perf_counter()
                flat.restore()
                perturb_ms.append((middle - start) * 1e3)
                restore_ms.append((time.perf_counter() - middle) * 1e3)
            results[name] = {"layers": len(flat.targets), "perturb_ms": statistics.median(perturb_ms), "restore_ms": statistics.median(restore_ms)}
            print(f"{name:<7} {len(flat.targets)} layers: host perturb {results[name]['perturb_ms']:.3f} ms, "
                  f"restore {results[name]['restore_ms']:.3f} ms", flush=True)
            if profile:
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(50):
                    flat.perturb()
                    flat.restore()
                profiler.disable()
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
                print(text.getvalue())
    return {"reps": reps, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "results": results}


def run_steps(reps: int = 30, layers: int = 16, profile: bool = False, block: int = 5) -> Dict:
    """Median milliseconds of process time per training step, per method, over ``reps`` rounds in which every method
    runs ``block`` steps in turn (so that a change in the machine's load hits all methods alike). One thread: the
    process time is then the host's work, and on a shared machine it moves less than the wall time does."""
    from step_time import make_ids, make_method, make_step

    torch.set_num_threads(1)
    cfg = dict(batch=1, seq=8, vocab=128)
    model = build_model(layers)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = make_ids(cfg, torch.device("cpu"))
    results: Dict[str, Dict] = {}
    with stub_kernel():
        steps = {}
        for method in ("lora",) + METHODS:
            base, flat, reference = make_method(method, model, params)
            steps[method] = make_step(model, ids, base, flat, reference)
            for _ in range(3):
                steps[method]()
        times: Dict[str, List[float]] = {method: [] for method in steps}
        for _ in range(reps):
            for method, step in steps.items():
                start = time.process_time()
                for _ in range(block):
                    step()
                times[method].append((time.process_time() - start) * 1e3 / block)
        for method, values in times.items():
            results[method] = {"ms_per_step": statistics.median(values), "ms_rounds": values}
            extra = results[method]["ms_per_step"] - results["lora"]["ms_per_step"]
            print(f"{method:<12} {results[method]['ms_per_step']:7.3f} ms per step (+{extra:.3f} ms over plain LoRA)", flush=True)
            if profile and method != "lora":
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(block):
                    steps[method]()
                profiler.disable()
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
                print(text.getvalue())
    return {"reps": reps, "block": block, "layers": layers, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "steps": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="also print the functions with the most host time")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--steps", action="store_true", help="time whole training steps (plain LoRA against each method) instead")
    args = parser.parse_args()
    summary = run_steps(args.reps, profile=args.profile) if args.steps else run(args.reps, profile=args.profile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
