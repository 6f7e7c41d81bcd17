"""Lightning Trainer + Flat-LoRA through FlatLoRACallback, on a tiny LoRA MLP (CPU).

Checked against the real Lightning loop: every loss that is backpropagated was computed at the
perturbed weights (one draw per optimizer step, shared by the accumulated batches), validation
and checkpoints see clean weights (validation is scheduled in the middle of an accumulation
window on purpose), the schedule length is Lightning's optimizer-step count, resuming from a
checkpoint continues the noise stream bitwise, and 16-bit AMP with a GradScaler works.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import DDP_KINDS, assert_ddp_matches_one_process, assert_frozen_unchanged, bits, free_port, frozen_weights, make_mlp
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatlora_optim import FlatLoRA, lora_parameters
from flatlora_optim.integrations.lightning import FlatLoRACallback

PROBED = "net.2"  # the middle LoRALinear of make_mlp


@pytest.fixture(autouse=True)
def quiet_one_thread():
    """One intra-op thread (tiny matrices on a shared 2-core machine); Lightning's tips silenced."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LightningModule.train|GPU available|TPU available).*")
        warnings.filterwarnings("ignore", category=pl.utilities.warnings.PossibleUserWarning)
        yield
    torch.set_num_threads(threads)


class LitMLP(pl.LightningModule):
    def __init__(self, own_flatlora: bool = False):
        super().__init__()
        self.net = make_mlp(seed=0)
        self.own_flatlora = own_flatlora
        self.autocast_dtypes: set = set()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.autocast_dtypes.add(logits.dtype)
        return nn.functional.cross_entropy(logits.float(), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x).float(), y)

    def configure_optimizers(self):
        adamw = torch.optim.AdamW(list(lora_parameters(self)), lr=1e-2)
        if self.own_flatlora:  # the documented alternative: wrap it yourself with Lightning's step count
            return FlatLoRA(adamw, self, rho=0.2, schedule="linear", total_steps=self.trainer.estimated_stepping_batches, seed=5)
        # an LR scheduler built on the plain optimizer keeps acting on it once the callback wraps it
        return {"optimizer": adamw, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(adamw, 1, gamma=0.9), "interval": "step"}}


def loader(n: int = 48, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=gen)
    y = torch.randint(0, 5, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Probe(Callback):
    """Records the probed weight where the loss is about to be backpropagated, and at validation."""

    def __init__(self):
        self.backward = []  # (global_step, weight bits, sigma)
        self.validation = []  # (is_perturbed, weight bits)

    def _flat(self, trainer):
        return next(cb for cb in trainer.callbacks if isinstance(cb, FlatLoRACallback)).flat

    def _weight(self, pl_module):
        return bits(dict(pl_module.named_modules())[PROBED].weight)

    def on_before_backward(self, trainer, pl_module, loss):
        self.backward.append((trainer.global_step, self._weight(pl_module), self._flat(trainer).sigma))

    def on_validation_start(self, trainer, pl_module):
        self.validation.append((self._flat(trainer).is_perturbed, self._weight(pl_module)))


def trainer_for(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    base.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **base)


def by_step(records) -> dict:
    grouped: dict = {}
    for step, weight_bits, sigma in records:
        grouped.setdefault(step, []).append((weight_bits, sigma))
    return grouped


def test_fit_accumulation_mid_window_validation_checkpoint_and_resume(tmp_path):
    total = 9  # 3 epochs of 6 batches = 3 optimizer steps
    module = LitMLP()
    initial = frozen_weights(module)
    clean = bits(dict(module.named_modules())[PROBED].weight)
    probe = Probe()
    # checkpoints at epoch ends (Lightning cannot resume a plain DataLoader in the middle of an epoch)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1, filename="{step}")
    flat_cb = FlatLoRACallback(rho=0.1, seed=1)
    trainer = trainer_for(
        tmp_path, [probe, flat_cb, ckpt], max_steps=total, accumulate_grad_batches=2, val_check_interval=3, limit_val_batches=1, gradient_clip_val=1.0
    )
    trainer.fit(module, loader(24), loader(8))
    flat = flat_cb.flat

    assert find_in(trainer) is flat
    assert flat.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**total)  # the LR scheduler stepped with the optimizer
    assert flat.schedule.total_steps == trainer.estimated_stepping_batches == total
    assert flat.step_count == trainer.global_step == total
    steps = by_step(probe.backward)
    assert sorted(steps) == list(range(total))
    for step, seen in steps.items():
        assert len(seen) == 2  # both accumulated batches ...
        assert torch.equal(seen[0][0], seen[1][0])  # ... were backpropagated at the same weights
        assert torch.equal(seen[0][0], clean) == (step == 0)  # sigma_0 = 0, noise at every later step
    draws = [steps[s][0][0] for s in range(1, total)]
    assert all(not torch.equal(a, b) for a, b in zip(draws, draws[1:]))
    # validation ran (also in the middle of an accumulation window: after the 3rd batch of each epoch) on clean weights
    assert len(probe.validation) >= 4
    assert all(not perturbed and torch.equal(w, clean) for perturbed, w in probe.validation)
    assert frozen_weights(module).keys() == initial.keys()
    assert all(torch.equal(initial[k], v) for k, v in frozen_weights(module).items())
    # the checkpoints hold clean weights and the Flat-LoRA step
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=3.ckpt", "step=6.ckpt", "step=9.ckpt"]
    saved = torch.load(tmp_path / "ckpt" / "step=6.ckpt", weights_only=False)
    for name, value in initial.items():
        assert torch.equal(bits(saved["state_dict"][name]), value), name
    assert saved["optimizer_states"][0]["flatlora"]["step"] == 6
    final = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    # resume from step 6: the step count, the schedule and the noise draws continue
    module_b = LitMLP()
    probe_b = Probe()
    flat_cb_b = FlatLoRACallback(rho=0.1, seed=1)
    trainer_b = trainer_for(
        tmp_path / "b", [probe_b, flat_cb_b], max_steps=total, accumulate_grad_batches=2, val_check_interval=3, limit_val_batches=1, gradient_clip_val=1.0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "callbacks used to create the checkpoint need to be provided"
        trainer_b.fit(module_b, loader(24), loader(8), ckpt_path=str(tmp_path / "ckpt" / "step=6.ckpt"))
    assert flat_cb_b.flat.step_count == trainer_b.global_step == total
    assert flat_cb_b.flat.schedule.total_steps == total
    assert flat_cb_b.flat.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**total)
    steps_b = by_step(probe_b.backward)
    assert sorted(steps_b) == list(range(6, total))
    for step, seen in steps_b.items():
        assert torch.equal(seen[0][0], steps[step][0][0]), f"step {step}: resumed run drew different noise"
        assert seen[0][1] == steps[step][0][1]
    for name, value in final.items():
        assert torch.equal(value, dict(module_b.named_parameters())[name]), f"{name}: resumed run diverged"


