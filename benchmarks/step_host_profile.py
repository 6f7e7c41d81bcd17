"""Where a training step's host (Python) time goes: plain LoRA against each Flat-LoRA method, with cProfile.

When a model is small enough that the GPU finishes a step before the host has issued the next one, the
step takes as long as its host work, and every millisecond of Python that Flat-LoRA adds shows in full
(``step_time.py --config gpu-small``). This script runs ``step_time``'s steps back to back and reports,
per method:

* ``ms_per_step``: wall milliseconds per step over a block of steps with no synchronisation in between
  (median of a few blocks), as ``step_time``'s back-to-back figure;
* ``phases``: the host milliseconds per step spent inside a few library entry points, timed with
  ``time.perf_counter`` around each call over one more block (no profiler: these are real times). Nested
  entries overlap: ``former`` runs inside the rerouted forward;
* the functions of ``flatlora_optim`` with the most cumulative host time per step (cProfile over one more
  block; the profiler's own cost inflates the figures, Python-heavy ones most, so read them as shares).

    python benchmarks/step_host_profile.py [--config gpu-small] [--methods lora,flat-exact,flat-virtual] [--steps 20]

CUDA configurations need a GPU; ``--config cpu`` runs anywhere.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import importlib
import io
import json
import pstats
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from step_time import CONFIGS, build_model, config_device, make_ids, make_method, make_step, sync


def library_rows(profiler: cProfile.Profile, steps: int, limit: int) -> List[Dict]:
    """The ``flatlora_optim`` functions with the most cumulative time, in ms per step."""
    stats = pstats.Stats(profiler)
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "flatlora_optim" in path:
            where = path[path.index("flatlora_optim"):]
            rows.append({"function": f"{where}:{line}({name})", "calls_per_step": calls / steps,
                         "own_ms_per_step": own * 1e3 / steps, "cumulative_ms_per_step": cumulative * 1e3 / steps})
    rows.sort(key=lambda r: -r["cumulative_ms_per_step"])
    return rows[:limit]


PHASES = [
    ("flatlora_optim.optimizer", "FlatLoRA", "_apply_noise"),
    ("flatlora_optim.optimizer", "FlatLoRA", "_restore_now"),
    ("flatlora_optim.optimizer", "FlatLoRA", "step"),
    ("flatlora_optim.optimizer", "FlatLoRA", "zero_grad"),
    ("flatlora_optim.virtual", "NoisyLinearFunction", "forward"),
    ("flatlora_optim.virtual", "NoisyLinearFunction", "backward"),
    ("flatlora_optim.perturbation", "Perturber", "former"),
    ("flatlora_optim.guards", "PerturbationGuards", "_forward_hook"),
]


class PhaseTimer:
    """Wraps functions and methods with a ``perf_counter`` total, a call count and the time each was first entered
    (after :meth:`start`) while active; ``perturb_host_sections.py`` uses it for its own entry points.

    ``entries`` are ``(owner, attribute, label)``, owner a class or module; an attribute the owner does not define
    itself is skipped (older code). By default the :data:`PHASES` methods."""

    def __init__(self, entries: Optional[Sequence[Tuple[Any, str, str]]] = None) -> None:
        self.entries = list(entries) if entries is not None else [
            (getattr(importlib.import_module(module_name), class_name), attribute, f"{class_name}.{attribute}")
            for module_name, class_name, attribute in PHASES]
        self.totals: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}
        self.first: Dict[str, float] = {}  # ms after start() when each was first entered
        self.zero = time.perf_counter()
        self._saved: List = []

    def start(self) -> None:
        """Forget what was timed so far; first entries count from now."""
        self.totals.clear()
        self.calls.clear()
        self.first.clear()
        self.zero = time.perf_counter()

    def __enter__(self) -> PhaseTimer:
        for owner, attribute, label in self.entries:
            raw = owner.__dict__.get(attribute)
            if raw is None:
                continue
            function = raw.__func__ if isinstance(raw, staticmethod) else raw
            self._saved.append((owner, attribute, raw))
            setattr(owner, attribute, self._timed(label, function, isinstance(raw, staticmethod)))
        return self

    def _timed(self, label: str, function, static: bool):
        totals, calls, first = self.totals, self.calls, self.first

        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            first.setdefault(label, (start - self.zero) * 1e3)
            try:
                return function(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - start
                calls[label] = calls.get(label, 0) + 1

        return staticmethod(timed) if static else timed

    def __exit__(self, *exc) -> None:
        for owner, attribute, raw in reversed(self._saved):
            setattr(owner, attribute, raw)
        self._saved.clear()

    def per_step(self, steps: int) -> Dict[str, Dict[str, float]]:
        return {label: {"ms_per_step": total * 1e3 / steps, "calls_per_step": self.calls[label] / steps} for label, total in self.totals.items()}


def run(cfg_name: str, methods: List[str], steps: int, blocks: int, limit: int) -> Dict:
    cfg = CONFIGS[cfg_name]
    device = config_device(cfg_name)
    model = build_model(cfg, device)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    ids = make_ids(cfg, device)
    results: Dict[str, Dict] = {}
    for method in methods:
        base, flat, reference = make_method(method, model, lora_params)
        step = make_step(model, ids, base, flat, reference)
        for _ in range(cfg["warmup"]):
            step()
        sync(device)
        times = []
        for _ in range(blocks):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            times.append((time.perf_counter() - start) * 1e3 / steps)
        with PhaseTimer() as timer:
            for _ in range(steps):
                step()
            sync(device)
        phases = timer.per_step(steps)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            step()
        sync(device)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        results[method] = {"ms_per_step": statistics.median(times), "ms_blocks": times, "phases": phases, "library": library_rows(profiler, steps, limit),
                           "top_own_time": text.getvalue()}
        print(f"{method:<14} {results[method]['ms_per_step']:8.2f} ms/step back to back", flush=True)
        for label, row in phases.items():
            print(f"  {row['ms_per_step']:7.2f} ms  {row['calls_per_step']:7.1f} calls  {label} (timed)")
        for row in results[method]["library"][:limit]:
            print(f"    {row['cumulative_ms_per_step']:7.2f} ms  {row['calls_per_step']:7.1f} calls  {row['function']}")
        del base, flat, reference, step
    return {"config": cfg_name, "settings": cfg, "steps": steps, "blocks": blocks, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="gpu-small")
    parser.add_argument("--methods", default="lora,flat-exact,flat-backup,flat-virtual")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--limit", type=int, default=25, help="library functions listed per method")
    parser.add_argument("--json")
    args = parser.parse_args()
    summary = run(args.config, args.methods.split(","), args.steps, args.blocks, args.limit)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
