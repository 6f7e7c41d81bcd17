"""A LoRA layer rerun inside a backward after the noise came off is refused; a step without any draw warns.

Reentrant checkpointing of a submodule the loop calls (or around the model's call) builds no graph that Flat-LoRA can
see while the block runs: the noise came off at the block's end and the backward reran the layers at the clean
weights, silently (documented as such until this release). A loop that wrote ``opt.perturbed()`` without ``with``
trained plain LoRA, silently too.
"""

from __future__ import annotations

import gc
import sys
import warnings

import pytest
import torch
from conftest import assert_frozen_unchanged, batch, frozen_weights, make_mlp
from torch import nn
from torch.nn.modules.module import _global_forward_pre_hooks
from torch.utils.checkpoint import checkpoint

from flatlora_optim import FlatLoRA, lora_parameters
from flatlora_optim.clean_reruns import _RerunCheck

MODES = ["inplace", "virtual"]
RERUN = "computed again inside backward\\(\\), for a graph built at Flat-LoRA's noisy weights"


def _watches() -> int:
    """How many rerun watches are registered as global forward pre-hooks right now."""
    return sum(isinstance(hook, _RerunCheck) for hook in _global_forward_pre_hooks.values())


class _Wrapper(nn.Module):
    """A model whose forward checkpoints its body (``inside``), or a container the loop reaches into (the body)."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.body = make_mlp(seed=3)
        self.reentrant = reentrant
        self.checkpointing = True

    def forward(self, x):
        return checkpoint(self.body, x, use_reentrant=self.reentrant) if self.checkpointing else self.body(x)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _setup(mode: str, reentrant: bool = True, device: str = "cpu"):
    net = _Wrapper(reentrant).to(device)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(net)), lr=0.1), net, rho=0.3, schedule="constant", mode=mode)
    x, y = (t.to(device) for t in batch(0))
    return net, opt, x.requires_grad_(), y  # reentrant checkpointing needs an input that requires grad


def _lora_grads(net):
    return [p.grad.clone() for p in lora_parameters(net)]


# the two ways a loop hides the graph from the wrapper: it calls a submodule, or checkpoints around the model's call
CALLS = {
    "submodule": lambda net, x: checkpoint(net.body, x, use_reentrant=True),
    "around the model": lambda net, x: checkpoint(net, x, use_reentrant=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_reentrant_rerun_after_the_block_raises_and_leaves_the_weights_clean(mode, call, device):
    """(On CUDA the autograd engine runs the backward, and so the rerun and its refusal, on a thread of its own.)"""
    net, opt, x, y = _setup(mode, device=device)
    before = frozen_weights(net)
    with opt.perturbed():
        loss = nn.functional.cross_entropy(CALLS[call](net, x), y)
    assert not opt.is_perturbed  # no graph seen: the noise came off at the block's end ...
    with pytest.raises(RuntimeError, match=RERUN + ".*use_reentrant=False"):
        loss.backward()  # ... and the rerun would have computed at the clean weights
    assert not opt.is_perturbed
    assert_frozen_unchanged(net, before)
    # the loop can go on: the same step with the backward inside the block gives the noisy gradients
    opt.zero_grad()
    with opt.perturbed():
        nn.functional.cross_entropy(CALLS[call](net, x), y).backward()
    inside = _lora_grads(net)
    opt.zero_grad()
    with opt.perturbed():
        nn.functional.cross_entropy(net.body(x), y).backward()  # no checkpointing: the reference
    for got, want in zip(inside, _lora_grads(net)):
        torch.testing.assert_close(got, want, rtol=1e-5 if device == "cuda" else 1e-6, atol=1e-7)
    opt.step()
    assert _watches() == 0
    assert_frozen_unchanged(net, before)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reentrant", [True, False])
def test_the_model_that_checkpoints_inside_its_forward_is_unaffected(mode, reentrant):
    """The supported forms: the loop calls the model given to FlatLoRA (which checkpoints inside), backward after the
    block, two micro-batches; or non-reentrant checkpointing of a submodule. Nothing raises, and the gradients are
    those of the same steps without checkpointing."""
    net, opt, x, y = _setup(mode, reentrant)
    grads = {}
    for run in ("checkpointed", "plain"):
        opt.zero_grad()
        for _ in range(2):  # gradient accumulation: the watch armed after the first backward, off at the second draw
            with opt.perturbed():
                loss = nn.functional.cross_entropy(net(x) if run == "checkpointed" else net.body(x), y)
            loss.backward()
        grads[run] = _lora_grads(net)
    for got, want in zip(grads["checkpointed"], grads["plain"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    if not reentrant:
        opt.zero_grad()
        with opt.perturbed():
            loss = nn.functional.cross_entropy(checkpoint(net.body, x, use_reentrant=False), y)
        loss.backward()
        for got, want in zip(_lora_grads(net), grads["plain"]):
            torch.testing.assert_close(got * 2, want, rtol=1e-6, atol=1e-7)  # one micro-batch against two of the same


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reentrant", [True, False])
def test_a_second_backward_through_a_checkpointed_graph_raises(mode, reentrant):
    """Virtual mode reran the layers without the noise in a second backward (reentrant: silently); in-place mode
    already refused it. Both raise now."""
    net, opt, x, y = _setup(mode, reentrant)
    before = frozen_weights(net)
    with opt.perturbed():
        loss = nn.functional.cross_entropy(net(x), y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="restored|" + RERUN):
        loss.backward()
    assert_frozen_unchanged(net, before)


@pytest.mark.parametrize("mode", MODES)
def test_the_watch_goes_in_only_where_a_rerun_may_follow_and_out_at_the_step(mode):
    """A global hook makes every module call take torch's slow path: it goes in only where a rerun of a graph built at
    the noise may still come, until the step, and a forward outside a backward meanwhile (an evaluation between the
    backward and the step) is not refused."""
    net, opt, x, y = _setup(mode)
    net.checkpointing = False
    with opt.perturbed():
        assert not opt._rerun_watch.armed
        loss = nn.functional.cross_entropy(net(x), y)  # the model given to FlatLoRA, no checkpointing
    assert not opt._rerun_watch.armed  # the graph is pending: the noise is still on (in-place) or the layers rerouted (virtual)
    loss.backward()
    assert not opt._rerun_watch.armed  # the common loop: that backward freed the graph, nothing can rerun it
    opt.step()
    with opt.perturbed():
        loss = nn.functional.cross_entropy(net(x), y)
    loss.backward(retain_graph=True)  # a graph kept: a second backward could rerun it (were it checkpointed)
    assert opt._rerun_watch.armed and any(hook is opt._rerun_watch._check for hook in _global_forward_pre_hooks.values())
    with torch.no_grad():
        evaluated = net.body(x)
    torch.testing.assert_close(evaluated, net.body(x).detach(), rtol=0, atol=0)
    opt.step()
    assert not opt._rerun_watch.armed
    net.checkpointing = True
    with opt.perturbed():
        loss = nn.functional.cross_entropy(net(x), y)  # reentrant checkpointing inside: layers computed without grad
    loss.backward()
    assert opt._rerun_watch.armed  # a checkpoint the guards could not track may still rerun, until the step
    with opt.perturbed():  # the next draw takes it out: a rerun now sees the same draw (gradient accumulation) ...
        assert not opt._rerun_watch.armed
    opt.step()  # ... and so does the step
    assert not opt._rerun_watch.armed
    with opt.perturbed():  # a loop inside one block: each step() leaves it out
        for _ in range(2):
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            assert not opt._rerun_watch.armed


@pytest.mark.parametrize("mode", MODES)
def test_a_graph_built_after_the_noise_came_off_reruns_at_the_clean_weights(mode):
    """Between the Flat-LoRA backward and the step, a loss at the clean weights through the same checkpointing (an
    auxiliary loss): its rerun is right, and it is not refused."""
    net, opt, x, y = _setup(mode)
    with opt.perturbed():
        nn.functional.cross_entropy(CALLS["submodule"](net, x), y).backward()
    assert opt._rerun_watch.armed
    opt.zero_grad()
    nn.functional.cross_entropy(CALLS["submodule"](net, x), y).backward()  # built after the noise came off
    clean = _lora_grads(net)
    opt.zero_grad()
    nn.functional.cross_entropy(net.body(x), y).backward()
    for got, want in zip(clean, _lora_grads(net)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_a_forced_restore_leaves_no_watch_and_a_stale_one_refuses_only_its_own_graphs():
    """An error or ``restore(force=True)`` declares the graph dead: no watch. And a wrapper left armed (never stepped,
    still referenced) does not refuse the reruns of another wrapper's, or plain training's, graphs on the same layers."""
    net, opt, x, y = _setup("inplace")
    with pytest.raises(KeyError):
        with opt.perturbed():
            nn.functional.cross_entropy(net(x), y).backward()
            raise KeyError("the loop fails inside the block")
    assert not opt._rerun_watch.armed
    with opt.perturbed():
        nn.functional.cross_entropy(net(x), y).backward()
    assert opt._rerun_watch.armed  # left so: this wrapper is dropped by the loop but still referenced
    nn.functional.cross_entropy(CALLS["submodule"](net, x), y).backward()  # plain training with checkpointing
    other = FlatLoRA(torch.optim.SGD(list(lora_parameters(net)), lr=0.1), net, rho=0.3, schedule="constant")
    with other.perturbed():
        nn.functional.cross_entropy(CALLS["submodule"](net, x), y).backward()
    other.step()
    assert opt._rerun_watch.armed
    opt.restore(force=True)
    assert opt._rerun_watch.armed  # (until its next draw or step)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["one block", "two blocks"])
def test_a_hidden_graph_beside_a_seen_one_is_refused(mode, layout):
    """One step builds a graph the wrapper sees (the model's call) and one it cannot (a reentrant checkpoint of a
    submodule), in one block or in two blocks of the same draw, then runs both backwards after the blocks: the first
    backward's end takes the noise out, and the hidden graph's rerun would be at the clean weights."""
    net, opt, x, y = _setup(mode)
    if layout == "one block":
        with opt.perturbed():
            seen = nn.functional.cross_entropy(net.body(x), y)
            hidden = nn.functional.cross_entropy(CALLS["submodule"](net, x), y)
    else:
        with opt.perturbed():
            seen = nn.functional.cross_entropy(net.body(x), y)
        with opt.perturbed():  # the same draw, the noise still in for the pending graph
            hidden = nn.functional.cross_entropy(CALLS["submodule"](net, x), y)
    seen.backward()
    with pytest.raises(RuntimeError, match=RERUN):
        hidden.backward()


@pytest.mark.parametrize("mode", MODES)
def test_two_draws_of_a_step_keep_both_windows(mode):
    """A block builds a hidden graph (its noise comes off at its end), a second block draws again and runs its own
    backward inside; the first graph's rerun after that is still refused (the second draw did not forget the first)."""
    net, opt, x, y = _setup(mode)
    with opt.perturbed():
        first = nn.functional.cross_entropy(CALLS["submodule"](net, x), y)
    assert not opt.is_perturbed
    with opt.perturbed():
        nn.functional.cross_entropy(net.body(x), y).backward()
    with pytest.raises(RuntimeError, match=RERUN):
        first.backward()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["one block", "two blocks"])