def find_in(trainer):
    from flatlora_optim.integrations import find_flatlora

    (optimizer,) = trainer.optimizers
    return find_flatlora(optimizer)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_fast_dev_run_mixed_precision(tmp_path, precision):
    module = LitMLP()
    initial = frozen_weights(module)
    clean = bits(dict(module.named_modules())[PROBED].weight)
    probe = Probe()
    flat_cb = FlatLoRACallback(rho=0.1, schedule="constant")  # noise from step 0, so that every step is checked
    kwargs = dict(fast_dev_run=4, accumulate_grad_batches=2, gradient_clip_val=1.0)
    if precision == "16-mixed":  # Lightning maps 16-mixed to bf16 on CPU unless given the plugin with a GradScaler
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))]
    else:
        kwargs["precision"] = precision
    trainer = trainer_for(tmp_path, [probe, flat_cb], **kwargs)
    trainer.fit(module, loader())
    flat = flat_cb.flat

    assert module.autocast_dtypes == {torch.float16 if precision == "16-mixed" else torch.bfloat16}
    assert trainer.global_step == 2 == flat.step_count  # fast_dev_run=4 batches, 2 per step
    steps = by_step(probe.backward)
    assert sorted(steps) == [0, 1]
    for seen in steps.values():
        assert len(seen) == 2 and torch.equal(seen[0][0], seen[1][0]) and not torch.equal(seen[0][0], clean)
    assert not torch.equal(steps[0][0][0], steps[1][0][0])
    assert not flat.is_perturbed
    assert all(torch.equal(initial[k], v) for k, v in frozen_weights(module).items())


def test_flatlora_returned_by_configure_optimizers_is_used_as_is(tmp_path):
    module = LitMLP(own_flatlora=True)
    initial = frozen_weights(module)
    flat_cb = FlatLoRACallback(rho=0.9)  # its arguments do not apply to a user-made FlatLoRA
    trainer = trainer_for(tmp_path, [flat_cb], max_epochs=1, limit_train_batches=6, accumulate_grad_batches=4, limit_val_batches=0)
    trainer.fit(module, loader())
    flat = flat_cb.flat
    # 6 batches with accumulation 4: one full step and one short step -> 2 optimizer steps
    assert flat.schedule.rho == 0.2 and flat.schedule.name == "linear" and flat.seed == 5
    assert flat.schedule.total_steps == trainer.estimated_stepping_batches == 2 == flat.step_count
    assert all(torch.equal(initial[k], v) for k, v in frozen_weights(module).items())


