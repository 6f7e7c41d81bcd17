"""FlatLoRACallback under Lightning's strategy="ddp" on two CPU processes (gloo).

Run as a script (never imported by pytest: Lightning's subprocess launcher re-executes ``sys.argv`` for rank 1)::

    python lightning_ddp_fit.py --out DIR --restore exact [--rank-noise shared,independent] [--tests-dir /work/main/tests]

Launchers this script is run under (the test picks one):

* ``python lightning_ddp_fit.py ...``: Lightning's own subprocess launcher (``LightningEnvironment`` without ``LOCAL_RANK``):
  rank 0 is this process, rank 1 is ``python lightning_ddp_fit.py ...`` again with ``LOCAL_RANK=1``.
* two ``python lightning_ddp_fit.py ...`` with ``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/``NODE_RANK``/``LOCAL_RANK``
  set (torchrun-style variables, ``LightningEnvironment.creates_processes_externally``), or under
  ``torchrun --standalone --nproc-per-node 2`` (``TorchElasticEnvironment``).

For each ``rank_noise`` it fits ``SGDMLP`` of tests/test_integration_lightning.py (3 SGD steps, batch 4 per rank)
with ``FlatLoRACallback(rho=0.5, schedule="constant", seed=3, restore=...)``; ``RankReport`` (same file) saves each
rank's result to ``DIR/<rank_noise>/rank<r>.pt``. Both fits run in one launch (the second Trainer reuses the
processes and the process group). At the end both ranks meet at a barrier, the group is destroyed, rank 0 waits for
the children Lightning started, and every process leaves with ``os._exit`` (conftest.end_worker_process: gloo's
threads raced the interpreter's normal exit now and then). ``DIR/done-rank<r>`` (JSON: seconds, pid, strategy,
launcher and cluster environment classes, children started) marks a rank that got there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--restore", choices=["exact", "host"], required=True)
    parser.add_argument("--rank-noise", default="shared,independent")
    parser.add_argument("--tests-dir", default=None, help="the repository's tests/ (default: next to flatlora_optim)")
    args = parser.parse_args()
    started = time.perf_counter()

    import torch

    tests_dir = args.tests_dir
    if tests_dir is None:
        import flatlora_optim

        tests_dir = str(Path(flatlora_optim.__file__).resolve().parents[1] / "tests")
    sys.path.insert(0, tests_dir)

    import lightning.pytorch as pl
    from conftest import end_worker_process
    from test_integration_lightning import SGDMLP, RankReport  # the module and report of the ddp_spawn test

    from flatlora_optim.integrations.lightning import FlatLoRACallback

    warnings.filterwarnings("ignore", message=".*(does not have many workers|LightningModule.train|GPU available|TPU available).*")
    warnings.filterwarnings("ignore", category=pl.utilities.warnings.PossibleUserWarning)
    torch.set_num_threads(1)
    out = Path(args.out)

    trainer = None
    children: list = []  # the ranks Lightning's subprocess launcher started (rank 0, first Trainer: the next ones reuse them)
    for rank_noise in args.rank_noise.split(","):
        run_dir = out / rank_noise
        run_dir.mkdir(parents=True, exist_ok=True)
        flat_cb = FlatLoRACallback(rho=0.5, schedule="constant", seed=3, restore=args.restore, rank_noise=rank_noise)
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_steps=3, limit_val_batches=0, use_distributed_sampler=False,
            logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            default_root_dir=str(run_dir), callbacks=[flat_cb, RankReport(str(run_dir))],
        )
        trainer.fit(SGDMLP())
        children += getattr(trainer.strategy.launcher, "procs", [])
        assert trainer.world_size == 2, trainer.world_size

    rank = trainer.global_rank
    launcher = getattr(trainer.strategy, "launcher", None)
    (out / f"done-rank{rank}").write_text(json.dumps({
        "seconds": round(time.perf_counter() - started, 2), "pid": os.getpid(), "strategy": type(trainer.strategy).__name__,
        "launcher": type(launcher).__name__, "environment": type(trainer.strategy.cluster_environment).__name__,
        "children": len(children),
    }))
    end_worker_process(children)


if __name__ == "__main__":
    main()
