"""Register caps (``maxnreg``) for the exact codec's passes, side by side: each plan compiles the codec module with
its caps for the layouts it names and times the perturb and restore passes over the same 277 M bf16 elements
(contiguous rows, or transposed views with the transposed tiles), twice round. Every pass must restore every bit.

    cd benchmarks && PYTHONPATH=.. python3 register_caps.py --layout transposed --plans '[{}, {"5,p": 64, "5,r": 48}]'
    cd benchmarks && PYTHONPATH=.. python3 register_caps.py --layout contiguous --plans '[{}, {"3,p": 80, "3,r": 64}]'
    TRITON_INTERPRET=1 python benchmarks/register_caps.py --small   # a smoke test on CPU (times meaningless)

A plan maps ``"<codec variant>,<p|r>"`` (perturb or restore pass) to a cap; ``{}`` is the module as shipped. A
plan's caps replace the shipped cap of the passes it names and leave the others as shipped. On a Triton without
``maxnreg`` the caps are ignored.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from codec_ablation import load_variant, measure, timer
from codec_layouts import side_by_side_setup

from flatlora_optim.kernels.layer_table import transposed_tiles

SHIPPED = '''                cap = _register_cap(variant, restore) if _MAXNREG and not plain else None
'''


def caps_edit(plan: Dict[Tuple[int, bool], int]) -> List[Tuple[str, str]]:
    """The edit of the kernel module that gives the passes ``plan`` names their caps."""
    return [(SHIPPED, f'''                cap = {plan!r}.get((variant, restore), _register_cap(variant, restore)) if _MAXNREG and not plain else None
''')]


def parse_plan(plan: Dict[str, int]) -> Dict[Tuple[int, bool], int]:
    return {(int(key.split(",")[0]), key.split(",")[1].strip() == "r"): int(cap) for key, cap in plan.items()}


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=["contiguous", "transposed"], default="transposed")
    parser.add_argument("--plans", default='[{}, {"5,p": 64, "5,r": 48}]', help="a JSON list of plans (see above)")
    parser.add_argument("--small", action="store_true", help="2 weights of 300 x 64 (a smoke test under the interpreter)")
    args = parser.parse_args(argv)
    device, ((_, contiguous, _), (_, transposed, _), _), reps, rounds = side_by_side_setup(args.small)
    weights = transposed if args.layout == "transposed" else contiguous
    timed = timer(device)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        plans = json.loads(args.plans)
        modules = [load_variant(f"caps {i}", caps_edit(parse_plan(plan)), Path(folder)) for i, plan in enumerate(plans)]
        for round_ in range(rounds):
            for plan, module in zip(plans, modules):
                with transposed_tiles(True):
                    result = measure(module, weights, None, True, timed, reps)  # raises unless every bit comes back
                results[f"{json.dumps(plan)} round {round_}"] = result
                print(f"{args.layout} {json.dumps(plan):36s} perturb {result['perturb_ms']:.3f} ms  restore {result['restore_ms']:.3f} ms",
                      flush=True)
    return results


if __name__ == "__main__":
    main()