def test_a_second_submodule_forward_with_its_own_backward_after_the_first_is_refused(mode, layout):
    """Non-reentrant checkpointing of a submodule the loop calls, two forwards, then a backward of each after the
    block(s): only the first forward's first layer output is tracked, so the first backward's end takes the noise out
    and the second forward's checkpoint would recompute at the clean weights (silently, before this release)."""
    net, opt, x, y = _setup(mode)

    def loss():
        return nn.functional.cross_entropy(checkpoint(net.body, x, use_reentrant=False), y)

    if layout == "one block":
        with opt.perturbed():
            first, second = loss(), loss()
    else:
        with opt.perturbed():
            first = loss()
        with opt.perturbed():
            second = loss()
    first.backward()
    with pytest.raises(RuntimeError, match=RERUN):
        second.backward()


def test_a_submodule_compiled_before_training_is_watched_and_does_not_warn():
    """A submodule compiled and run once before the first block (an evaluation): its compiled code calls none of the
    layers' hooks, so nothing said a layer computed at the noise. Its reentrant rerun after the block is refused, and
    a correct step (backward inside the block) does not warn of a step without noise."""
    net, opt, x, y = _setup("inplace")
    compiled = torch.compile(net.body, backend="eager")
    with torch.no_grad():
        compiled(x)  # compiled before Flat-LoRA's hooks exist
    with opt.perturbed():
        loss = nn.functional.cross_entropy(checkpoint(compiled, x, use_reentrant=True), y)
    with pytest.raises(RuntimeError, match=RERUN):
        loss.backward()
    opt.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with opt.perturbed():
            nn.functional.cross_entropy(checkpoint(compiled, x, use_reentrant=True), y).backward()
        opt.step()
    assert _no_block_warnings(caught) == []
    torch._dynamo.reset()


