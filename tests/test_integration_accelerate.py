"""accelerate + Flat-LoRA: ``accelerator.prepare(model, FlatLoRA(...))`` with ``accelerator.accumulate``.

The prepared loop must do exactly what a hand-written Flat-LoRA loop does (same noise per
optimizer step, same gradients, same updates: compared bitwise), count optimizer steps (not
micro-batches), go through accelerate's GradScaler path (a skipped step leaves the weights clean
and reuses the draw), and save/load state with clean weights on disk and the noise stream intact.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import DDP_KINDS, assert_ddp_matches_one_process, bits, frozen_weights, make_mlp, run_as_two_ranks
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatlora_optim import FlatLoRA, lora_parameters
from flatlora_optim.integrations.accelerate import count_optimizer_steps, perturbed, set_total_steps, unwrap_flatlora

PROBED = "2"  # the middle LoRALinear of make_mlp


@pytest.fixture(autouse=True)
def fresh_accelerate_state(monkeypatch):
    """accelerate keeps process-wide singletons; each test builds its own Accelerator. One thread: tiny matrices."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)  # full precision unless a test asks otherwise
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


def loader(n_batches: int = 10, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * batch_size, 12, generator=gen)
    y = torch.randint(0, 5, (n_batches * batch_size,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_prepared_accumulation_equals_a_hand_written_flatlora_loop():
    accum, epochs, rho = 3, 2, 0.1
    # --- accelerate: the user's loop, unchanged except for the wrapper and the perturbed() block
    model = make_mlp()
    initial = frozen_weights(model)
    flat = FlatLoRA(torch.optim.AdamW(list(lora_parameters(model)), lr=1e-2), model, rho=rho, total_steps=1, seed=7)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    model, opt, dl = accelerator.prepare(model, flat, loader(10))
    assert unwrap_flatlora(opt) is flat and opt is not flat
    total = count_optimizer_steps(accelerator, dl, epochs)
    assert total == math.ceil(10 / accum) * epochs == 8  # the short last window of each epoch is a step
    set_total_steps(opt, total)
    seen = []  # (step count, probed weight bits) per micro-batch
    for _ in range(epochs):
        for x, y in dl:
            with accelerator.accumulate(model):
                with perturbed(opt):
                    loss = nn.functional.cross_entropy(model(x), y)
                    seen.append((flat.step_count, bits(model[int(PROBED)].weight)))
                accelerator.backward(loss)
                assert not flat.is_perturbed  # restored at the end of the backward
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
    assert flat.step_count == total == flat.schedule.total_steps
    assert all(torch.equal(initial[k], v) for k, v in frozen_weights(model).items())
    # one draw per optimizer step: windows of 3, 3, 3, 1 micro-batches per epoch
    windows: dict = {}
    for step, weight_bits in seen:
        windows.setdefault(step, []).append(weight_bits)
    assert [len(windows[s]) for s in range(total)] == [3, 3, 3, 1] * epochs
    for step, draws in windows.items():
        assert all(torch.equal(draws[0], d) for d in draws)
        assert torch.equal(draws[0], initial[f"{PROBED}.weight"]) == (step == 0)

    # --- the same training written by hand with the plain wrapper
    ref = make_mlp()
    ref_flat = FlatLoRA(torch.optim.AdamW(list(lora_parameters(ref)), lr=1e-2), ref, rho=rho, total_steps=total, seed=7)
    batches = list(loader(10))
    for _ in range(epochs):
        for start in range(0, len(batches), accum):
            for x, y in batches[start : start + accum]:
                with ref_flat.perturbed():
                    loss = nn.functional.cross_entropy(ref(x), y) / accum  # accelerate divides by the accumulation steps
                loss.backward()
            torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
            ref_flat.step()
            ref_flat.zero_grad()
    for name, value in lora_state(ref).items():
        assert torch.equal(value, lora_state(model)[name]), f"{name} differs from the hand-written loop"


def test_grad_scaler_path_skipped_step_and_save_load_state(tmp_path):
    model = make_mlp()
    initial = frozen_weights(model)
    flat = FlatLoRA(torch.optim.AdamW(list(lora_parameters(model)), lr=1e-2), model, rho=0.1, schedule="constant", seed=2)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # accelerate makes none on CPU; test its scaler path
    model, opt, dl = accelerator.prepare(model, flat, loader(8))
    assert opt.scaler is accelerator.scaler
    batches = iter(dl)

    def micro_batch(poison: bool = False) -> torch.Tensor:
        x, y = next(batches)
        with accelerator.accumulate(model):
            with perturbed(opt):
                loss = nn.functional.cross_entropy(model(x), y)
                weight = bits(model[int(PROBED)].weight)
            accelerator.backward(loss)
            if poison and accelerator.sync_gradients:
                model[int(PROBED)].lora_A.grad[0, 0] = float("inf")
            opt.step()
            opt.zero_grad()
        return weight

    first = [micro_batch(), micro_batch(poison=True)]  # the scaler finds inf and skips the step
    assert opt.step_was_skipped and flat.step_count == 0 and not flat.is_perturbed
    retry = [micro_batch(), micro_batch()]  # same step: same draw; this time it steps
    assert not opt.step_was_skipped and flat.step_count == 1
    assert all(torch.equal(first[0], w) for w in first + retry)
    after = micro_batch()
    assert not torch.equal(after, first[0])  # step 1: a new draw

    # save in the middle of a window while the noise is in: the files hold clean weights and the Flat-LoRA step
    with perturbed(opt):
        accelerator.save_state(str(tmp_path / "state"))
    saved = load_file(str(tmp_path / "state" / "model.safetensors"))
    assert all(torch.equal(bits(saved[k]), v) for k, v in initial.items())
    optimizer_state = torch.load(tmp_path / "state" / "optimizer.bin", weights_only=False)
    assert optimizer_state["flatlora"]["step"] == 1 and optimizer_state["flatlora"]["seed"] == 2
    assert all(torch.equal(initial[k], v) for k, v in frozen_weights(model).items())

    # load into a fresh run: the next draw is the one the first run would take
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    model_b = make_mlp()
    flat_b = FlatLoRA(torch.optim.AdamW(list(lora_parameters(model_b)), lr=1e-2), model_b, rho=0.1, schedule="constant", seed=0)
    accelerator_b = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model_b, opt_b = accelerator_b.prepare(model_b, flat_b)
    accelerator_b.load_state(str(tmp_path / "state"))
    assert flat_b.step_count == 1 and flat_b.seed == 2
    with perturbed(opt_b):
        assert torch.equal(bits(model_b[int(PROBED)].weight), after)


def test_helpers_refuse_a_plain_optimizer():
    model = make_mlp()
    accelerator = Accelerator(cpu=True)
    opt = accelerator.prepare(torch.optim.AdamW(list(lora_parameters(model))))
    with pytest.raises(TypeError, match="FlatLoRA"):
        unwrap_flatlora(opt)
    with pytest.raises(TypeError, match="FlatLoRA"):
        set_total_steps(opt, 10)


def _one_sample_loader(n: int, batch_size: int = 4) -> DataLoader:
    """``n`` copies of one sample: every batch is the same whatever rank takes it."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 12, generator=gen), torch.randint(0, 5, (1,), generator=gen)
    return DataLoader(TensorDataset(x.repeat(n, 1), y.repeat(n)), batch_size=batch_size, shuffle=False)


def _accelerate_loop(n_samples: int, restore: str, rank_noise: str, kind: str) -> dict:
    """The documented loop (accumulation 2, perturbed() per micro-batch, backward after it), SGD, on the CPU or the
    process's GPU."""
    torch.set_num_threads(1)
    model = make_mlp()
    initial = frozen_weights(model)
    flat = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.5), model, rho=0.5, schedule="constant", seed=7,
                    restore=restore, rank_noise=rank_noise)
    accelerator = Accelerator(cpu=kind == "cpu", gradient_accumulation_steps=2)
    model, opt, dl = accelerator.prepare(model, flat, _one_sample_loader(n_samples))
    for x, y in dl:
        with accelerator.accumulate(model):
            with perturbed(opt):
                loss = nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
    net = accelerator.unwrap_model(model)
    return {"clean": all(torch.equal(initial[k], v.cpu()) for k, v in frozen_weights(net).items()), "steps": flat.step_count,
            "lora": [p.detach().cpu() for p in lora_parameters(net)]}