class FailingMLP(LitMLP):
    def training_step(self, batch, batch_idx):
        if batch_idx == 3:
            raise RuntimeError("boom")  # the noise of this step is in the weights right now
        return super().training_step(batch, batch_idx)


def test_an_exception_in_training_step_restores_the_weights(tmp_path):
    module = FailingMLP()
    initial = frozen_weights(module)
    flat_cb = FlatLoRACallback(rho=1.0, schedule="constant")
    trainer = trainer_for(tmp_path, [flat_cb], max_steps=5, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, loader())
    assert flat_cb.flat.step_count == 3 and not flat_cb.flat.is_perturbed
    assert all(torch.equal(initial[k], v) for k, v in frozen_weights(module).items())


def _fit_counting(tmp_path, module, restore, monkeypatch, **kwargs):
    """Fit ``module`` with FlatLoRACallback(restore=...) and a Probe; returns the probe, the callback, the draws made
    and, per early write-back of a layer (host restore), the number of backwards started by then and whether it ran
    inside a backward."""
    from flatlora_optim.perturbation import Perturber

    probe = Probe()
    events = {"draws": 0, "early": []}
    perturb_all, restore_early = Perturber.perturb_all, Perturber.restore_early

    def counting_perturb_all(self, *args, **kw):
        events["draws"] += 1
        return perturb_all(self, *args, **kw)

    def recording_restore_early(self, p):
        events["early"].append((len(probe.backward), torch._C._current_graph_task_id() != -1))
        return restore_early(self, p)

    monkeypatch.setattr(Perturber, "perturb_all", counting_perturb_all)
    monkeypatch.setattr(Perturber, "restore_early", recording_restore_early)
    flat_cb = FlatLoRACallback(rho=0.1, schedule="constant", seed=3, restore=restore)
    trainer = trainer_for(tmp_path / restore, [probe, flat_cb], limit_val_batches=0, **kwargs)
    trainer.fit(module, loader())
    monkeypatch.undo()
    return probe, flat_cb, events


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_host_restore_writes_layers_back_during_each_backward_with_exact_restores_steps(tmp_path, precision, monkeypatch):
    """Automatic optimization: every micro-batch's backward runs in final_backward(), so host restore writes each layer
    back during that backward (not all at once after it), in the stepping batch too, whose closure FlatLoRA.step runs
    at the noise perturb() put in at the batch's start (one draw per micro-batch, not two). The steps are exact
    restore's to the bit; the frozen weights end clean."""
    kwargs = dict(max_steps=3, accumulate_grad_batches=2, gradient_clip_val=1.0)
    if precision == "16-mixed":  # the GradScaler path: the closure runs before FlatLoRA.step, which gets none
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))]
    else:
        kwargs["precision"] = precision
    runs = {}
    for restore in ("exact", "host"):
        module = LitMLP()
        initial = frozen_weights(module)
        probe, flat_cb, events = _fit_counting(tmp_path, module, restore, monkeypatch, **kwargs)
        assert flat_cb.flat.step_count == 3 and not flat_cb.flat.is_perturbed
        assert all(torch.equal(initial[k], v) for k, v in frozen_weights(module).items())
        backwards = len(probe.backward)
        assert backwards == 6 and events["draws"] == backwards
        runs[restore] = (probe.backward, [bits(p) for p in lora_parameters(module)], events["early"])
    assert not runs["exact"][2]
    early = runs["host"][2]
    assert all(in_backward for _, in_backward in early)
    assert {n for n, _ in early} == set(range(1, 7))  # in every micro-batch's backward
    for (step_a, weight_a, sigma_a), (step_b, weight_b, sigma_b) in zip(runs["exact"][0], runs["host"][0]):
        assert step_a == step_b and sigma_a == sigma_b and torch.equal(weight_a, weight_b)
    assert all(torch.equal(a, b) for a, b in zip(runs["exact"][1], runs["host"][1]))


