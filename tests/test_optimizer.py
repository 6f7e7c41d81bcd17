"""FlatLoRA behaves as a torch optimizer: shared groups/state, schedulers, GradScaler, resume."""

from __future__ import annotations

import gc
import io
import warnings

import pytest
import torch
from conftest import assert_frozen_unchanged, batch, bits, frozen_weights, make_mlp, steps_in_blocks, train_step
from torch import nn

from flatlora_optim import FlatLoRA, lora_parameters


def _opt(model, **kwargs):
    kwargs.setdefault("rho", 0.1)
    kwargs.setdefault("total_steps", 20)
    base = torch.optim.AdamW(list(lora_parameters(model)), lr=1e-2, weight_decay=0.01)
    return FlatLoRA(base, model, **kwargs)


def _train(model, opt, steps, start=0, scheduler=None):
    losses = []
    dtype = next(model.parameters()).dtype
    for step in range(start, start + steps):
        x, y = batch(step, dtype=dtype)
        with opt.perturbed():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_is_an_optimizer_sharing_the_wrapped_objects(mlp):
    opt = _opt(mlp)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    assert opt.defaults is opt.base_optimizer.defaults
    _train(mlp, opt, 2)
    assert len(opt.state) == len(list(lora_parameters(mlp)))  # AdamW state visible through the wrapper


def test_lr_scheduler_acts_on_the_shared_groups(mlp):
    opt = _opt(mlp)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(mlp, opt, 3, scheduler=sched)
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)


def test_add_param_group_and_zero_grad(mlp):
    extra = nn.Parameter(torch.zeros(3))
    opt = _opt(mlp)
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert opt.base_optimizer.param_groups[-1]["params"] == [extra]
    extra.grad = torch.ones(3)
    opt.zero_grad()
    assert extra.grad is None


def test_closure_returns_its_loss_and_is_run_perturbed(mlp):
    opt = _opt(mlp, schedule="constant", total_steps=None)
    seen = []

    def closure():
        seen.append(opt.is_perturbed)
        loss = nn.functional.cross_entropy(mlp(batch(0)[0]), batch(0)[1])
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and seen == [True]
    assert not opt.is_perturbed and opt.step_count == 1


