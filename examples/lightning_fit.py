"""Flat-LoRA in a Lightning ``Trainer``: one callback. Offline, CPU, ~10 s.

An MLP is "pre-trained" on a source task in a few plain steps, then adapted with LoRA to a
related target task by a stock Lightning ``Trainer`` with gradient accumulation, bf16 mixed
precision, gradient clipping, validation every few batches (also in the middle of an
accumulation window) and checkpointing. ``FlatLoRACallback`` wraps the module's AdamW in
``FlatLoRA``; the schedule length comes from ``trainer.estimated_stepping_batches``.

    python examples/lightning_fit.py
"""

from __future__ import annotations

import tempfile
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatlora_optim import inject_lora, lora_parameters
from flatlora_optim.integrations.lightning import FlatLoRACallback

DIM, CLASSES = 16, 4


def task(seed: int, shift: float, n: int):
    """Labels from a random teacher network; `shift` moves the teacher (source vs target task)."""
    gen = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(DIM, 64, generator=gen), torch.randn(64, CLASSES, generator=gen)
    w1 = w1 + shift * torch.randn(DIM, 64, generator=gen)
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=data)
    return TensorDataset(x, (torch.tanh(x @ w1) @ w2).argmax(1))


def pretrained_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, CLASSES))
    x, y = task(seed=1, shift=0.0, n=2048).tensors
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


class LoRAClassifier(pl.LightningModule):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = inject_lora(model, ["0", "2", "4"], r=4, alpha=8)  # freezes everything but the adapters

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x).float(), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x).float()
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(list(lora_parameters(self)), lr=3e-3)  # a plain optimizer: the callback wraps it


def main() -> None:
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest (and kind to a shared machine)
    warnings.filterwarnings("ignore")
    module = LoRAClassifier(pretrained_mlp())
    base_bits = {n: p.detach().view(torch.int32).clone() for n, p in module.named_parameters() if not p.requires_grad}
    train = DataLoader(task(seed=2, shift=0.5, n=512), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(task(seed=3, shift=0.5, n=512), batch_size=256)
    flat_cb = FlatLoRACallback(rho=0.10, seed=0)  # <- the Flat-LoRA line
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=4,
            accumulate_grad_batches=2,
            precision="bf16-mixed",
            gradient_clip_val=1.0,
            val_check_interval=5,  # every 5 batches: sometimes in the middle of an accumulation window
            callbacks=[flat_cb],
            default_root_dir=tmp,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        first = trainer.validate(module, val, verbose=False)[0]
        trainer.fit(module, train, val)
        last = trainer.validate(module, val, verbose=False)[0]
    flat = flat_cb.flat
    unchanged = all(torch.equal(base_bits[n], p.detach().view(torch.int32)) for n, p in module.named_parameters() if not p.requires_grad)
    print(f"target task val: loss {first['val_loss']:.3f} -> {last['val_loss']:.3f}, accuracy {first['val_acc']:.3f} -> {last['val_acc']:.3f}")
    print(f"Flat-LoRA: {flat}")
    print(f"schedule length = Lightning's optimizer steps: {flat.schedule.total_steps} == {trainer.global_step} (4 epochs x 32 batches / 2)")
    print(f"base weights bitwise unchanged: {unchanged}")


if __name__ == "__main__":
    main()