class TwoBackwardsMLP(LitMLP):
    """Manual optimization: two forward/backward passes per batch, then one step."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        for half in (slice(0, 2), slice(2, 4)):
            self.manual_backward(nn.functional.cross_entropy(self(x[half]), y[half]))
        opt.step()
        opt.zero_grad()


def test_lightnings_empty_closure_runs_without_a_draw_and_changes_nothing(tmp_path, monkeypatch):
    """Manual optimization, opt.step() without a closure: Lightning hands FlatLoRA.step its own empty closure (with the
    on_before_optimizer_step hooks after it), which computes at no weight. It runs without the noise
    (one draw per batch instead of two), and the fit is the same to the bit as one that draws for it."""
    import flatlora_optim.integrations.lightning as integration

    runs = []
    for detect in (True, False):
        if not detect:
            monkeypatch.setattr(integration, "_closure_computes", lambda closure: True)
        module = TwoBackwardsMLP()
        probe, flat_cb, events = _fit_counting(tmp_path / str(detect), module, "exact", monkeypatch, max_steps=3)
        assert events["draws"] == (3 if detect else 6) and not flat_cb.flat.is_perturbed
        runs.append([bits(p) for p in lora_parameters(module)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_manual_optimization_keeps_the_noise_across_the_batchs_backwards(tmp_path, monkeypatch):
    """manual_backward does not release the noise (the batch may compute again after it): both halves of each batch
    are backpropagated at the same W + e, with host restore as with exact, and the steps agree to the bit."""
    runs = {}
    for restore in ("exact", "host"):
        module = TwoBackwardsMLP()
        clean = bits(dict(module.named_modules())[PROBED].weight)
        probe, flat_cb, events = _fit_counting(tmp_path, module, restore, monkeypatch, max_steps=3)
        assert flat_cb.flat.step_count == 3 and not flat_cb.flat.is_perturbed
        steps = by_step(probe.backward)
        assert sorted(steps) == [0, 1, 2]
        for seen in steps.values():
            assert len(seen) == 2 and torch.equal(seen[0][0], seen[1][0]) and not torch.equal(seen[0][0], clean)
        # one draw per batch: the closure Lightning hands FlatLoRA.step for opt.step() (its own, empty) runs without
        # the noise; nothing is written back inside the batch
        assert events["draws"] == 3 and not events["early"]
        runs[restore] = [bits(p) for p in lora_parameters(module)]
    assert all(torch.equal(a, b) for a, b in zip(runs["exact"], runs["host"]))


class FailingBackwardMLP(LitMLP):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == 3:
            loss.register_hook(lambda grad: (_ for _ in ()).throw(RuntimeError("boom in backward")))
        return loss


@pytest.mark.parametrize("restore", ["exact", "host"])
def test_a_backward_that_raises_closes_its_final_backward_and_restores(tmp_path, restore):
    module = FailingBackwardMLP()
    initial = frozen_weights(module)
    flat_cb = FlatLoRACallback(rho=1.0, schedule="constant", restore=restore)
    trainer = trainer_for(tmp_path, [flat_cb], max_steps=5, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="boom in backward"):
        trainer.fit(module, loader())
    flat = flat_cb.flat
    assert flat.step_count == 3 and not flat.is_perturbed
    assert flat_cb._final_backward is None and not flat._in_final_backward
    assert all(torch.equal(initial[k], v) for k, v in frozen_weights(module).items())


class TwoLossesOneGraph(LitMLP):
    """Overrides ``backward``: two losses through one graph, the first with ``retain_graph=True`` (per-task gradients)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self._parts = (nn.functional.cross_entropy(logits, y), logits.pow(2).mean())
        return self._parts[0] + self._parts[1]

    def backward(self, loss, *args, **kwargs):
        first, second = self._parts
        first.backward(retain_graph=True)
        second.backward()


def test_a_module_overriding_backward_keeps_the_noise_through_it(tmp_path, monkeypatch):
    """Found by review: the callback ran an overridden backward (two passes through one graph) in final_backward(), so
    host restore wrote layers back after the first pass and the second raised autograd's in-place error. Such a
    backward now runs with the noise held to the batch's end: host restore trains as exact restore, to the bit, and
    writes nothing back inside it."""
    runs = {}
    for restore in ("exact", "host"):
        module = TwoLossesOneGraph()
        initial = frozen_weights(module)
        probe, flat_cb, events = _fit_counting(tmp_path, module, restore, monkeypatch, max_steps=3)
        assert flat_cb.flat.step_count == 3 and not events["early"]
        assert all(torch.equal(initial[k], v) for k, v in frozen_weights(module).items())
        runs[restore] = [bits(p) for p in lora_parameters(module)]
    assert all(torch.equal(a, b) for a, b in zip(runs["exact"], runs["host"]))


