"""Step time under a real Lightning ``Trainer``: plain LoRA vs Flat-LoRA through ``FlatLoRACallback``.

The same model and batch as ``step_time.py`` (``--config``), trained by ``Trainer.fit`` with
``precision="32-true"`` (the model keeps its own types: bf16 weights on the GPU configurations) and
``accumulate_grad_batches`` (``--accumulate``, default 1). Methods, each a fresh ``Trainer`` over the same
model, run in rounds so that a drift of the machine touches every method alike:

* ``lora``: the LoRA parameters' AdamW, no callback;
* ``flat-<restore>``: ``FlatLoRACallback(restore=<restore>)`` (``exact``, ``host``, ``backup``...);
* ``flat-virtual``: ``FlatLoRACallback(mode="virtual")``.

Timing: a callback notes the time at the start of chosen training batches, synchronising the device there
and nowhere else, so the steps between two marks run back to back as Lightning runs them (the host may run
ahead of the device). Per round and method: ``--warmup`` optimizer steps, then ``--blocks`` blocks of
``--steps`` optimizer steps; the result is the median block's ms per optimizer step. The frozen weights'
bit patterns are checked against the start after every fit.

    python benchmarks/lightning_step_time.py --config gpu --methods lora,flat-exact,flat-host --json out.json
    python benchmarks/lightning_step_time.py --config cpu     # a few seconds, on any machine
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import CONFIGS, build_model, checksum, config_device, make_ids, sync  # noqa: E402


def _lightning():
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    return pl, Callback


def make_module(model, lr: float = 1e-4):
    pl, _ = _lightning()

    class LoRAModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)

    return LoRAModule()


def make_loader(ids: torch.Tensor, batches: int):
    """``batches`` copies of the benchmark's batch (on the CPU: Lightning moves each to the device, as it would)."""
    from torch.utils.data import DataLoader, TensorDataset

    data = ids.cpu().repeat(batches, 1)
    return DataLoader(TensorDataset(data), batch_size=ids.shape[0], shuffle=False)


def make_marks(device: torch.device, at: List[int]):
    """A callback that synchronises the device and notes the time at the start of the training batches ``at``."""
    _, Callback = _lightning()

    class Marks(Callback):
        def __init__(self) -> None:
            self.times: Dict[int, float] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx in at:
                sync(device)
                self.times[batch_idx] = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            sync(device)
            self.times[-1] = time.perf_counter()

    return Marks()


def flat_callback(method: str, rho: float):
    from flatlora_optim.integrations.lightning import FlatLoRACallback

    kind = method.split("-", 1)[1]
    if kind == "virtual":
        return FlatLoRACallback(rho=rho, schedule="constant", mode="virtual")
    return FlatLoRACallback(rho=rho, schedule="constant", restore=kind)


def fit_once(module, ids, device, method: str, accumulate: int, warmup: int, steps: int, blocks: int, rho: float) -> List[float]:
    """ms per optimizer step of each block of ``steps`` steps, after ``warmup`` steps, in one ``Trainer.fit``."""
    pl, _ = _lightning()
    total = warmup + steps * blocks
    at = [(warmup + steps * b) * accumulate for b in range(blocks)]
    marks = make_marks(device, at)
    callbacks = [marks] + ([] if method == "lora" else [flat_callback(method, rho)])
    trainer = pl.Trainer(callbacks=callbacks, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="32-true", max_steps=total,
                         accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, make_loader(ids, total * accumulate))
    ends = at[1:] + [-1]
    return [(marks.times[end] - marks.times[start]) * 1000 / steps for start, end in zip(at, ends)]


def run(cfg_name: str, methods: List[str], rounds: int = 2, accumulate: int = 1, warmup: int = 3, steps: int = 10, blocks: int = 3,
        rho: float = 0.05, threads: int = 2) -> Dict:
    cfg = CONFIGS[cfg_name]
    device = config_device(cfg_name)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    model = build_model(cfg, device)
    module = make_module(model)
    ids = make_ids(cfg, device)
    clean = checksum(model)
    blocks_ms: Dict[str, List[float]] = {m: [] for m in methods}
    exact: Dict[str, bool] = {m: True for m in methods}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|GPU available|TPU available|LightningModule.train).*")
        for r in range(rounds):
            for method in methods:
                per_block = fit_once(module, ids, device, method, accumulate, warmup, steps, blocks, rho)
                blocks_ms[method] += per_block
                exact[method] = exact[method] and checksum(model) == clean
                print(f"round {r} {method:<12} ms/step per block: " + " ".join(f"{b:.2f}" for b in per_block), flush=True)
    results = {m: {"ms_per_step": statistics.median(b), "ms_blocks": b, "weights_bitwise_equal": exact[m]} for m, b in blocks_ms.items()}
    plain = results[methods[0]]["ms_per_step"]
    import lightning

    return {
        "config": cfg_name, "settings": cfg, "accumulate_grad_batches": accumulate, "rounds": rounds, "warmup": warmup,
        "steps_per_block": steps, "blocks": blocks, "rho": rho,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "lightning": lightning.__version__, "date": time.strftime("%Y-%m-%d"),
        "results": results, "ratios": {m: r["ms_per_step"] / plain for m, r in results.items()},
    }


def print_table(summary: Dict) -> None:
    print(f"\n{summary['config']} under Lightning {summary['lightning']} on {summary['device']} (torch {summary['torch']}), "
          f"accumulate_grad_batches={summary['accumulate_grad_batches']}")
    print(f"{'method':<14} | {'ms/step':>9} | {'x first':>7} | {'blocks (ms/step)':<40} | exact")
    for method, r in summary["results"].items():
        blocks = " ".join(f"{b:.1f}" for b in r["ms_blocks"])
        print(f"{method:<14} | {r['ms_per_step']:9.2f} | {summary['ratios'][method]:7.3f} | {blocks:<40} | {r['weights_bitwise_equal']}")


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--methods", default="lora,flat-exact,flat-host", help="comma-separated; the first is the ratios' base")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before the first mark")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed block")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    summary = run(args.config, args.methods.split(","), args.rounds, args.accumulate, args.warmup, args.steps, args.blocks,
                  threads=args.threads)
    print_table(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