def _closure_run(held: bool, change: str, reuse: bool, monkeypatch):
    """One step(closure) of a fresh MLP after perturb() (``held``) or with clean weights, an adapter of the first layer
    moved in between (``change``: "", "inplace", "data": through ``.data``, no version bump; "other": by a second
    optimizer over the layers FlatLoRA's does not hold); ``reuse``: the flag the Lightning callback sets. Returns the
    draws and restores made, the weight the closure saw and every LoRA parameter after the step."""
    from flatlora_optim.perturbation import Perturber

    calls = {"draws": 0, "restores": 0}
    perturb_all, restore_all = Perturber.perturb_all, Perturber.restore_all
    monkeypatch.setattr(Perturber, "perturb_all", lambda self, *a, **k: (calls.__setitem__("draws", calls["draws"] + 1), perturb_all(self, *a, **k))[1])
    monkeypatch.setattr(Perturber, "restore_all", lambda self, *a, **k: (calls.__setitem__("restores", calls["restores"] + 1), restore_all(self, *a, **k))[1])
    model = make_mlp(seed=2)
    before = frozen_weights(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    first = dict(model.named_parameters())[names[0]]  # an adapter factor of the first LoRA layer
    held_by_flat = list(lora_parameters(model)) if change != "other" else [p for n, p in model.named_parameters() if p.requires_grad and n not in names[:2]]
    opt = FlatLoRA(torch.optim.AdamW(held_by_flat, lr=1e-2), model, rho=0.1, schedule="constant")
    opt._closure_reuses_held_noise = reuse
    seen = []

    def closure():
        seen.append(bits(model[0].weight))
        loss = nn.functional.cross_entropy(model(batch(0)[0]), batch(0)[1])
        loss.backward()
        return loss

    if held:
        opt.perturb()
    with torch.no_grad():
        if change == "inplace":
            first.add_(0.5)  # after the draw: the row stds read the adapters
        elif change == "data":
            first.data.add_(0.5)
        elif change == "other":
            second = torch.optim.SGD([first], lr=10.0)
            first.grad = torch.ones_like(first)
            second.step()
            first.grad = None
    opt.step(closure)
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)
    monkeypatch.undo()
    return calls, seen[0], [bits(p) for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("change", ["", "inplace", "data", "other"])
def test_step_with_a_closure_draws_from_the_adapters_of_that_moment(change, monkeypatch):
    """perturb() then step(closure): by default the step restores the held noise and the closure draws it again, from
    the adapters as they are then (moved in place, through .data or by another optimizer after perturb()), to the
    bit as step(closure) from clean weights."""
    calls, weight, params = _closure_run(held=True, change=change, reuse=False, monkeypatch=monkeypatch)
    calls_clean, weight_clean, params_clean = _closure_run(held=False, change=change, reuse=False, monkeypatch=monkeypatch)
    assert calls_clean == {"draws": 1, "restores": 1} and calls == {"draws": 2, "restores": 2}
    assert torch.equal(weight, weight_clean)
    assert all(torch.equal(a, b) for a, b in zip(params, params_clean))


def test_step_with_a_closure_computes_at_the_held_noise_where_an_integration_says_so(monkeypatch):
    """With the flag the Lightning callback sets in automatic optimization, perturb() then step(closure) draws and
    restores once: the closure computes at the held noise, and the step is the same to the bit as from clean weights."""
    calls, weight, params = _closure_run(held=True, change="", reuse=True, monkeypatch=monkeypatch)
    calls_clean, weight_clean, params_clean = _closure_run(held=False, change="", reuse=True, monkeypatch=monkeypatch)
    assert calls == calls_clean == {"draws": 1, "restores": 1}
    assert torch.equal(weight, weight_clean)
    assert all(torch.equal(a, b) for a, b in zip(params, params_clean))


def test_a_closure_that_computes_nothing_runs_at_clean_weights_even_where_held_noise_could_be_reused(mlp):
    """A closure an integration reports as computing nothing (Lightning's empty one) runs at W, with the held noise
    taken out first, also where the integration's flag would let a computing closure reuse that noise: nothing is
    left in the weights after the step."""
    before = frozen_weights(mlp)
    opt = _opt(mlp, schedule="constant", total_steps=None)
    opt._closure_reuses_held_noise, opt._closure_computes = True, lambda closure: False
    seen = []
    opt.perturb()
    assert opt.is_perturbed
    opt.step(lambda: seen.append(opt.is_perturbed))
    assert seen == [False] and not opt.is_perturbed and opt.step_count == 1
    assert_frozen_unchanged(mlp, before)


def test_lbfgs_closure_called_several_times_with_one_draw(mlp):
    """Every closure call sees the same draw z; its row scale follows the adapters as they move."""
    before = frozen_weights(mlp)
    clean = mlp[0].weight.detach().clone()
    opt = FlatLoRA(torch.optim.LBFGS(list(lora_parameters(mlp)), max_iter=4), mlp, rho=0.1, schedule="constant")
    draws = []

    def closure():
        opt.zero_grad()
        draws.append(mlp[0].weight.detach() - clean)
        loss = nn.functional.cross_entropy(mlp(batch(0)[0]), batch(0)[1])
        loss.backward()
        return loss

    opt.step(closure)
    assert len(draws) > 1 and draws[0].abs().sum() > 0
    for d in draws[1:]:
        assert torch.corrcoef(torch.stack([d.flatten(), draws[0].flatten()]))[0, 1] > 0.9  # independent draws would give ~0
    assert_frozen_unchanged(mlp, before)


def test_grad_scaler_on_cpu_including_a_skipped_step(mlp):
    before = frozen_weights(mlp)
    opt = _opt(mlp)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    lora_before = [p.detach().clone() for p in lora_parameters(mlp)]
    x, y = batch(0)
    with opt.perturbed():
        loss = nn.functional.cross_entropy(mlp(x), y)
    scaler.scale(loss).backward()
    next(lora_parameters(mlp)).grad[0, 0] = float("inf")  # force an inf: the scaler skips step()
    scaler.step(opt)
    scaler.update()
    assert opt.step_count == 0 and not opt.is_perturbed
    assert all(torch.equal(a, b) for a, b in zip(lora_before, lora_parameters(mlp)))
    assert_frozen_unchanged(mlp, before)
    opt.zero_grad()
    with opt.perturbed():
        loss = nn.functional.cross_entropy(mlp(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.step_count == 1
    assert not all(torch.equal(a, b) for a, b in zip(lora_before, lora_parameters(mlp)))
    assert_frozen_unchanged(mlp, before)


def _save(model, opt) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(dtype):
    model = make_mlp(seed=5).to(dtype)
    opt = _opt(model, seed=7)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    _train(model, opt, 6, scheduler=sched)
    checkpoint = _save(model, opt)
    sched_state = sched.state_dict()
    uninterrupted = _train(model, opt, 6, start=6, scheduler=sched)
    final = [bits(p) for p in model.parameters()]

    model2 = make_mlp(seed=99).to(dtype)  # different init, overwritten by the checkpoint
    opt2 = _opt(model2, seed=0, rho=0.3)  # different seed and rho: the checkpoint's win
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=20)
    state = torch.load(io.BytesIO(checkpoint))
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(sched_state)
    assert opt2.step_count == 6 and opt2.seed == 7 and opt2.schedule.rho == 0.1
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    resumed = _train(model2, opt2, 6, start=6, scheduler=sched2)
    assert resumed == uninterrupted
    assert all(torch.equal(a, bits(b)) for a, b in zip(final, model2.parameters()))


def test_state_dict_keeps_torch_format_and_flat_state(mlp):
    opt = _opt(mlp, seed=3)
    _train(mlp, opt, 2)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "flatlora"}
    assert sd["flatlora"]["step"] == 2 and sd["flatlora"]["seed"] == 3 and sd["flatlora"]["schedule"] == "cosine"
    plain = {k: v for k, v in sd.items() if k != "flatlora"}
    opt.base_optimizer.load_state_dict(plain)  # the base optimizer accepts it as is


def test_loading_a_plain_state_dict_warns(mlp):
    opt = _opt(mlp)
    with pytest.warns(UserWarning, match="restarts at step 0"):
        opt.load_state_dict(opt.base_optimizer.state_dict())


def test_same_seed_same_run_different_seed_different_run():
    def run(seed):
        model = make_mlp(seed=1)
        opt = _opt(model, seed=seed, schedule="constant", total_steps=None)
        return _train(model, opt, 4), [bits(p) for p in lora_parameters(model)]

    (l1, p1), (l2, p2), (l3, _) = run(0), run(0), run(1)
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert l1[1:] != l3[1:]


def test_repr_and_read_outs(mlp):
    opt = _opt(mlp)
    assert "FlatLoRA(AdamW" in repr(opt) and "rho=0.1" in repr(opt)
    assert opt.perturbed_bytes == sum(m.weight.numel() * 4 for m in mlp if hasattr(m, "lora_A"))
    assert opt.restore_strategy == "exact" and opt.sigma == 0.0
    opt.step()
    assert opt.sigma > 0


# -- the optimizer protocol's less travelled paths (found by an adversarial review) --------------------------------


def _wrapped(model=None, inner=torch.optim.AdamW, **kwargs):
    model = model if model is not None else make_mlp(seed=0)
    kwargs.setdefault("rho", 0.1)
    kwargs.setdefault("schedule", "constant")
    return model, FlatLoRA(inner(list(lora_parameters(model)), lr=1e-2), model, **kwargs)


@pytest.mark.parametrize("inner", [torch.optim.SGD, torch.optim.AdamW], ids=["SGD", "AdamW"])
def test_grad_scaler_with_a_fused_inner_optimizer_unscales_and_skips_inf_steps(inner):
    """A fused optimizer unscales inside its step, from the ``grad_scale`` / ``found_inf`` GradScaler sets on the object it
    is given: on the wrapper they once went unread (steps 1024x too large, inf steps applied)."""
    def run(wrap, inf):
        model = make_mlp(seed=0)
        base = inner(list(lora_parameters(model)), lr=1e-2, fused=True)
        opt = FlatLoRA(base, model, rho=0.1, schedule="constant") if wrap else base
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        x, y = batch(0)
        if wrap:
            with opt.perturbed():
                loss = nn.functional.cross_entropy(model(x), y)
        else:
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss * (float("inf") if inf else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
        return [p.detach().clone() for p in lora_parameters(model)], opt

    start = [p.detach().clone() for p in lora_parameters(make_mlp(seed=0))]
    plain, _ = run(False, False)
    flat, opt = run(True, False)
    plain_update = sum((a - b).abs().sum() for a, b in zip(plain, start))
    flat_update = sum((a - b).abs().sum() for a, b in zip(flat, start))
    torch.testing.assert_close(flat_update, plain_update, rtol=0.2, atol=0)  # the noise moves it a little, not 1024x
    assert opt.step_count == 1
    skipped, opt = run(True, True)
    assert all(torch.equal(a, b) for a, b in zip(skipped, start)), "an inf step was applied"
    assert opt.step_count == 0, "a skipped step advanced the noise schedule"
    assert not hasattr(opt.base_optimizer, "grad_scale") and not hasattr(opt.base_optimizer, "found_inf")


def test_state_dict_hooks_registered_on_the_wrapper_run():
    model, opt = _wrapped()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: (calls.append("post"), {**sd, "extra": 1})[1])
    opt.register_load_state_dict_pre_hook(lambda o, sd: (calls.append("load pre"), {k: v for k, v in sd.items() if k != "extra"})[1])
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    state = opt.state_dict()
    assert state["extra"] == 1 and "flatlora" in state
    opt.load_state_dict(state)
    assert calls == ["pre", "post", "load pre", "load post"]


def test_load_state_dict_checks_before_it_changes_anything():
    model, opt = _wrapped(schedule=lambda step: 1.0)
    train_step(model, opt, 0)
    state = opt.state_dict()
    model2, fresh = _wrapped(make_mlp(seed=0))  # a named schedule: the callable checkpoint cannot load into it
    fresh.param_groups[0]["lr"] = 0.5
    with pytest.raises(ValueError, match="callable schedule"):
        fresh.load_state_dict(state)
    assert fresh.param_groups[0]["lr"] == 0.5 and not fresh.state, "the wrapped optimizer loaded before the check failed"
    with pytest.raises(ValueError, match="version"):
        fresh.load_state_dict({**state, "flatlora": {**state["flatlora"], "version": -1}})
    assert fresh.param_groups[0]["lr"] == 0.5 and fresh.step_count == 0


def test_a_failing_inner_load_leaves_the_held_noise_in():
    """The wrapped optimizer loads before the noise comes off: a state dict it refuses (another layout of groups)
    changes nothing, so the pending backward still runs at the noise it was built at."""
    model, opt = _wrapped()
    state = opt.state_dict()
    state["param_groups"] = state["param_groups"] + [dict(state["param_groups"][0], params=[])]
    x, y = batch(0)
    opt.perturb()
    loss = nn.functional.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(state)
    assert opt.is_perturbed, "the refused load took the noise out before the wrapped optimizer raised"
    loss.backward()  # the graph's weights are still the ones it was built at
    opt.restore()
    assert not opt.is_perturbed


@pytest.mark.parametrize("edit, message", [
    ({"seed": -1}, "seed is -1"),
    ({"step": -5}, "step is -5"),
    ({"step": 2.7}, "step is 2.7"),
    ({"step": True}, "step is True"),
    ("drop", "lacks"),
    ("none", "must be the dict"),
], ids=["negative seed", "negative step", "fractional step", "boolean step", "truncated", "None"])
def test_a_corrupt_flatlora_entry_is_refused_before_anything_changes(edit, message):
    model, opt = _wrapped(schedule="cosine", total_steps=10)
    train_step(model, opt, 0)
    state = opt.state_dict()
    flat = None if edit == "none" else {"version": state["flatlora"]["version"]} if edit == "drop" else {**state["flatlora"], **edit}
    _, fresh = _wrapped(make_mlp(seed=0), schedule="cosine", total_steps=10)
    if flat is not None:  # (a state dict whose entry is None loads as one without it: a plain optimizer's)
        with pytest.raises(ValueError, match=message):
            fresh.load_state_dict({**state, "flatlora": flat})
    with pytest.raises(ValueError, match=message):
        fresh.load_flatlora_state_dict(flat)
    assert fresh.step_count == 0 and fresh.seed == 0 and not fresh.state


def test_wrappers_built_again_around_one_optimizer_leave_no_hooks_behind():
    model = make_mlp(seed=0)
    inner = torch.optim.AdamW(list(lora_parameters(model)), lr=1e-2)
    before = len(inner._optimizer_step_post_hooks)
    for _ in range(5):
        opt = FlatLoRA(inner, model, rho=0.1, schedule="constant")
    assert len(inner._optimizer_step_post_hooks) == before + 1, "each dropped wrapper left its step hook on the optimizer"
    del opt
    gc.collect()
    assert len(inner._optimizer_step_post_hooks) == before


def test_load_state_dict_inside_the_block_is_refused():
    model, opt = _wrapped()
    state = opt.state_dict()
    with opt.perturbed():
        with pytest.raises(RuntimeError, match="inside opt.perturbed"):
            opt.load_state_dict(state)
        assert opt.is_perturbed, "the refused load took the noise out"


def test_loading_other_targets_or_a_plain_state_says_so():
    model, opt = _wrapped()
    train_step(model, opt, 0)
    state = opt.state_dict()
    renamed = nn.Sequential()
    renamed.add_module("net", make_mlp(seed=0))
    _, other = _wrapped(renamed)
    with pytest.warns(UserWarning, match="other targets.*will not continue"):
        other.load_state_dict(state)
    plain = {k: v for k, v in state.items() if k != "flatlora"}
    with pytest.warns(UserWarning, match="restarts at step 0"):
        opt.load_state_dict(plain)
    assert opt.step_count == 0


def test_loading_other_noise_settings_keeps_the_checkpoints_and_says_so():
    """A state saved at rho 0.1, seed 3, a linear schedule over 20 steps, loaded into a wrapper built with other values:
    the checkpoint's are kept (the run resumes as saved) and a warning names each one that changed; a wrapper built
    with the same settings loads silently, and so does one whose length an integration sets after loading."""
    model, opt = _wrapped(seed=3, schedule="linear", total_steps=20)
    train_step(model, opt, 0)
    state = opt.state_dict()
    _, other = _wrapped(make_mlp(seed=0), rho=0.3, seed=9, schedule="cosine", total_steps=50)
    with pytest.warns(UserWarning, match=r"rho=0\.1 \(this FlatLoRA has 0\.3\), seed=3 \(this FlatLoRA has 9\), "
                                         r"schedule='linear' \(this FlatLoRA has 'cosine'\), total_steps=20 \(this FlatLoRA has 50\)"):
        other.load_state_dict(state)
    assert (other.schedule.rho, other.schedule.schedule, other.schedule.total_steps, other._perturber.seed, other.step_count) == \
        (0.1, "linear", 20, 3, 1)
    _, same = _wrapped(make_mlp(seed=0), seed=3, schedule="linear", total_steps=20)
    _, longer = _wrapped(make_mlp(seed=0), seed=3, schedule="linear", total_steps=50)
    longer._length_set_after_loading = True  # as the Lightning and transformers integrations mark the wrappers they size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)
        same.load_flatlora_state_dict(opt.flatlora_state_dict())
        longer.load_state_dict(state)


def test_resume_through_torch_distributed_checkpoint_helpers_with_the_flatlora_state():
    """``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups`` and, on a fresh optimizer, initialises its
    state with a zero-lr ``step()``: that step does not count, and ``flatlora_state_dict`` carries the rest."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt = _wrapped(schedule="linear", total_steps=10)
    reference, ref_opt = _wrapped(make_mlp(seed=0), schedule="linear", total_steps=10)
    for s in range(3):
        train_step(model, opt, s)
        train_step(reference, ref_opt, s)
    saved, flat = get_optimizer_state_dict(model, opt), opt.flatlora_state_dict()
    assert opt.step_count == 3
    model2, opt2 = _wrapped(make_mlp(seed=0), schedule="linear", total_steps=10)
    model2.load_state_dict(model.state_dict())
    get_optimizer_state_dict(model2, opt2)  # initialises a fresh optimizer's state with a zero-lr step()
    assert opt2.step_count == 0, "the state initialisation's step advanced the noise schedule"
    with pytest.warns(UserWarning, match="without Flat-LoRA state"):  # the helper loads state and param_groups only
        set_optimizer_state_dict(model2, opt2, saved)
    opt2.load_flatlora_state_dict(flat)
    assert opt2.step_count == 3
    for s in range(3, 6):
        train_step(model2, opt2, s)
        train_step(reference, ref_opt, s)
    for a, b in zip(lora_parameters(model2), lora_parameters(reference)):
        assert torch.equal(a, b), "the resumed run left the uninterrupted one"


def test_a_step_without_a_draw_and_with_no_numeric_lr_counts_and_does_not_raise():
    """Adafactor's default param groups hold ``lr=None``: the check for a zero-lr state initialisation step must not
    raise (it once did, after the wrapped optimizer had already stepped)."""
    model, opt = _wrapped()
    for group in opt.param_groups:
        group["lr"] = None
    real_step = opt.base_optimizer.step

    def step(closure=None):  # AdamW itself needs a number: stand in for an optimizer that does not
        for group in opt.param_groups:
            group["lr"] = 1e-2
        try:
            return real_step(closure)
        finally:
            for group in opt.param_groups:
                group["lr"] = None

    opt.base_optimizer.step = step
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # no perturbed() since the last step
    assert opt.step_count == 1


def test_checkpoint_helpers_inside_the_block_leave_the_noise_in_and_the_count_alone():
    """``get_optimizer_state_dict`` on a fresh optimizer steps it at lr 0 on zero gradients to create its state; inside
    the block that step once took the noise out for the rest of it and counted as a step (2 after one real step)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, opt = _wrapped()
    x, y = batch(0)
    with opt.perturbed():
        noisy = frozen_weights(model)
        get_optimizer_state_dict(model, opt)
        assert opt.is_perturbed and all(torch.equal(noisy[n], w) for n, w in frozen_weights(model).items())
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert opt.step_count == 1


def test_checkpoint_helpers_with_an_optimizer_that_holds_frozen_weights_count_only_real_steps():
    """DCP's state initialisation gives zero gradients to the parameters that require grad only. An optimizer built from
    all of a model's parameters holds the frozen weights too (no gradient): its zero-lr step once counted as a training
    step, and with a stateless SGD every checkpoint took one, so that saving every step doubled the schedule's pace."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def run(checkpoint_every_step):
        model = make_mlp(seed=0)
        opt = FlatLoRA(torch.optim.SGD(model.parameters(), lr=1e-2), model, rho=0.1, schedule="linear", total_steps=10)
        sigmas = []
        for s in range(3):
            train_step(model, opt, s)
            if checkpoint_every_step:
                get_optimizer_state_dict(model, opt)  # SGD without momentum keeps no state: initialised at every call
            sigmas.append(opt.sigma)
        return opt.step_count, sigmas, [p.detach().clone() for p in lora_parameters(model)]

    count, sigmas, params = run(True)
    reference = run(False)
    assert count == 3 and sigmas == reference[1]
    assert all(torch.equal(a, b) for a, b in zip(params, reference[2]))

    model = make_mlp(seed=0)
    before = frozen_weights(model)
    opt = FlatLoRA(torch.optim.AdamW(model.parameters(), lr=1e-2), model, rho=0.1, schedule="constant")
    x, y = batch(0)
    with opt.perturbed():
        noisy = frozen_weights(model)
        get_optimizer_state_dict(model, opt)  # inside the block: the noise stays for the rest of it
        assert opt.is_perturbed and all(torch.equal(noisy[n], w) for n, w in frozen_weights(model).items())
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert opt.step_count == 1
    assert_frozen_unchanged(model, before)


def test_a_load_pre_hook_that_edits_the_dict_in_place_leaves_the_callers_dict_alone():
    """torch copies the dict before its load pre-hooks run: one that pops a key in place changes only that copy."""
    model, opt = _wrapped()

    def drop_extra(optimizer, state_dict):  # edits in place, returns None
        state_dict.pop("extra")

    opt.register_load_state_dict_pre_hook(drop_extra)
    state = {**opt.state_dict(), "extra": 1}
    opt.load_state_dict(state)
    assert "extra" in state and "flatlora" in state


class _ScheduleFreeStandIn(torch.optim.SGD):
    """The protocol of schedule-free optimizers (``schedulefree``): ``train()`` / ``eval()`` switch the parameters'
    point, and ``step()`` refuses unless ``train()`` was called."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.training = False

    def train(self):
        self.training = True

    def eval(self):
        self.training = False

    def step(self, closure=None):
        if not self.training:
            raise RuntimeError("Optimizer was not in train mode when step is called.")
        return super().step(closure)


def test_train_and_eval_of_a_schedule_free_optimizer_are_reached_through_the_wrapper():
    """transformers' Trainer and accelerate call ``optimizer.train()`` / ``.eval()`` where the optimizer has them: the
    wrapper has them exactly when the wrapped optimizer has."""
    model = make_mlp(seed=0)
    inner = _ScheduleFreeStandIn(list(lora_parameters(model)), lr=1e-2)
    opt = FlatLoRA(inner, model, rho=0.1, schedule="constant")
    assert hasattr(opt, "train") and hasattr(opt, "eval")
    opt.train()
    assert inner.training
    train_step(model, opt, 0)
    assert opt.step_count == 1
    opt.eval()
    assert not inner.training
    with pytest.raises(RuntimeError, match="train mode"):
        train_step(model, opt, 1)
    assert not opt.is_perturbed
    _, plain = _wrapped()
    assert not hasattr(plain, "train") and not hasattr(plain, "eval")  # AdamW has neither


def test_step_with_a_closure_inside_a_block_is_the_step_outside_one():
    """Inside ``perturbed()``, ``step(closure)`` draws and releases the noise per call as outside a block (it once kept the
    first call's draw for every call, and the weights noisy after the step): the same parameters, clean weights after."""

    def run(inside):
        model = make_mlp(seed=0)
        before = frozen_weights(model)
        opt = FlatLoRA(torch.optim.LBFGS(list(lora_parameters(model)), max_iter=4), model, rho=0.1, schedule="constant")
        x, y = batch(0)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if inside:
            with opt.perturbed():
                opt.step(closure)
                assert not opt.is_perturbed and opt.step_count == 1
        else:
            opt.step(closure)
        assert_frozen_unchanged(model, before)
        return [p.detach().clone() for p in lora_parameters(model)]

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))