class StepsAnotherOptimizerFirst(LitMLP):
    """Manual optimization: a plain optimizer over the other layers steps (moving adapters) before FlatLoRA's steps
    with a closure that computes the loss again."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        flat, other = self.optimizers()
        x, y = batch
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        other.step()
        other.zero_grad()

        def closure():
            flat.zero_grad()
            loss = nn.functional.cross_entropy(self(x), y)
            self.manual_backward(loss)
            return loss

        flat.step(closure=closure)
        flat.zero_grad()

    def configure_optimizers(self):
        mine = [p for n, p in self.named_parameters() if p.requires_grad and n.startswith("net.0.")]
        rest = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("net.0.")]
        return FlatLoRA(torch.optim.SGD(mine, lr=0.1), self, rho=0.5, schedule="constant", seed=1), torch.optim.SGD(rest, lr=0.5)


@pytest.mark.parametrize("module_class", [LitMLP, StepsAnotherOptimizerFirst])
def test_the_stepping_closure_computes_at_the_draw_a_fresh_one_would_give(tmp_path, module_class, monkeypatch):
    """Automatic optimization: the stepping batch's closure computes at the noise on_train_batch_start drew (nothing
    moves the adapters in between), and the fit is the same to the bit as one where FlatLoRA.step restores it and draws
    it again. Manual optimization (found by review: another optimizer moved adapters before FlatLoRA's closure step,
    which kept the stale draw) draws again, as before."""
    results = []
    for redraw in (False, True):
        if redraw:
            monkeypatch.setattr(FlatLoRA, "_noise_fits_closure", lambda self: False)
        module = module_class()
        initial = frozen_weights(module)
        trainer = trainer_for(tmp_path / str(redraw), [FlatLoRACallback(rho=0.5, schedule="constant", seed=1)], max_steps=4, limit_val_batches=0)
        trainer.fit(module, loader())
        assert all(torch.equal(initial[k], v) for k, v in frozen_weights(module).items())
        results.append([bits(p) for p in module.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*results))


class RankReport(Callback):
    """At the end of fit, on every rank: whether the frozen weights are their first bits, FlatLoRA's step count and the
    LoRA parameters."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_fit_start(self, trainer, pl_module):
        self.before = frozen_weights(pl_module)

    def on_train_end(self, trainer, pl_module):
        clean = all(torch.equal(self.before[k], v) for k, v in frozen_weights(pl_module).items())
        lora = [p.detach().cpu() for p in lora_parameters(pl_module)]
        torch.save({"clean": clean, "steps": find_in(trainer).step_count, "lora": lora}, f"{self.out_dir}/rank{trainer.global_rank}.pt")


class SGDMLP(LitMLP):
    """Plain SGD; under DDP each rank takes the samples ``rank, rank + world, ...`` of the ordered data, 4 per batch."""

    def configure_optimizers(self):
        return torch.optim.SGD(list(lora_parameters(self)), lr=0.5)

    def train_dataloader(self):
        data = loader(n=24).dataset
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(torch.utils.data.Subset(data, range(rank, len(data), world)), batch_size=8 // world, shuffle=False)


@pytest.mark.parametrize("kind", DDP_KINDS)
@pytest.mark.parametrize("restore", ["exact", "host"])
def test_ddp_on_two_processes_matches_one_process_on_the_whole_batch(tmp_path, restore, kind):
    """strategy="ddp_spawn", 2 processes (CPU with gloo; 2 GPUs with NCCL where there are), batch 4 per rank, shared
    noise: every rank restores its frozen weights bitwise and ends with the LoRA weights of one process trained on the
    batches of 8 the two ranks split (the same W + e, gradients averaged; tolerance DDP_TOLERANCE: sums in another
    order). With independent noise (the default) the ranks' average differs from that run: each rank drew its own."""
    accelerator = "gpu" if kind == "cuda" else "cpu"
    ranks = {}
    for rank_noise in ("shared", "independent"):
        out = tmp_path / rank_noise
        out.mkdir()
        flat_cb = FlatLoRACallback(rho=0.5, schedule="constant", seed=3, restore=restore, rank_noise=rank_noise)
        trainer = trainer_for(out, [flat_cb, RankReport(str(out))], accelerator=accelerator, strategy="ddp_spawn", devices=2, max_steps=3,
                              limit_val_batches=0, use_distributed_sampler=False)
        trainer.fit(SGDMLP())
        ranks[rank_noise] = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    single = SGDMLP()
    flat_cb = FlatLoRACallback(rho=0.5, schedule="constant", seed=3, restore=restore)
    trainer_for(tmp_path / "single", [flat_cb], accelerator=accelerator, max_steps=3, limit_val_batches=0).fit(single)  # the same 8 samples per step
    assert_ddp_matches_one_process(ranks, [p.detach().cpu() for p in lora_parameters(single)], kind, steps=3)


DDP_SCRIPT = Path(__file__).with_name("lightning_ddp_fit.py")
DDP_SCRIPT_TIMEOUT_S = 120
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
            "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")