def test_a_compiled_submodule_rerun_is_refused():
    """``torch.compile(submodule)``: the compiled code calls no layer's hooks, so its wrapper is checked instead (in-place
    mode; virtual mode refuses to run under torch.compile)."""
    net, opt, x, y = _setup("inplace")
    compiled = torch.compile(net.body, backend="eager")
    with opt.perturbed():
        loss = nn.functional.cross_entropy(checkpoint(compiled, x, use_reentrant=True), y)
    with pytest.raises(RuntimeError, match=RERUN):
        loss.backward()


def test_a_collected_wrapper_takes_its_watch_off():
    gc.collect()  # (wrappers of earlier tests left armed)
    net, opt, x, y = _setup("inplace")
    with opt.perturbed():
        nn.functional.cross_entropy(net(x), y).backward()
    assert _watches() == 1
    del opt  # never stepped: armed until collected
    gc.collect()
    assert _watches() == 0


def _forget_compiled_graphs() -> None:
    """The no-noise warning stays silent once torch.compile built a graph in the process (compiled code may run the
    layers without their hooks): earlier tests of this process compiled some."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is not None:
        utils.counters.clear()


def _no_block_warnings(caught) -> list:
    return [w for w in caught if "came without Flat-LoRA noise" in str(w.message)]


@pytest.mark.parametrize("mistake", ["without with", "forward after the block"])
@pytest.mark.parametrize("scheduled", [False, True])
def test_a_step_without_a_forward_at_the_noise_warns_once_at_the_callers_line(mistake, scheduled):
    """``opt.perturbed()`` never entered, or a block around something else than the forward: the steps train plain
    LoRA. The warning points at the loop's line, also through an LR scheduler's wrapper of ``step()``."""
    _forget_compiled_graphs()
    net, opt, x, y = _setup("inplace")
    if scheduled:
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # wraps opt.step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            if mistake == "without with":
                opt.perturbed()  # a context manager that is never entered
            else:
                with opt.perturbed():
                    inputs = x  # the block holds the data loading, the forward comes after it
            nn.functional.cross_entropy(net.body(x if mistake == "without with" else inputs), y).backward()
            opt.step()
            opt.zero_grad()
    found = _no_block_warnings(caught)
    assert len(found) == 1 and found[0].category is RuntimeWarning
    assert found[0].filename == __file__  # the loop's opt.step() line
    assert "without `with` does nothing" in str(found[0].message)


@pytest.mark.parametrize("form", ["block per step", "one block", "perturb and restore", "closure", "accumulation"])
def test_the_usual_loops_do_not_warn_about_a_missing_block(form):
    net, opt, x, y = _setup("inplace")

    def loss():
        return nn.functional.cross_entropy(net(x), y)  # the model given to FlatLoRA: inside one block it draws each step

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if form == "one block":
            with opt.perturbed():
                for _ in range(3):
                    loss().backward()
                    opt.step()
        for _ in range(3):
            if form == "block per step":
                with opt.perturbed():
                    loss().backward()
                opt.step()
            elif form == "perturb and restore":
                opt.perturb()
                loss().backward()
                opt.restore()
                opt.step()
            elif form == "closure":
                def closure():
                    opt.zero_grad()
                    value = loss()
                    value.backward()
                    return value
                opt.step(closure)
            elif form == "accumulation":
                for _ in range(2):
                    with opt.perturbed():
                        loss().backward()
                opt.step()
            opt.zero_grad()
    assert _no_block_warnings(caught) == []
    assert opt.step_count in (3, 6)


def test_a_model_compiled_while_the_watch_is_in_gets_its_graph():
    """Another model compiled between the backward and the step (the watch in: its hook runs for every module): the
    hook stays out of the trace, so the model compiles to one graph (with the hook a compiler-disabled function,
    torch.compile captured no graph, then or after the step)."""
    from torch._dynamo.utils import counters

    net, opt, x, y = _setup("inplace")
    with opt.perturbed():
        loss = nn.functional.cross_entropy(net.body(x), y)
    loss.backward(retain_graph=True)
    assert opt._rerun_watch.armed
    other = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)]).eval()
    z = torch.randn(2, 8)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(other, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(z), other(z), rtol=1e-6, atol=1e-6)
        assert counters["stats"]["unique_graphs"] == 1 and sum(counters["graph_break"].values()) == 0
        opt.step()
        compiled(z)
    assert counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()


def test_a_loop_without_steps_keeps_a_bounded_list_of_windows():
    """Blocks with a reentrant checkpoint and the backward inside, and no step (or many micro-batches in one step):
    each arms at its end, and the windows of the draws since the last step must not pile up."""
    from flatlora_optim.clean_reruns import _MAX_WINDOWS

    net, opt, x, y = _setup("inplace")
    for _ in range(_MAX_WINDOWS + 10):
        with opt.perturbed():
            nn.functional.cross_entropy(net(x), y).backward()
    assert opt._rerun_watch.armed and len(opt._rerun_watch._check.windows) == _MAX_WINDOWS
    opt.step()
    assert not opt._rerun_watch.armed and opt._rerun_watch._check.windows == []


def test_perturb_and_restore_alone_do_not_arm_without_compiled_code():
    """No layer computed between perturb() and restore() (a benchmark of them alone): that counts as a possible rerun
    only where torch.compile built code that may run the layers without their hooks."""
    _forget_compiled_graphs()
    net, opt, x, y = _setup("inplace")
    opt.perturb()
    opt.restore()
    assert not opt._rerun_watch.armed


@pytest.mark.parametrize("mode", MODES)
def test_common_loops_without_reentrant_checkpointing_never_put_the_watch_in(mode):
    """One forward per block and the backward after it: non-reentrant checkpointing inside the model (its recompute in
    the backward is no new forward), and a loop that calls a submodule without checkpointing (its later layers are the
    same forward), leave the global hook out, step after step."""
    net, opt, x, y = _setup(mode, reentrant=False)
    for call in (net, net.body):
        for _ in range(2):
            with opt.perturbed():
                loss = nn.functional.cross_entropy(call(x), y)
            loss.backward()
            assert not opt._rerun_watch.armed and not any(h is opt._rerun_watch._check for h in _global_forward_pre_hooks.values())
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("mode", MODES)
def test_a_model_call_that_raised_inside_the_block_does_not_blind_the_watch(mode):
    """A loop that catches an error of the model's forward inside the block (skipping a bad batch) and goes on: the
    count of the model's calls under way still comes back to 0 (its forward hook runs when the forward raises), so a
    second, untracked forward of a checkpointed submodule is still seen and its clean rerun refused."""
    net, opt, x, y = _setup(mode)
    net.checkpointing = False

    def loss():
        return nn.functional.cross_entropy(checkpoint(net.body, x, use_reentrant=False), y)

    with opt.perturbed():
        with pytest.raises(RuntimeError, match="shapes"):
            net(torch.zeros(2, 3))  # a bad batch: the first layer raises
        first, second = loss(), loss()
    first.backward()
    with pytest.raises(RuntimeError, match=RERUN):
        second.backward()