@pytest.mark.parametrize("kind", DDP_KINDS)
@pytest.mark.parametrize("restore", ["exact", "host"])
def test_ddp_on_two_processes_matches_one_process(tmp_path, restore, kind):
    """The documented loop under DDP (2 CPU processes with gloo; 2 GPUs with NCCL where there are; set up by accelerate
    from the torchrun variables): every rank restores its frozen weights bitwise, the replicas stay equal, and with
    shared noise the LoRA weights are one process's on the same batches (one sample repeated; tolerance DDP_TOLERANCE:
    the ranks' gradients are averaged); with the default independent noise they are not."""
    ranks = {noise: run_as_two_ranks(tmp_path / noise, functools.partial(_accelerate_loop, 48, restore, noise, kind))  # 6 batches of 4 per rank
             for noise in ("shared", "independent")}
    single = _accelerate_loop(24, restore, "independent", kind)  # 6 batches of 4: 3 steps
    assert single["clean"] and single["steps"] == 3
    assert_ddp_matches_one_process(ranks, single["lora"], kind, steps=3)


def test_flatlora_refuses_accelerates_prepared_optimizer():
    """Wrapping the optimizer accelerate returns (the other order than the documented one) would count every micro-batch
    of an accumulation window as a step and draw new noise for it: refused, with the documented order in the message."""
    model = make_mlp()
    initial = frozen_weights(model)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    prepared = accelerator.prepare(torch.optim.AdamW(list(lora_parameters(model))))
    with pytest.raises(ValueError, match=r"accelerator\.prepare\(model, opt\)"):
        FlatLoRA(prepared, model, rho=0.1, total_steps=10)
    assert all(torch.equal(initial[k], v) for k, v in frozen_weights(model).items())


def test_count_optimizer_steps_explains_a_loader_without_length():
    """An iterable dataset has no length before the run: a TypeError that says what to do, not len()'s own."""

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(torch.randn(8, 12))

    accelerator = Accelerator(cpu=True)
    with pytest.raises(TypeError, match="total_steps"):
        count_optimizer_steps(accelerator, accelerator.prepare(DataLoader(Stream(), batch_size=4)))