def _run_ranks(launcher: str, script: Path, args: list) -> list:
    """Start the script under ``launcher``; wait for every process it starts (in its own session: on a timeout the
    whole group, Lightning's rank-1 child included, is killed); returns ``[(command, returncode, output)]``."""
    env = {k: v for k, v in os.environ.items() if k not in _DDP_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, str(script), *args]
    if launcher == "subprocess":  # Lightning's _SubprocessScriptLauncher starts rank 1 as `python script ...` again
        runs = [(command, env)]
    elif launcher == "env":  # torchrun-style variables, two processes started here (LightningEnvironment, external)
        port = str(free_port())
        runs = [(command, {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "NODE_RANK": "0", "LOCAL_RANK": str(r)})
                for r in range(2)]
    elif launcher == "torchrun":  # TorchElasticEnvironment
        runs = [([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *command[1:]], env)]
    else:
        raise ValueError(launcher)
    procs = [(cmd, subprocess.Popen(cmd, env=e, cwd=script.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)) for cmd, e in runs]
    deadline = time.monotonic() + DDP_SCRIPT_TIMEOUT_S
    results = []
    try:
        for cmd, p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((cmd, p.returncode, out))
    except subprocess.TimeoutExpired:
        for _, p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: the launcher's children too
        outs = [p.communicate()[0] for _, p in procs]
        pytest.fail(f"{launcher}: no result in {DDP_SCRIPT_TIMEOUT_S} s\n" + "\n".join(o[-3000:] for o in outs))
    return results


@pytest.mark.parametrize("launcher", ["subprocess", "env", "torchrun"])
@pytest.mark.parametrize("restore", ["exact", "host"])
def test_ddp_strategy_on_two_processes_matches_one_process(tmp_path, restore, launcher):
    """strategy="ddp" (not ddp_spawn): Lightning's subprocess launcher re-running the script, torchrun-style
    variables with two processes started here, and torchrun itself. The script (copied to a temp dir and run in a
    subprocess: the launcher re-executes sys.argv) fits SGDMLP with shared and with independent noise; each rank's
    RankReport goes to a file. Same assertions as the ddp_spawn test: every rank clean after 3 steps, replicas
    equal, shared noise = one process on the batches of 8 (DDP_TOLERANCE), independent noise differs."""
    script = tmp_path / DDP_SCRIPT.name
    shutil.copy(DDP_SCRIPT, script)
    out = tmp_path / "out"
    args = ["--out", str(out), "--restore", restore, "--tests-dir", str(Path(__file__).parent)]
    for cmd, code, output in _run_ranks(launcher, script, args):
        assert code == 0, f"{' '.join(cmd)} exited with {code}:\n{output[-4000:]}"
    done = [json.loads((out / f"done-rank{r}").read_text()) for r in range(2)]
    environment = "TorchElasticEnvironment" if launcher == "torchrun" else "LightningEnvironment"
    assert all(d["strategy"] == "DDPStrategy" and d["launcher"] == "_SubprocessScriptLauncher" and d["environment"] == environment for d in done), done
    assert done[0]["pid"] != done[1]["pid"] and [d["children"] for d in done] == ([1, 0] if launcher == "subprocess" else [0, 0]), done
    ranks = {rank_noise: [torch.load(out / rank_noise / f"rank{r}.pt") for r in range(2)] for rank_noise in ("shared", "independent")}
    single = SGDMLP()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer_for(tmp_path / "single", [FlatLoRACallback(rho=0.5, schedule="constant", seed=3, restore=restore)], accelerator="cpu",
                    max_steps=3, limit_val_batches=0).fit(single)  # the same 8 samples per step
    assert_ddp_matches_one_process(ranks, [p.detach().cpu() for p in lora_parameters(single)], "cpu", steps=3)


class SkipsTheRestOfTheEpoch(LitMLP):
    """Answers -1 at its third batch: Lightning skips the rest of the epoch, on_train_batch_end included."""

    def on_train_batch_start(self, batch, batch_idx):
        return -1 if batch_idx == 2 else None


class EpochEndProbe(Callback):
    """At every epoch's end, before FlatLoRACallback's own hook: is the noise out, and may the model switch to eval?"""

    def __init__(self):
        self.seen = []

    def on_train_epoch_end(self, trainer, pl_module):
        flat = next(cb for cb in trainer.callbacks if isinstance(cb, FlatLoRACallback)).flat
        self.seen.append(flat.is_perturbed)
        pl_module.eval()  # in-place mode refuses a mode change while the noise is in
        pl_module.train()


def test_a_batch_start_answer_of_minus_one_restores_before_the_epochs_end(tmp_path):
    """The noise put in at the batch's start stayed in through the epoch-end hooks (a model.eval() there raised; SWA
    averaged W + e into the weights for good)."""
    module = SkipsTheRestOfTheEpoch()
    before = frozen_weights(module)
    probe = EpochEndProbe()
    trainer = trainer_for(tmp_path, [probe, FlatLoRACallback(rho=0.2, schedule="constant")], max_epochs=2, limit_val_batches=0)
    trainer.fit(module, loader())
    assert probe.seen == [False, False]
    assert trainer.global_step == 4  # two batches a epoch
    assert_frozen_unchanged(module, before)
    assert "on_train_batch_start" not in vars(module), "the module keeps the callback's wrapper after fit"


