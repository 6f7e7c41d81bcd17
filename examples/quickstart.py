"""Quickstart: plain LoRA vs Flat-LoRA on a small model and data made in code (CPU, about a minute).

The setting imitates fine-tuning: an MLP is first "pre-trained" on a source task, then adapted
with LoRA (r=4 on every Linear) to a related target task from few, partly mislabelled examples.
Both methods get the same model, data, optimizer, learning rate and seeds; Flat-LoRA adds the
paper's noise (rho=0.10, cosine ramp). Test accuracy is measured on clean test inputs and on
inputs under a distribution shift (added Gaussian noise). At the end the frozen base weights are
compared bit for bit with the pre-trained ones.

    python examples/quickstart.py            # 3 seeds, ~1 minute on 2 cores
    python examples/quickstart.py --seeds 1 --steps 50   # a smoke run
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the examples' shared helpers
from _progress import progress  # noqa: E402

from flatlora_optim import FlatLoRA, inject_lora, lora_parameters

DIM, HIDDEN, CLASSES = 16, 256, 4


def make_tasks(seed: int):
    """Source and target tasks: labels from two related random teacher networks."""
    gen = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(DIM, 64, generator=gen), torch.randn(64, CLASSES, generator=gen)]
    shifted = [teacher[0] + 0.5 * torch.randn(DIM, 64, generator=gen), teacher[1] + 0.5 * torch.randn(64, CLASSES, generator=gen)]

    def sample(weights, n, label_noise=0.0):
        x = torch.randn(n, DIM, generator=gen)
        y = (torch.tanh(x @ weights[0]) @ weights[1]).argmax(dim=1)
        flip = torch.rand(n, generator=gen) < label_noise
        y[flip] = torch.randint(0, CLASSES, (int(flip.sum()),), generator=gen)
        return x, y

    source = sample(teacher, 20_000)
    target_train = sample(shifted, 1000, label_noise=0.1)
    target_test = sample(shifted, 5_000)
    return source, target_train, target_test


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, CLASSES))


def pretrain(model, data, seed, steps):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = data
    for _ in progress(range(steps), steps, "pre-train"):
        idx = torch.randint(0, len(x), (256,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item() * 100


def finetune(pretrained, train, test, seed, steps, rho, flat):
    model = make_model()
    model.load_state_dict(pretrained)
    torch.manual_seed(seed)  # same LoRA init for both methods
    inject_lora(model, ["0", "2", "4"], r=4, alpha=8)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(list(lora_parameters(model)), lr=1e-3)
    if flat:
        opt = FlatLoRA(opt, model, rho=rho, total_steps=steps, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = train
    start = time.perf_counter()
    for _ in progress(range(steps), steps, "Flat-LoRA" if flat else "LoRA     "):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        if flat:
            with opt.perturbed():
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        else:
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
    ms_per_step = (time.perf_counter() - start) / steps * 1000
    exact = all(torch.equal(base[n], p) for n, p in model.named_parameters() if not p.requires_grad)
    tx, ty = test
    shift_gen = torch.Generator().manual_seed(1000 + seed)
    shifted_x = tx + 0.5 * torch.randn(tx.shape, generator=shift_gen)
    return {"clean": accuracy(model, tx, ty), "shifted": accuracy(model, shifted_x, ty), "ms": ms_per_step, "exact": exact}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500, help="fine-tuning optimizer steps")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--rho", type=float, default=0.10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = {"LoRA": [], "Flat-LoRA": []}
    for seed in range(args.seeds):
        source, train, test = make_tasks(seed)
        torch.manual_seed(seed)
        model = make_model()
        pretrain(model, source, seed, args.pretrain_steps)
        state = model.state_dict()
        rows["LoRA"].append(finetune(state, train, test, seed, args.steps, args.rho, flat=False))
        rows["Flat-LoRA"].append(finetune(state, train, test, seed, args.steps, args.rho, flat=True))
        print(f"seed {seed}: LoRA {rows['LoRA'][-1]['clean']:.2f}% / Flat-LoRA {rows['Flat-LoRA'][-1]['clean']:.2f}% clean test accuracy")

    def mean_std(values):
        return f"{statistics.mean(values):6.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:4.2f}"

    print(f"\n{args.seeds} seed(s), {args.steps} steps, LoRA r=4 on 3 Linear layers, rho={args.rho} (cosine)\n")
    print(f"{'method':<10} | {'test acc %':>13} | {'shifted acc %':>13} | {'ms/step':>7} | frozen weights bitwise equal")
    print("-" * 82)
    for method, results in rows.items():
        print(
            f"{method:<10} | {mean_std([r['clean'] for r in results]):>13} | {mean_std([r['shifted'] for r in results]):>13} | "
            f"{statistics.mean(r['ms'] for r in results):7.2f} | {all(r['exact'] for r in results)}"
        )
    diffs = [f["clean"] - p["clean"] for f, p in zip(rows["Flat-LoRA"], rows["LoRA"])]
    print(f"\npaired difference (Flat-LoRA - LoRA), clean test accuracy: {mean_std(diffs)} points")
    if not all(r["exact"] for r in rows["Flat-LoRA"]):
        raise SystemExit("frozen weights changed: this is a bug, please report it")


if __name__ == "__main__":
    main()
