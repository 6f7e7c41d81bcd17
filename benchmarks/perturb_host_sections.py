"""Where the host time of one in-place ``perturb()`` + ``restore()`` goes, section by section, and when each starts.

In a loop that synchronises every step (``loss.item()`` for a log line), the GPU is idle from the step's start until
the host issues its first launch, and in-place exact restore's noise pass can only start once the host has read every
layer's weight and adapters, built the step's tables and launched the row stds. This script wraps the library's entry
points on that path with ``time.perf_counter`` (no profiler: real times, a few microseconds of wrapper cost per call),
runs ``perturb()`` + ``restore()`` between two synchronisations, and prints for each entry point its inclusive host
time, its number of calls, and how long after ``perturb()`` began it was first entered (medians over ``--reps``).
``Kernel._exact``'s start is the noise pass's launch.

    PYTHONPATH=. python benchmarks/perturb_host_sections.py [--method flat-exact] [--reps 10]    # CUDA: step_time's 1 B Llama
    PYTHONPATH=. python benchmarks/perturb_host_sections.py --stub [--reps 200]                   # any machine: host_time's stub

``--cold`` forgets the last step's reads before each ``perturb()`` (:class:`flatlora_optim.steady.SteadyReads`), so that
every layer is read and checked anew, as at a step after a change to the model.

``--stub`` runs the CUDA step-wide path's host work on the CPU with ``host_time.py``'s stub kernel (no launches, its
tiny-width Llama of 112 layers), so entries of the real kernel (``Kernel._exact``, the record) are missing there and
``Kernel.exact_perturb_layers`` stands for the launch.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_host_profile import PhaseTimer  # noqa: E402


def entry_points(flat: Any, kernel_class: type) -> List[Tuple[Any, str, str]]:
    """The entry points of the in-place path, in the order a step reaches them, as ``PhaseTimer`` entries."""
    import flatlora_optim.grouped as grouped
    import flatlora_optim.guards as guards
    import flatlora_optim.optimizer as optimizer
    import flatlora_optim.perturbation as perturbation
    import flatlora_optim.targets as targets

    entries: List[Tuple[Any, str, str]] = [(type(flat), name, f"FlatLoRA.{name}") for name in ("_apply_noise", "_add_noise", "_restore_now")]
    import flatlora_optim.steady as steady

    entries += [(steady.SteadyReads, "unchanged", "SteadyReads.unchanged")]
    entries += [(optimizer, name, name) for name in ("claim", "release", "_check_one_device")]
    entries += [(targets.LoRATarget, "check", "Target.check"), (targets.LoRATarget, "adapters", "Target.adapters")]
    entries += [(perturbation.Perturber, name, f"Perturber.{name}")
                for name in ("_perturb_all", "_describe_all", "describe_all", "_fusable", "_groupable", "_restore_all")]
    entries += [(grouped.StepGroup, name, f"StepGroup.{name}") for name in ("__init__", "perturb", "restore_all")]
    entries += [(grouped.TableCache, "get", "TableCache.get")]
    entries += [(grouped, name, name) for name in ("_adapter_args", "noise_seeds", "to_device")]
    entries += [(guards.PerturbationGuards, "__init__", "Guards.__init__"), (guards.PerturbationGuards, "remove", "Guards.remove")]
    entries += [(kernel_class, name, f"Kernel.{name}")
                for name in ("row_stds", "exact_perturb_layers", "_perturb_without_waiting", "settle_counts", "_exact", "exact_restore_layers")]
    return entries


@contextlib.contextmanager
def subject(method: str, stub: bool) -> Iterator[Tuple[Any, type, Callable[[], None]]]:
    """``(FlatLoRA, its kernel's class, sync)`` on step_time's 1 B Llama (CUDA) or host_time's stub set-up (``stub``)."""
    from step_time import CONFIGS, build_model, make_ids, make_method, make_step

    if stub:
        import host_time

        model = host_time.build_model()
        with host_time.stub_kernel():
            _, flat, _ = make_method(method, model, [p for p in model.parameters() if p.requires_grad])
            yield flat, host_time.StubKernel, lambda: None
        return
    from flatlora_optim.kernels.triton_noise import TritonNoiseKernel

    device = torch.device("cuda")
    cfg = CONFIGS["gpu"]
    model = build_model(cfg, device)
    base, flat, reference = make_method(method, model, [p for p in model.parameters() if p.requires_grad])
    step = make_step(model, make_ids(cfg, device), base, flat, reference)
    for _ in range(3):  # compiled kernels, the record's sizes, the caching allocator's blocks
        step()
    yield flat, TritonNoiseKernel, torch.cuda.synchronize


def run(method: str = "flat-exact", reps: int = 10, stub: bool = False, cold: bool = False) -> Dict[str, Any]:
    """``cold``: every ``perturb()`` reads and checks the layers anew (the last step's reads forgotten first), as a step
    after a change to the model does, and as every step did before ``SteadyReads``."""
    with subject(method, stub) as (flat, kernel_class, sync):
        for _ in range(3):
            flat.perturb()
            flat.restore()
        spent: Dict[str, List[float]] = collections.defaultdict(list)
        first: Dict[str, List[float]] = collections.defaultdict(list)
        calls: Dict[str, int] = {}
        host, synced = [], []
        with PhaseTimer(entry_points(flat, kernel_class)) as clock:
            for _ in range(reps):
                sync()
                if cold:
                    flat._steady.forget()
                clock.start()
                flat.perturb()
                flat.restore()
                host.append((time.perf_counter() - clock.zero) * 1e3)
                sync()
                synced.append((time.perf_counter() - clock.zero) * 1e3)
                for label, seconds in clock.totals.items():
                    spent[label].append(seconds * 1e3)
                    first[label].append(clock.first[label])
                    calls[label] = clock.calls[label]
    sections = sorted(({"entry": label, "host_ms": statistics.median(spent[label]), "calls": calls[label],
                        "first_at_ms": statistics.median(first[label])} for label in spent), key=lambda s: s["first_at_ms"])
    return {"method": method, "stub": stub, "cold": cold, "reps": reps, "host_ms": statistics.median(host), "synced_ms": statistics.median(synced),
            "sections": sections}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="flat-exact", choices=("flat-exact", "flat-backup", "flat-host"))
    parser.add_argument("--reps", type=int, default=None, help="perturb()+restore() pairs timed (default 10 on CUDA, 200 with --stub)")
    parser.add_argument("--stub", action="store_true", help="the host work only, on any machine (host_time.py's stub kernel)")
    parser.add_argument("--cold", action="store_true", help="read and check every layer anew at each perturb() (a step after a change)")
    args = parser.parse_args()
    result = run(args.method, args.reps or (200 if args.stub else 10), args.stub, args.cold)
    label = (" (stub kernel)" if result["stub"] else "") + (" (cold: layers read anew)" if result["cold"] else "")
    print(f"{result['method']}{label}: perturb()+restore() {result['host_ms']:.2f} ms of host time, "
          f"{result['synced_ms']:.2f} ms to the end of the GPU work (medians of {result['reps']})")
    for s in result["sections"]:
        print(f"{s['entry']:<34} {s['host_ms']:8.3f} ms  x{s['calls']:<5d} first entered at {s['first_at_ms']:7.3f} ms")


if __name__ == "__main__":
    main()