def test_a_gradient_accumulation_scheduler_without_total_steps_is_warned_about(tmp_path):
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    trainer = trainer_for(tmp_path, [GradientAccumulationScheduler({0: 1, 1: 2}), FlatLoRACallback(rho=0.2)], max_epochs=2,
                          limit_val_batches=0)
    with pytest.warns(UserWarning, match="GradientAccumulationScheduler.*total_steps") as caught:
        trainer.fit(LitMLP(), loader(16))
    assert sum("GradientAccumulationScheduler" in str(w.message) for w in caught) == 1, "warned more than once"


def test_virtual_mode_through_the_callback_trains_as_in_place_mode(tmp_path):
    """``FlatLoRACallback(mode="virtual")`` passes the mode through: the same LoRA weights as in-place exact restore, bit
    for bit, with accumulation; the noise is really applied (rho 0 gives other weights)."""

    def lora_after(rho, **kwargs):
        module = LitMLP()
        before = frozen_weights(module)
        trainer = trainer_for(tmp_path, [FlatLoRACallback(rho=rho, schedule="constant", **kwargs)], max_steps=3,
                              accumulate_grad_batches=2, limit_val_batches=0)
        trainer.fit(module, loader(24))
        assert_frozen_unchanged(module, before)
        return [p.detach().clone() for p in lora_parameters(module)]

    virtual, inplace, plain = lora_after(0.3, mode="virtual"), lora_after(0.3), lora_after(0.0)
    assert all(torch.equal(a, b) for a, b in zip(virtual, inplace))
    assert not all(torch.equal(a, b) for a, b in zip(virtual, plain))


class SkipsThenFails(SkipsTheRestOfTheEpoch):
    def training_step(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise ValueError("boom")
        return super().training_step(batch, batch_idx)


class SavesTheModule(Callback):
    def __init__(self):
        self.saved = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.save(pl_module, io.BytesIO())  # a checkpointing habit: the whole module, during fit
        self.saved += 1


def test_the_batch_start_wrapper_leaves_with_an_exception_and_is_not_pickled(tmp_path):
    """The wrapper on the module's on_train_batch_start is taken off after a fit that raised (Lightning runs neither
    on_fit_end nor teardown then), and a copy or pickle of the module during fit carries the module's own hook."""
    module = SkipsThenFails()
    saver = SavesTheModule()
    trainer = trainer_for(tmp_path, [saver, FlatLoRACallback(rho=0.2, schedule="constant")], max_epochs=2, limit_val_batches=0)
    with pytest.raises(ValueError, match="boom"):
        trainer.fit(module, loader())
    assert saver.saved == 2
    assert "on_train_batch_start" not in vars(module)
    torch.save(module, io.BytesIO())
    probe = EpochEndProbe()  # a later fit of the same module (one epoch: no boom), with a new callback, restores at the skip again
    trainer_for(tmp_path, [probe, FlatLoRACallback(rho=0.2, schedule="constant")], max_epochs=1, limit_val_batches=0).fit(
        module, loader())
    assert probe.seen == [False]
    assert "on_train_batch_start" not in vars(module)


def test_a_wrapper_left_on_the_module_answers_to_the_new_callback(tmp_path):
    """A wrapper left by a fit whose end no hook saw is taken over, not wrapped again (the module kept it after fit)."""
    module = SkipsTheRestOfTheEpoch()
    FlatLoRACallback(rho=0.2)._watch_batch_start(module)  # its callback is gone at once: the stale wrapper
    probe = EpochEndProbe()
    trainer_for(tmp_path, [probe, FlatLoRACallback(rho=0.2, schedule="constant")], max_epochs=1, limit_val_batches=0).fit(
        module, loader())
    assert probe.seen == [False]
    assert "on_train_batch_start" not in vars(module), "the stale wrapper came back after fit"


class StepsEveryOtherBatch(TwoBackwardsMLP):
    """Manual optimization stepping every second batch: Lightning's estimate (batches) is twice the optimizer's steps."""

    def training_step(self, batch, batch_idx):
        self.manual_backward(nn.functional.cross_entropy(self(batch[0]), batch[1]))
        if batch_idx % 2 == 1:
            self.optimizers().step()
            self.optimizers().zero_grad()


@pytest.mark.parametrize("given", [False, True], ids=["estimated", "total_steps given"])
def test_manual_optimization_warns_that_the_estimate_counts_batches(tmp_path, given):
    """Under manual optimization estimated_stepping_batches counts batches (12 here) while the module steps every
    other batch (6 steps): the schedule would end at half its length's noise. The callback warns once, unless
    total_steps is given, which then sets the schedule's length."""
    module = StepsEveryOtherBatch()
    callback = FlatLoRACallback(rho=0.2, total_steps=6 if given else None)
    trainer = trainer_for(tmp_path, [callback], max_epochs=2, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader(24))
    warned = sum("manual optimization" in str(w.message) for w in caught)
    assert warned == (0 if given else 1)
    assert callback.flat.step_count == 6
    assert callback.flat.schedule.total_steps == (6 if given else 12)


@pytest.mark.parametrize("kwargs, error", [(dict(restore="bogus"), ValueError), (dict(rho=-1.0), ValueError),
                                           (dict(schedule="cosin"), ValueError), (dict(total_steps=0), ValueError),
                                           (dict(seed=-1), ValueError), (dict(mode="virtul"), ValueError),
                                           (dict(rhoo=0.1), TypeError)])
def test_callback_checks_its_arguments_when_built(kwargs, error):
    """A wrong setting is refused where it is written, not when fit() reaches on_fit_start (after the Trainer, the
    module and its optimizer were set up)."""
    with pytest.raises(error):
        FlatLoRACallback(**kwargs)


class SchedulerOnFlatLoRA(LitMLP):
    """The documented way to one learning-rate series: return the FlatLoRA, with the scheduler built on it."""

    def configure_optimizers(self):
        flat = FlatLoRA(torch.optim.AdamW(list(lora_parameters(self)), lr=1e-2), self, rho=0.2, schedule="constant", seed=5)
        return {"optimizer": flat, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(flat, 1, gamma=0.5), "interval": "step"}}


