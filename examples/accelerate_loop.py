"""Flat-LoRA in an accelerate training loop: ``accelerator.prepare(model, FlatLoRA(...), loader)``. Offline, CPU, ~5 s.

The loop is the usual accelerate loop with ``accelerator.accumulate``; the only Flat-LoRA lines
are the wrapper, the schedule length (counted from the *prepared* loader, so it is right on
every rank) and the ``perturbed()`` block around the forward. ``accelerator.save_state`` in the
middle of training writes clean weights and the Flat-LoRA step; ``load_state`` resumes it.

    python examples/accelerate_loop.py
"""

from __future__ import annotations

import tempfile

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatlora_optim import FlatLoRA, inject_lora, lora_parameters
from flatlora_optim.integrations.accelerate import count_optimizer_steps, perturbed, set_total_steps

DIM, CLASSES, EPOCHS = 16, 4, 3


def task(seed: int, n: int, shift: float = 0.5) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(DIM, 64, generator=gen), torch.randn(64, CLASSES, generator=gen)
    w1 = w1 + shift * torch.randn(DIM, 64, generator=gen)
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (torch.tanh(x @ w1) @ w2).argmax(1))


def evaluate(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest (and kind to a shared machine)
    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=4, cpu=True)
    model = nn.Sequential(nn.Linear(DIM, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, CLASSES))
    inject_lora(model, ["0", "2", "4"], r=8, alpha=16)
    base_bits = {n: p.detach().view(torch.int32).clone() for n, p in model.named_parameters() if not p.requires_grad}
    train = DataLoader(task(seed=1, n=1024), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    test = task(seed=2, n=1024)

    flat = FlatLoRA(torch.optim.AdamW(list(lora_parameters(model)), lr=3e-3), model, rho=0.10, total_steps=1, seed=0)
    model, opt, train = accelerator.prepare(model, flat, train)
    set_total_steps(opt, count_optimizer_steps(accelerator, train, EPOCHS))  # T = real optimizer steps
    print(f"{len(train)} micro-batches per epoch, accumulation {accelerator.gradient_accumulation_steps}: T = {flat.schedule.total_steps}")
    print(f"test accuracy before: {evaluate(model, test):.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        for epoch in range(EPOCHS):
            for x, y in train:
                with accelerator.accumulate(model):
                    with perturbed(opt):  # this step's noise in; the same draw for every micro-batch of the step
                        loss = nn.functional.cross_entropy(model(x), y)
                    accelerator.backward(loss)  # noise out at the end of this backward, bitwise exactly
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()  # only on the last micro-batch of a window; then Flat-LoRA's step count advances
                    opt.zero_grad()
            print(f"epoch {epoch}: last loss {loss.item():.3f}, Flat-LoRA step {flat.step_count}, sigma {flat.sigma:.4f}")
            if epoch == 0:
                accelerator.save_state(f"{tmp}/state")
        saved = torch.load(f"{tmp}/state/optimizer.bin", weights_only=False)["flatlora"]
        print(f"save_state after epoch 0 holds the Flat-LoRA state: step {saved['step']}, T {saved['total_steps']}")

    frozen = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if not p.requires_grad]
    unchanged = all(torch.equal(base_bits[n], p.detach().view(torch.int32)) for n, p in frozen)
    print(f"test accuracy after: {evaluate(model, test):.3f}")
    print(f"optimizer steps {flat.step_count} == T {flat.schedule.total_steps}; base weights bitwise unchanged: {unchanged}")


if __name__ == "__main__":
    main()