def test_stepping_the_wrapped_optimizer_directly_warns_once_at_the_callers_line():
    """``inner.step()`` / ``scaler.step(inner)`` leave the noise schedule where it was (at the cosine ramp's start: no
    noise at all); the wrapper says so, once. Steps through the wrapper (GradScaler included) do not warn."""
    import warnings

    model = make_mlp(seed=0)
    inner = torch.optim.AdamW(list(lora_parameters(model)), lr=1e-2)
    opt = FlatLoRA(inner, model, rho=0.1, total_steps=10)
    scaler = torch.amp.GradScaler("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, opt, 0)
        x, y = batch(1)
        with opt.perturbed():
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert opt.step_count == 2
    messages = []
    for s in range(2):
        nn.functional.cross_entropy(model(batch(s)[0]), batch(s)[1]).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inner.step()
        inner.zero_grad()
        messages.append([(str(w.message), w.filename) for w in caught if issubclass(w.category, RuntimeWarning)])
    assert len(messages[0]) == 1 and "AdamW.step() ran without FlatLoRA.step()" in messages[0][0][0]
    assert messages[0][0][1] == __file__, "the warning points into torch, not at the caller's inner.step()"
    assert messages[1] == [], "warned more than once"
    assert opt.step_count == 2


def test_a_numpy_seed_is_the_same_seed():
    import numpy as np

    def draw(seed):
        model, opt = _wrapped(seed=seed)
        with opt.perturbed():
            return opt.seed, frozen_weights(model)

    seed, numpy_draw = draw(np.int64(3))
    assert type(seed) is int and seed == 3
    assert all(torch.equal(a, b) for a, b in zip(numpy_draw.values(), draw(3)[1].values()))
    with pytest.raises(ValueError, match="seed"):
        _wrapped(seed=np.float64(3.0))


@pytest.mark.parametrize("restore, mode", [("exact", "inplace"), ("backup", "inplace"), ("host", "inplace"), ("exact", "virtual")])
def test_a_training_loop_inside_one_block_is_a_block_per_step(restore, mode):
    """``step()`` inside a block restores the weights; the block's next forward draws the next step's noise. A loop
    written inside one block once computed every step after the first at the clean weights, silently."""

    def run(one_block):
        model = make_mlp(seed=0)
        before = frozen_weights(model)
        opt = _opt(model, restore=restore, mode=mode)
        seen = []

        def step(s):
            x, y = batch(s)
            loss = nn.functional.cross_entropy(model(x), y)
            seen.append(opt.is_perturbed)
            loss.backward()
            opt.step()
            opt.zero_grad()
            assert not opt.is_perturbed  # clean after each step (inside the block too), until the next forward

        steps_in_blocks(opt, step, 4, one_block)
        assert_frozen_unchanged(model, before)
        return seen, [p.detach().clone() for p in lora_parameters(model)]

    seen, params = run(True)
    assert seen == [False, True, True, True]  # the cosine ramp draws nothing at step 0
    reference_seen, reference = run(False)
    assert seen == reference_seen and all(torch.equal(a, b) for a, b in zip(params, reference))


class _LookaheadShape(torch.optim.Optimizer):
    """The shape of timm's ``Lookahead``: an optimizer that skips ``Optimizer.__init__`` on purpose (no hook storage)."""

    def __init__(self, base_optimizer):
        self._base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self.state = base_optimizer.state

    def step(self, closure=None):
        return self._base_optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self._base_optimizer.zero_grad(set_to_none)


def test_an_optimizer_that_skips_optimizer_init_is_still_wrapped():
    """The step post-hook that warns about steps outside the wrapper needs the hook storage ``Optimizer.__init__``
    makes; without it the wrapper once failed to construct."""
    model = make_mlp(seed=0)
    before = frozen_weights(model)
    opt = FlatLoRA(_LookaheadShape(torch.optim.AdamW(list(lora_parameters(model)), lr=1e-2)), model, rho=0.1, schedule="constant")
    for s in range(2):
        train_step(model, opt, s)
    assert opt.step_count == 2
    assert_frozen_unchanged(model, before)


def test_checkpoint_helpers_given_the_wrapped_optimizer_do_not_warn():
    """DCP's zero-lr state initialisation run on the optimizer FlatLoRA wraps is no training step taken elsewhere."""
    import warnings

    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = make_mlp(seed=0)
    inner = torch.optim.AdamW(list(lora_parameters(model)), lr=1e-2)
    opt = FlatLoRA(inner, model, rho=0.1, schedule="constant")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_optimizer_state_dict(model, inner)
    assert opt.step_count == 0 and not opt._warned_steps_elsewhere


def test_in_a_loop_inside_one_block_an_evaluation_runs_clean_and_a_copy_may_be_taken():
    """After ``step()`` inside the block the weights are clean until the next forward in training mode: an evaluation
    in eval mode does not draw (in-place mode's ``model.train()`` afterwards would have refused), and the model may be
    copied (the copy carries an inert hook)."""
    import copy

    for mode in ("inplace", "virtual"):
        model = make_mlp(seed=0)
        before = frozen_weights(model)
        opt = _opt(model, mode=mode, schedule="constant", total_steps=None)
        x = batch(0)[0]
        with opt.perturbed():
            for s in range(2):
                nn.functional.cross_entropy(model(batch(s)[0]), batch(s)[1]).backward()
                opt.step()
                opt.zero_grad()
                model.eval()
                with torch.no_grad():
                    clean_out = model(x)
                assert not opt.is_perturbed
                model.train()
                twin = copy.deepcopy(model)
                torch.save(model, io.BytesIO())
                assert_frozen_unchanged(twin, before)
                with torch.no_grad():
                    assert torch.equal(twin(x), twin.eval()(x)), "the twin's hook drew noise"  # in training mode first
                assert not opt.is_perturbed, "the twin's hook drew noise into the original model"
                assert torch.equal(twin(x), clean_out)
                twin.train()
        assert_frozen_unchanged(model, before)



def test_a_loop_inside_one_block_that_calls_a_submodule_is_warned_about_once():
    """The draw after ``step()`` waits for a call of the model given to FlatLoRA; a loop that calls a submodule would
    run its steps after the first at the clean weights. It gets one warning; calling the model itself gets none."""
    import warnings

    for calls_submodule in (False, True):
        wrapper = nn.Module()
        wrapper.body = make_mlp(seed=0)
        opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(wrapper)), lr=0.1), wrapper, rho=0.1, schedule="constant")
        wrapper.forward = wrapper.body.forward  # (an nn.Module with the body's forward: the model FlatLoRA was given)
        run = wrapper.body if calls_submodule else wrapper
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                with opt.perturbed():
                    for s in range(3):
                        nn.functional.cross_entropy(run(batch(s)[0]), batch(s)[1]).backward()
                        opt.step()
                        opt.zero_grad()
        messages = [str(w.message) for w in caught if "without the next step's noise" in str(w.message)]
        assert len(messages) == (1 if calls_submodule else 0)
        assert not any(m._forward_pre_hooks for m in wrapper.modules()), "a hook stayed after the block"


def test_a_state_initialisation_by_the_checkpoint_helpers_of_older_torch_does_not_count():
    """Before torch 2.4, ``torch.distributed.checkpoint``'s ``_init_optim_state`` steps a fresh optimizer on zero
    gradients at its own learning rate, not at 0: told by that caller, it is not a training step either. The same
    step from anywhere else counts."""
    source = "def _init_optim_state(optim):\n    optim.step()\n"
    namespace: dict = {}
    exec(compile(source, "/site-packages/torch/distributed/checkpoint/state_dict.py", "exec"), namespace)
    for caller, counts in ((namespace["_init_optim_state"], 0), (lambda optim: optim.step(), 1)):
        model, opt = _wrapped()
        for p in lora_parameters(model):
            p.grad = torch.zeros_like(p)
        assert opt.param_groups[0]["lr"] > 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            caller(opt)  # (the step that counts warns that no layer computed at the noise)
            caller(opt.base_optimizer)  # given the wrapped optimizer: warns only when it is not the initialisation
        assert opt.step_count == counts
        assert any("ran without FlatLoRA.step()" in str(w.message) for w in caught) == bool(counts)