def test_learning_rate_monitor_logs_one_series_with_the_scheduler_on_the_flatlora(tmp_path):
    """With the scheduler built on the FlatLoRA returned by configure_optimizers, LearningRateMonitor logs one series,
    and the learning rate halves at every step as the scheduler says (weights clean after the fit)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    module = SchedulerOnFlatLoRA()
    before = frozen_weights(module)
    monitor = LearningRateMonitor(logging_interval="step")
    trainer = trainer_for(tmp_path, [monitor, FlatLoRACallback()], max_steps=4, limit_val_batches=0, log_every_n_steps=1,
                          logger=pl.loggers.CSVLogger(str(tmp_path)))
    trainer.fit(module, loader(24))
    assert list(monitor.lrs) == ["lr-FlatLoRA"]
    assert monitor.lrs["lr-FlatLoRA"] == pytest.approx([1e-2 * 0.5 ** k for k in range(4)])
    assert_frozen_unchanged(module, before)


class OwnFlatLoRAResized(LitMLP):
    """A FlatLoRA of its own, set to the resumed run's length in on_train_start (the documented remedy)."""

    def __init__(self):
        super().__init__(own_flatlora=True)

    def on_train_start(self):
        self.trainer.optimizers[0].set_total_steps(self.trainer.estimated_stepping_batches)


@pytest.mark.parametrize("resized", [False, True], ids=["kept", "set in on_train_start"])
def test_resuming_a_longer_run_with_an_own_flatlora_warns_of_the_saved_length(tmp_path, resized):
    """A FlatLoRA returned by configure_optimizers, resumed from a 4-step run for 8 steps: loading keeps the saved
    length and warns that it differs from the new one; set_total_steps in the module's on_train_start (after Lightning
    loaded the checkpoint) gives the new run its length. A wrapper the callback builds sets it itself, without warning."""
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer_for(tmp_path, [FlatLoRACallback(), ckpt], max_steps=4, limit_val_batches=0).fit(LitMLP(own_flatlora=True), loader(16))
    module = OwnFlatLoRAResized() if resized else LitMLP(own_flatlora=True)
    callback = FlatLoRACallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(tmp_path / "b", [callback], max_steps=8, limit_val_batches=0).fit(
            module, loader(16), ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))
    assert sum("total_steps=4 (this FlatLoRA has 8)" in str(w.message) for w in caught) == 1
    assert callback.flat.step_count == 8
    assert callback.flat.schedule.total_steps == (8 if resized else 4)

    owned = FlatLoRACallback(rho=0.2, schedule="linear", seed=5)  # the own wrapper's settings: only the length differs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(tmp_path / "c", [owned], max_steps=8, limit_val_batches=0).fit(
            LitMLP(), loader(16), ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))
    assert not any("loaded Flat-LoRA state" in str(w.message) for w in caught)
    assert owned.flat.schedule.total_steps == 8 and owned.flat.step_count == 8
