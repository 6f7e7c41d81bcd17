"""No way to keep noise by accident: exceptions, eval(), state_dict(), checkpoints, dropped graphs."""

from __future__ import annotations

import gc
import io
import signal
import sys

import pytest
import torch
from conftest import assert_block_refused_untouched, assert_frozen_unchanged, batch, bits, frozen_weights, make_mlp, steps_in_blocks
from torch import nn

from flatlora_optim import FlatLoRA, LoRALinear, lora_parameters


@pytest.fixture
def setup():
    model = make_mlp(seed=2)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.2, schedule="constant")
    return model, opt, frozen_weights(model)


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_exception_inside_block_restores(setup, exc):
    model, opt, before = setup
    with pytest.raises(exc):
        with opt.perturbed():
            nn.functional.cross_entropy(model(batch(0)[0]), batch(0)[1])
            raise exc("boom")
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)


def test_nested_blocks_restore_at_the_outermost_exit(setup):
    model, opt, before = setup
    with opt.perturbed():
        with opt.perturbed():
            inner = bits(model[0].weight)
        assert opt.is_perturbed and torch.equal(bits(model[0].weight), inner)
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)


def test_eval_inside_block_restores_and_raises(setup):
    model, opt, before = setup
    with pytest.raises(RuntimeError, match="eval"):
        with opt.perturbed():
            model(batch(0)[0])
            model.eval()
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)
    assert all(m.training for m in model.modules()), "the refused eval() switched some modules"
    assert "train" not in model.__dict__, "the guard on the model's own train() stayed"


def test_eval_between_forward_and_backward_restores_and_raises(setup):
    model, opt, before = setup
    with opt.perturbed():
        loss = nn.functional.cross_entropy(model(batch(0)[0]), batch(0)[1])
    assert opt.is_perturbed
    with pytest.raises(RuntimeError, match="Flat-LoRA noise"):
        model.eval()
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)
    del loss


def test_train_without_mode_change_is_allowed(setup):
    model, opt, before = setup
    with opt.perturbed():
        model.train()  # already training: frameworks call this every step
        nn.functional.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    assert_frozen_unchanged(model, before)
    model.eval()  # hooks are gone once restored
    assert not model.training


@pytest.mark.parametrize("restore", ["exact", "backup", "host"])
@pytest.mark.parametrize("where", ["inside", "between forward and backward", "a layer alone"])
@pytest.mark.parametrize("convert", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()],
                         ids=["half", "to bfloat16", "double"])
def test_a_conversion_while_perturbed_restores_and_raises_before_converting(restore, where, convert):
    """``model.half()`` / ``.to(dtype)`` while the noise is in once carried it into the converted weights (exact
    restore then refused to restore them, and every later step too). Now the weights are restored and nothing is
    converted; a conversion that changes nothing passes."""
    model = make_mlp(seed=2)
    before = frozen_weights(model)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.2, schedule="constant", restore=restore)
    target = model if where != "a layer alone" else model[0]
    with pytest.raises(RuntimeError, match=r"converted to another dtype, device or memory format.*nothing was\s+converted"):
        with opt.perturbed():
            loss = nn.functional.cross_entropy(model(batch(0)[0]), batch(0)[1])
            model.to(torch.float32).to("cpu").float()  # changes nothing: allowed
            assert opt.is_perturbed
            if where != "between forward and backward":
                convert(target)
        convert(target)
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the refused conversion converted something"
    assert "_apply" not in model.__dict__ and "_apply" not in model[0].__dict__, "a guard stayed"
    del loss
    model.half()  # after the restore: converted as usual
    assert all(p.dtype == torch.float16 for p in model.parameters())


def test_virtual_mode_converts_while_perturbed():
    """Virtual mode never writes the weights: a conversion inside the block converts the clean weights."""
    model = make_mlp(seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.2, schedule="constant", mode="virtual")
    with opt.perturbed():
        model(batch(0)[0])
        model.double()
    assert all(torch.equal(w.double(), model.get_parameter(n)) for n, w in before.items())


def test_state_dict_while_perturbed_is_clean(setup):
    model, opt, before = setup
    with opt.perturbed():
        noisy = bits(model[0].weight)
        sd = model.state_dict()
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        assert torch.equal(bits(model[0].weight), noisy)  # the live weight stays perturbed
    assert not torch.equal(noisy, before["0.weight"])
    for key, value in before.items():
        assert torch.equal(bits(sd[key]), value), key
    saved = torch.load(io.BytesIO(buffer.getvalue()))
    for key, value in before.items():
        assert torch.equal(bits(saved[key]), value), key


def test_submodule_state_dict_while_perturbed_is_clean(setup):
    model, opt, before = setup
    with opt.perturbed():
        sd = model[2].state_dict()
    assert torch.equal(bits(sd["weight"]), before["2.weight"])


def test_dropped_graph_without_backward_restores(setup):
    model, opt, before = setup
    with opt.perturbed():
        loss = nn.functional.cross_entropy(model(batch(0)[0]), batch(0)[1])
    assert opt.is_perturbed  # waiting for a backward that never comes...
    del loss
    gc.collect()
    assert not opt.is_perturbed  # ...until the graph is dropped
    assert_frozen_unchanged(model, before)


def _loss(model, seed):
    x, y = batch(seed)
    return nn.functional.cross_entropy(model(x), y)


def test_gradient_hooks_per_forward_not_per_layer_and_the_restore_still_follows_each_backward(setup, monkeypatch):
    """The guards learn that a backward ended from gradient hooks on a few tracked outputs per forward (the model's
    outputs, and the first perturbed layer output since the guards went in or since the last backward ended), not
    on every layer's output; each backward below still restores right after it ends."""
    from flatlora_optim import guards

    model, opt, before = setup
    fired = []
    original = guards.PerturbationGuards._grad_fired
    monkeypatch.setattr(guards.PerturbationGuards, "_grad_fired", lambda self, key: (fired.append(key), original(self, key))[1])
    with opt.perturbed():  # two micro-batches, one backward of their sum after the block
        loss = _loss(model, 0) + _loss(model, 1)
    assert opt.is_perturbed
    loss.backward()
    # the MLP has 3 perturbed layers: one hook per layer output would fire 6 times; here the first forward's first
    # layer output and each forward's model output
    assert not opt.is_perturbed and len(fired) == 3
    assert_frozen_unchanged(model, before)
    opt.step()
    opt.zero_grad()
    fired.clear()
    with opt.perturbed():  # a backward inside the block, then another forward whose backward comes after it
        _loss(model, 2).backward()
        assert opt.is_perturbed
        loss = _loss(model, 3)
    assert opt.is_perturbed  # waits for the second graph's backward...
    loss.backward()
    assert not opt.is_perturbed and len(fired) == 4  # ...and restores once it ends: its first layer output was tracked again
    assert_frozen_unchanged(model, before)


def test_two_graphs_two_backwards_and_a_dropped_graph(setup):
    """The noise stays until every graph built at it has had its backward or been released: two forwards in the
    block and a backward of each after it (the first no longer restores before the second has run), and a
    throwaway forward released without backward before the real one."""
    model, opt, before = setup
    with opt.perturbed():
        first, second = _loss(model, 0), _loss(model, 1)
    first.backward()
    assert opt.is_perturbed  # `second` still waits
    second.backward()  # at the noisy weights: before, autograd raised its in-place error here
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)
    opt.step()
    opt.zero_grad()
    with opt.perturbed():
        throwaway = _loss(model, 2)
        del throwaway  # released without a backward
        gc.collect()
        loss = _loss(model, 3)
    loss.backward()
    assert not opt.is_perturbed  # before, the real loss's backward went unreported and the noise stayed until step()
    assert_frozen_unchanged(model, before)


def test_step_restores_a_pending_perturbation(setup):
    model, opt, before = setup
    with opt.perturbed():
        loss = nn.functional.cross_entropy(model(batch(0)[0]), batch(0)[1])
    opt.step()
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)
    del loss


def test_forward_under_no_grad_restores_at_exit(setup):
    model, opt, before = setup
    with opt.perturbed(), torch.no_grad():
        model(batch(0)[0])
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)


def test_hooks_are_removed_after_restore(setup):
    model, opt, _ = setup
    with opt.perturbed():
        nn.functional.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
        assert any(m._forward_hooks for m in model.modules())
        assert "train" in model[0].__dict__
    for m in model.modules():
        assert not m._forward_hooks and "train" not in m.__dict__
        assert not getattr(m, "_state_dict_hooks", {})


def test_merged_since_construction_raises_before_touching_weights(setup):
    model, opt, _ = setup
    model[2].merge()
    assert_block_refused_untouched(model, opt, ValueError, "merged")


def test_backward_twice_with_retain_graph_raises_clearly(setup):
    model, opt, before = setup
    x, y = batch(0)
    x.requires_grad_(True)
    with opt.perturbed():
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)  # weights restored at the end of this backward
    assert_frozen_unchanged(model, before)
    # a second backward would take the gradient at other weights than its forward's (without checkpointing autograd
    # would raise its in-place error; under gradient checkpointing it would run silently at the clean weights)
    with pytest.raises(RuntimeError, match="after they were restored"):
        loss.backward()
    assert_frozen_unchanged(model, before)


def test_lora_linear_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(3, 3), r=0, alpha=1)
    with pytest.raises(TypeError):
        LoRALinear(nn.Conv1d(3, 3, 1), r=1, alpha=1)


def _interrupt_first_call(monkeypatch, owner, name, calls):
    """Make ``owner.name`` receive a Ctrl-C (SIGINT) on its first call, before it does its work."""
    original = getattr(owner, name)

    def interrupted(*args, **kwargs):
        if not calls:
            signal.raise_signal(signal.SIGINT)
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)


@pytest.mark.parametrize("restore", ["exact", "backup", "subtract"])
def test_ctrl_c_during_restore_is_delivered_once_every_layer_is_restored(monkeypatch, restore):
    """A restore writes in several steps; a KeyboardInterrupt between two of them would leave a layer half
    restored (and perturbed for good: undoing the noise again from there is wrong). The interrupt is held
    back until the last layer is restored, then raised."""
    from flatlora_optim import batched

    model = make_mlp(seed=2)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.2, schedule="constant", restore=restore)
    before = frozen_weights(model)
    values = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    calls: list = []
    _interrupt_first_call(monkeypatch, batched.BlockBatch, "restore", calls)  # exact and backup batch small layers
    _interrupt_first_call(monkeypatch, opt._perturber.strategy, "restore", calls)  # block by block (subtract)
    with pytest.raises(KeyboardInterrupt):
        with opt.perturbed():
            nn.functional.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    assert calls, "the restore path was not reached"
    assert not opt.is_perturbed
    if restore == "subtract":  # subtract restores to within rounding, not bitwise; it must still have run everywhere
        for name, p in model.named_parameters():
            if name in values:  # the noise is about 0.2 * row norm / sqrt(n): far above 1e-5
                torch.testing.assert_close(p.detach(), values[name], rtol=0, atol=1e-5)
    else:
        assert_frozen_unchanged(model, before)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler in place is back


def _sigint_at_line(k):
    """A ``sys.settrace`` tracer that sends SIGINT at the ``k``-th line the package runs (``k = 0``: never), and the count
    of those lines."""
    count = [0]

    def line(frame, event, arg):
        if event == "line":
            count[0] += 1
            if count[0] == k:
                signal.raise_signal(signal.SIGINT)
        return line

    return (lambda frame, event, arg: line if "flatlora_optim" in frame.f_code.co_filename else None), count


def _step_with_ctrl_c_at_line(mode, restore, k):
    """One training step (block, backward, step) with a Ctrl-C at the package's ``k``-th line; checks that noise left in
    the weights is noise the wrapper knows it holds, and that restoring it brings every bit back. Returns the lines run."""
    model = make_mlp(seed=0, width=8)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant", mode=mode, restore=restore)
    before = frozen_weights(model)
    x, y = batch(0)
    tracer, count = _sigint_at_line(k)
    sys.settrace(tracer)
    try:
        with opt.perturbed():
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    loss = None  # (a graph something still holds keeps the noise in; the wrapper then says it holds it)
    dirty = [name for name, w in frozen_weights(model).items() if not torch.equal(w, before[name])]
    assert not dirty or opt.is_perturbed, f"Ctrl-C at line {k}: noise left in {dirty} while the wrapper holds none"
    opt.restore(force=True)
    assert_frozen_unchanged(model, before)
    return count[0]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # a Ctrl-C inside a weakref callback
@pytest.mark.parametrize("mode, restore", [("inplace", "exact"), ("inplace", "backup"), ("inplace", "host"), ("virtual", "exact")])
def test_a_ctrl_c_at_any_line_of_a_step_leaves_no_noise_the_wrapper_does_not_know_of(mode, restore):
    """Exhaustive: a Ctrl-C at every line the package runs in one step. Between a layer's write and its record, or the
    record's hand-over and the restore, it used to leave noise in the weights with ``is_perturbed`` false, for good.
    Now the noise is in and recorded, or out, wherever the interrupt lands (deterministic: SIGINT at a counted line)."""
    lines = _step_with_ctrl_c_at_line(mode, restore, 0)
    assert lines > 500  # the step ran through the package
    for k in range(1, lines + 1):
        _step_with_ctrl_c_at_line(mode, restore, k)


def test_deferred_interrupt_goes_to_the_handler_in_place():
    from flatlora_optim.interrupts import interrupts_deferred

    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            assert received == []  # held back inside
        assert received == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)  # ignored before, ignored after
    finally:
        signal.signal(signal.SIGINT, previous)


def test_deferring_interrupts_outside_the_main_thread_changes_nothing():
    import threading

    from flatlora_optim.interrupts import interrupts_deferred

    seen = []

    def worker():
        with interrupts_deferred():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]


def test_a_sigint_handler_installed_outside_python_is_left_alone(monkeypatch):
    """``signal.getsignal`` gives None for a handler an embedding host installed; ``signal.signal`` cannot put
    such a handler back, so deferring would leave the deferring handler in place for good."""
    from flatlora_optim.interrupts import interrupts_deferred

    installs = []
    monkeypatch.setattr(signal, "getsignal", lambda signum: None)
    monkeypatch.setattr(signal, "signal", lambda *args: installs.append(args))
    with interrupts_deferred():
        pass
    assert installs == []


def test_nested_deferral_delivers_once_at_the_outermost_exit():
    """``restore_all`` defers, and so does each ``restore`` inside it: one Ctrl-C, delivered once, at the end."""
    from flatlora_optim.interrupts import interrupts_deferred

    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        with interrupts_deferred():
            with interrupts_deferred():
                signal.raise_signal(signal.SIGINT)
            assert received == []  # still held back by the outer block
            with interrupts_deferred():
                pass
        assert received == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is not None and received == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_hook_that_restores_during_forward_leaves_the_later_guard_hook_harmless():
    """torch runs a snapshot of a module's forward hooks: when a user's hook (registered first) restores the
    weights, the guards are removed, and the guard's own hook still runs once; it must do nothing."""
    model = make_mlp(seed=2)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.2, schedule="constant")
    before = frozen_weights(model)
    target = opt.targets[0].module
    target.register_forward_hook(lambda module, args, output: opt.restore(force=True))  # runs before the guard's hook
    opt.perturb()
    model(batch(0)[0].requires_grad_(True))  # the layer's output needs a graph: the guard's hook would act on it
    assert not opt.is_perturbed
    assert opt._guards is None  # no backward awaited at weights already restored
    assert_frozen_unchanged(model, before)


@pytest.mark.parametrize("restore", ["exact", "backup", "subtract"])
def test_guards_that_fail_to_install_leave_the_weights_clean_and_no_hook(monkeypatch, restore):
    """The while-perturbed guards are installed while the noise pass runs (on the GPU: before the
    host waits for it); if installing them fails, the noise comes out again and nothing is left behind."""
    from flatlora_optim import guards

    model = make_mlp(seed=2)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.2, schedule="constant", restore=restore)
    before = frozen_weights(model)
    values = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    original = guards.PerturbationGuards._patch_train
    patched = []

    def fail_on_the_second_layer(self, module, on_mode_change):
        if patched:
            raise RuntimeError("hook registration failed")
        patched.append(module)
        original(self, module, on_mode_change)

    monkeypatch.setattr(guards.PerturbationGuards, "_patch_train", fail_on_the_second_layer)
    with pytest.raises(RuntimeError, match="hook registration failed"):
        opt.perturb()
    assert patched, "the guards were not installed"
    assert not opt.is_perturbed
    for name, p in model.named_parameters():
        if name in values:
            if restore == "subtract":  # to within rounding, not bitwise
                torch.testing.assert_close(p.detach(), values[name], rtol=0, atol=1e-5)
    if restore != "subtract":
        assert_frozen_unchanged(model, before)
    for m in model.modules():  # the first layer's guards (installed before the failure) are gone too
        assert not m._forward_hooks and "train" not in m.__dict__
    monkeypatch.undo()
    with opt.perturbed():  # the same step, tried again, draws its noise
        assert opt.is_perturbed and not all(torch.equal(p.detach(), values[n]) for n, p in model.named_parameters() if n in values)
        nn.functional.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    opt.step()
    if restore != "subtract":
        assert_frozen_unchanged(model, before)


def test_virtual_patches_that_fail_leave_the_model_as_built_and_the_step_retryable(monkeypatch):
    from flatlora_optim import virtual

    model = make_mlp(seed=2)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.2, schedule="constant", mode="virtual")
    original, calls = virtual._NoisyForward, []

    def fail_on_the_second_layer(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("patch failed")
        return original(*args)

    monkeypatch.setattr(virtual, "_NoisyForward", fail_on_the_second_layer)
    with pytest.raises(RuntimeError, match="patch failed"):
        opt.perturb()  # the manual form (a failing perturbed() block restores on its own way out)
    assert not opt.is_perturbed and not any("forward" in m.__dict__ or "base_forward" in m.__dict__ for m in model.modules())
    monkeypatch.undo()
    x, y = batch(0)
    clean = nn.functional.cross_entropy(model(x), y)
    with opt.perturbed():  # the same step, tried again, draws its noise
        assert opt.is_perturbed
        noisy = nn.functional.cross_entropy(model(x), y)
    assert not torch.equal(noisy, clean)


def test_ctrl_c_while_the_guards_go_in_leaves_no_hook_behind(monkeypatch):
    """A Ctrl-C right after a hook is registered, before the guards have noted its handle, is held back
    until the install is done; then every hook comes out and the noise too."""
    model = make_mlp(seed=2)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.2, schedule="constant")
    before = frozen_weights(model)
    original = nn.Module.register_forward_hook
    calls = []

    def interrupted_after_registering(self, *args, **kwargs):
        handle = original(self, *args, **kwargs)
        if not calls:
            calls.append(1)
            signal.raise_signal(signal.SIGINT)
        return handle

    monkeypatch.setattr(nn.Module, "register_forward_hook", interrupted_after_registering)
    with pytest.raises(KeyboardInterrupt):
        opt.perturb()
    assert calls and not opt.is_perturbed
    assert_frozen_unchanged(model, before)
    for m in model.modules():
        assert not m._forward_hooks and "train" not in m.__dict__


def test_ctrl_c_while_held_views_are_let_go_releases_every_target():
    from flatlora_optim.targets import LoRATarget, held_views

    class Interrupting(LoRATarget):
        def __setattr__(self, name, value):
            if name == "_held" and value is None and not getattr(self, "interrupted", False):
                object.__setattr__(self, "interrupted", True)
                signal.raise_signal(signal.SIGINT)
            object.__setattr__(self, name, value)

    layers = [LoRALinear(nn.Linear(4, 3), r=2, alpha=2) for _ in range(3)]
    targets = [Interrupting(f"l{k}", m, "lora", m, "weight") for k, m in enumerate(layers)]
    with pytest.raises(KeyboardInterrupt):
        with held_views(targets):
            assert all(t._held is not None for t in targets)
    assert all(t._held is None for t in targets)


def test_guards_are_in_place_once_perturb_returns(setup):
    model, opt, before = setup
    opt.perturb()
    assert opt.is_perturbed and all(m._forward_hooks for m in model if isinstance(m, LoRALinear))
    with pytest.raises(RuntimeError, match="eval|train"):
        model.eval()  # a mode change while perturbed restores and raises
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)


class _FakeCudaTarget:
    """Only what on_device_of reads: a weight on cuda:1 (no GPU needed)."""

    class weight:  # noqa: N801 - stands for a tensor attribute
        device = torch.device("cuda", 1)


def test_on_device_of_makes_a_non_current_gpu_current_and_leaves_the_rest(monkeypatch):
    # Triton launches on the current CUDA device: a model on cuda:1 needs cuda:1 made current while launching
    import contextlib

    from flatlora_optim.targets import on_device_of

    made_current = []

    @contextlib.contextmanager
    def fake_device(device):
        made_current.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with on_device_of([_FakeCudaTarget()]):
        pass
    assert made_current == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    with on_device_of([_FakeCudaTarget()]):  # already current
        pass
    model = make_mlp()
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.1, schedule="constant")
    with on_device_of(opt.targets), on_device_of([]):  # CPU targets, no targets: nothing to make current
        pass
    assert made_current == [torch.device("cuda", 1)]


def _recorded_device_guards(monkeypatch, module, describe):
    """``describe(targets)`` for every ``module.on_device_of(targets)`` entered from now on, in order."""
    real, calls = module.on_device_of, []

    def recording(targets):
        calls.append(describe(targets))
        return real(targets)

    monkeypatch.setattr(module, "on_device_of", recording)
    return calls


@pytest.mark.parametrize("mode", ["inplace", "virtual"])
def test_every_entry_point_that_launches_kernels_makes_the_targets_device_current(monkeypatch, mode):
    import flatlora_optim.optimizer as optimizer_module

    calls = _recorded_device_guards(monkeypatch, optimizer_module, len)
    model = make_mlp()
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.1, schedule="constant", mode=mode)
    x, _ = batch()
    opt.perturb()
    assert calls == [3]  # perturb: every target
    opt.regenerate_noise(opt.targets[0].name)
    assert calls == [3, 1]
    model.state_dict()  # in-place: a clean copy of each perturbed weight, restored from its record
    expected_copies = [1, 1, 1] if mode == "inplace" else []
    assert calls == [3, 1] + expected_copies
    model(x).sum().backward()
    opt.restore()
    assert calls == [3, 1] + expected_copies + ([3] if mode == "inplace" else [])  # virtual: nothing to restore


def test_the_flatness_meter_makes_each_targets_device_current(monkeypatch):
    import flatlora_optim.flatness as flatness_module

    calls = _recorded_device_guards(monkeypatch, flatness_module, lambda targets: [t.name for t in targets])
    model = make_mlp()
    x, y = batch()
    flatness_module.measure_flatness(model, lambda m: nn.functional.cross_entropy(m(x), y), [0.1], draws=1, seed=0)
    names = [t.name for t in flatness_module.discover_targets(model)]
    assert calls == [[n] for n in names] + [[n] for n in reversed(names)]  # each perturb, then each restore


def test_the_models_outputs_that_carry_a_graph_are_found_in_any_usual_container():
    """The guards track every output of the wrapped model that requires grad: a tensor, or tensors inside tuples,
    lists, dicts (transformers' ModelOutput is one) and dataclasses; tensors without grad and other objects are
    skipped."""
    import dataclasses

    from flatlora_optim.guards import _tensors_with_grad

    @dataclasses.dataclass
    class Output:
        logits: torch.Tensor
        aux: object = None

    grad = [torch.ones(2, requires_grad=True) * k for k in range(1, 5)]
    plain = torch.ones(2)
    found = _tensors_with_grad((plain, {"a": grad[0], "b": [plain, grad[1]]}, Output(grad[2], aux=(grad[3], "text")), object()))
    assert [id(t) for t in found] == [id(t) for t in grad]
    assert _tensors_with_grad(plain) == [] and _tensors_with_grad(Output) == []  # a dataclass type, not an instance
    assert _tensors_with_grad(((((grad[0],),),),)) == []  # deeper than three levels: not searched


class _WithLeafOutput(nn.Module):
    """Returns a trainable leaf beside its logits (a learned temperature, say): not a graph that a forward built."""

    def __init__(self):
        super().__init__()
        self.net = make_mlp(seed=2)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.net(x), self.log_scale


@pytest.mark.parametrize("mode", ["inplace", "virtual"])
def test_a_leaf_among_the_outputs_gets_no_hook_and_steps_run_on(mode):
    model = _WithLeafOutput()
    params = list(lora_parameters(model)) + [model.log_scale]
    opt = FlatLoRA(torch.optim.SGD(params, lr=0.1), model, rho=0.2, schedule="constant", mode=mode)
    before = frozen_weights(model)
    for step in range(3):
        x, y = batch(step)
        with opt.perturbed():
            logits, log_scale = model(x)
        (nn.functional.cross_entropy(logits * log_scale.exp(), y)).backward()
        assert not opt.is_perturbed
        opt.step()
        opt.zero_grad()
    assert not model.log_scale._backward_hooks  # a hook on the parameter would have stayed from step to step
    assert_frozen_unchanged(model, before)


@pytest.mark.parametrize("mode", ["inplace", "virtual"])
def test_a_backward_that_fails_midway_then_a_retry(mode):
    """A backward that raises partway (an out-of-memory error, a hook raising) never runs its end-of-backward
    callback; dropping its graph, or the retried step's backward, still takes the noise out."""
    model = make_mlp(seed=2)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.2, schedule="constant", mode=mode)
    before = frozen_weights(model)
    x, y = batch(0)
    failing = [True]

    def fail_once(grad):
        if failing[0]:
            failing[0] = False
            raise MemoryError("simulated out-of-memory in backward")

    handle = model[1].register_forward_hook(lambda module, args, output: output.register_hook(fail_once) and None)
    with opt.perturbed():
        loss = nn.functional.cross_entropy(model(x), y)
    handle.remove()
    with pytest.raises(MemoryError):
        loss.backward()
    del loss
    gc.collect()
    assert not opt.is_perturbed  # the failed graph was released: nothing waits
    opt.zero_grad()
    with opt.perturbed():
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert not opt.is_perturbed  # the retry's backward end was seen
    assert_frozen_unchanged(model, before)


def test_virtual_mode_evaluates_without_noise_while_a_kept_graph_waits():
    """Virtual mode, after the block, while a graph built at the noise is kept without a backward: a forward without
    grad (an evaluation) is the model's own; in-place mode refuses model.eval() in that window instead."""
    model = make_mlp(seed=2)
    x, y = batch(0)
    expected = model(x).detach()
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.2, schedule="constant", mode="virtual")
    with opt.perturbed():
        kept = model(x)  # kept, never backpropagated
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert opt.is_perturbed  # `kept` still waits
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    del kept
    gc.collect()
    assert not opt.is_perturbed


# -- the library's own work runs without the caller's autocast --------------------------------------------------


@pytest.mark.parametrize("where", ["backward after the block", "step", "restore"])
def test_restore_under_the_callers_autocast_leaves_float16_weights_clean(where):
    """float16 weights, the restore reached inside a CPU bfloat16 autocast region: autocast refuses torch.cat of
    float16 tensors there, which once made the restore raise and left the weights noisy for good."""
    model = make_mlp(seed=2, dtype=torch.float16)
    before = frozen_weights(model)
    x, y = batch(0, dtype=torch.float16)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant")
    if where == "backward after the block":
        with opt.perturbed():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss.backward()
    else:
        opt.perturb()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            opt.step() if where == "step" else opt.restore()
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)


def test_perturb_entered_under_the_callers_autocast_works_for_float16_weights():
    model = make_mlp(seed=2, dtype=torch.float16)
    before = frozen_weights(model)
    x, y = batch(0, dtype=torch.float16)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with opt.perturbed():
            noisy = frozen_weights(model)
            nn.functional.cross_entropy(model(x).float(), y).backward()
    assert any(not torch.equal(noisy[n], before[n]) for n in before), "no noise went in"
    assert_frozen_unchanged(model, before)


def test_a_restore_that_raises_is_reported_and_stops_further_steps(monkeypatch):
    """A restore that raised may have left noise in the layers it names: ``is_perturbed`` stays True and the next
    perturbation refuses with a message naming them (a retry could undo twice what the first attempt undid)."""
    from flatlora_optim.batched import BlockBatch

    model = make_mlp(seed=0)
    x, y = batch(0)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant")

    def restore(self):
        raise RuntimeError("restore failed on purpose")

    monkeypatch.setattr(BlockBatch, "restore", restore)  # the CPU path restores the step's layers as one batch
    with pytest.raises(RuntimeError, match="on purpose"):
        with opt.perturbed():
            nn.functional.cross_entropy(model(x), y).backward()
    assert opt.is_perturbed
    with pytest.raises(RuntimeError, match=f"restore .*raised for 3 layer.*{opt.targets[0].name}.*Reload"):
        with opt.perturbed():
            pass
    monkeypatch.undo()
    fresh = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant")
    with fresh.perturbed():  # what the message says to do is not refused as a second wrapper while opt lives
        pass


# -- tied weights: the layers that share a perturbed weight are guarded too --------------------------------------


def _tied_mlp():
    from flatlora_optim import inject_lora

    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model[2].weight = model[0].weight  # one tensor, two layers
    inject_lora(model, ["0", "2", "4"], r=2, alpha=4)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def test_state_dict_while_perturbed_is_clean_under_every_name_of_a_tied_weight():
    model = _tied_mlp()
    clean = {k: bits(v) for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="shared"):
        opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant")
    assert [a.name for t in opt.targets for a in t.aliases] == ["2"]
    with opt.perturbed():
        assert not torch.equal(bits(model[2].weight), clean["2.weight"]), "the shared weight took no noise"
        inside = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(RuntimeError, match="eval"):
            model[2].eval()  # the layer that only shares the weight is guarded too
    dirty = [k for k in clean if not torch.equal(clean[k], bits(inside[k]))]
    assert dirty == []
    assert torch.equal(bits(model[2].weight), clean["2.weight"])


def _gpt2_with_lora_on_the_tied_embedding():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["wte", "c_attn"], fan_in_fan_out=True))


def test_state_dict_while_perturbed_is_clean_under_a_tied_plain_modules_name():
    """GPT-2 ties ``lm_head.weight`` to the embedding; with LoRA on the embedding, ``lm_head`` is no LoRA layer, yet it
    holds the perturbed parameter: its state_dict entry must be clean too, and the tensor the embedding's entry is
    (safetensors keeps one of names sharing storage and refuses to load a checkpoint with both)."""
    model = _gpt2_with_lora_on_the_tied_embedding()
    clean = {k: bits(v) for k, v in model.state_dict().items()}
    lm_head = next(k for k in clean if k.endswith("lm_head.weight"))
    wte = next(k for k in clean if k.endswith("wte.base_layer.weight"))
    opt = FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model, rho=0.1, schedule="constant")
    assert [name for t in opt.targets for *_, name in t.tied] == ["base_model.model.lm_head.weight"]
    ids = torch.randint(0, 50, (2, 8))
    with opt.perturbed():
        inside = model.state_dict()
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert inside[lm_head] is inside[wte], "the tied names got two copies"
    dirty = [k for k in clean if not torch.equal(clean[k], bits(inside[k]))]
    assert dirty == []
    with opt.perturbed():
        first = model.state_dict()
        first[wte].zero_()  # a caller may change its copies in place: another call still gets clean ones
        second = model.state_dict()
    assert second[wte] is not first[wte] and torch.equal(bits(second[wte]), clean[wte])


def test_a_second_wrapper_is_refused_while_the_first_ones_noise_is_in():
    """Each wrapper restores against what it wrote: ``a.perturb(); b.perturb(); a.restore()`` once left noise in the
    weights (silently with backup restore). The second is refused before it writes; once the first restored, it may."""
    model = make_mlp(seed=0)
    before = frozen_weights(model)
    a = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant", restore="backup")
    b = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant", seed=1)
    a.perturb()
    noisy = frozen_weights(model)
    with pytest.raises(RuntimeError, match="another FlatLoRA wrapper"):
        b.perturb()
    assert not b.is_perturbed and all(torch.equal(noisy[n], w) for n, w in frozen_weights(model).items())
    a.restore()
    assert_frozen_unchanged(model, before)
    with b.perturbed():
        pass
    assert_frozen_unchanged(model, before)
    del a  # a dropped wrapper's claims go with it
    with b.perturbed():
        pass


@pytest.mark.parametrize("mode, restore", [("inplace", "exact"), ("inplace", "backup"), ("inplace", "host"), ("virtual", "exact")])
def test_noise_of_a_wrapper_no_longer_held_comes_out_with_restore_weights(mode, restore):
    """A wrapper dropped while its noise is in (an error between perturb() and restore(), a notebook cell run again)
    is kept alive by its hooks on the model: the weights stay noisy (virtual mode: every forward), and a new wrapper is
    refused. ``restore_weights(model)`` takes that noise out, bitwise, and the new wrapper then trains."""
    from flatlora_optim import restore_weights

    model = make_mlp(seed=0)
    before = frozen_weights(model)
    x, y = batch(0)
    with torch.no_grad():
        clean_out = model(x)
    assert restore_weights(model) == []  # nothing held: nothing done
    dropped = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant", mode=mode, restore=restore)
    dropped.perturb()
    loss = nn.functional.cross_entropy(model(x), y)  # the graph waits for its backward: the noise stays in
    del dropped, loss
    gc.collect()
    with torch.no_grad():
        assert not torch.equal(model(x), clean_out), "the dropped wrapper's noise is no longer in: the test shows nothing"
    fresh = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant", mode=mode, restore=restore)
    with pytest.raises(RuntimeError, match=r"another FlatLoRA wrapper.*restore_weights\(model\)"):
        fresh.perturb()
    restored = restore_weights(model)
    assert len(restored) == 1 and restored[0] is not fresh and not restored[0].is_perturbed
    del restored
    assert_frozen_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), clean_out)
    io.BytesIO().write(__import__("pickle").dumps(model))  # virtual mode: no patched layer left behind
    with fresh.perturbed():
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    fresh.step()
    assert_frozen_unchanged(model, before)
    assert restore_weights(model) == []


def test_restore_weights_finds_a_dropped_wrapper_whose_weight_is_not_a_registered_parameter():
    """A LoRA layer whose frozen weight is a plain attribute (a view of a fused parameter): the claim is on that view,
    which the model's parameters do not list. restore_weights finds the holder by its layers, not by the parameters."""
    from flatlora_optim import restore_weights

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Parameter(torch.randn(12, 6, generator=torch.Generator().manual_seed(0)), requires_grad=False)
            q = nn.Linear(6, 4, bias=False)
            del q.weight
            q.weight = self.qkv.data[:4]  # a plain attribute, a view of the fused parameter
            self.q = LoRALinear(q, 2, 4)

        def forward(self, x):
            return self.q(x)

    model = Fused()
    clean = bits(model.qkv)
    with pytest.warns(UserWarning, match="share memory with perturbed weights"):
        dropped = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant")
    dropped.perturb()
    loss = model(torch.randn(3, 6)).sum()
    del dropped, loss
    gc.collect()
    assert not torch.equal(bits(model.qkv), clean)
    assert len(restore_weights(model)) == 1
    assert torch.equal(bits(model.qkv), clean)


def test_a_load_whose_restore_fails_leaves_the_wrapped_optimizer_as_it_was():
    """load_state_dict loads the wrapped optimizer before the held noise comes off; where that restore then raises (a
    weight written while perturbed), the wrapped optimizer's state goes back to what it was."""
    model = make_mlp(seed=0)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant")
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = 0.5
    state["flatlora"]["step"] = 7
    opt.perturb()
    with torch.no_grad():
        model[0].weight.mul_(1e6)  # written while perturbed: the exact restore refuses
    with pytest.raises(RuntimeError, match="modified while perturbed"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.step_count == 0


def test_row_stds_of_rows_the_adapter_nearly_cancels_follow_the_formula():
    """The CPU row norms expand ``||W_i + s B_i A||^2``; where the adapter nearly cancels the row the float32 products
    cancelled catastrophically (40% off at 4e-4 of the row's norm, rows clamped to 0). Such rows are summed
    explicitly: within 1e-5 of the float64 formula at every ratio down to 1e-6."""
    from flatlora_optim.noise import row_std
    from flatlora_optim.targets import Adapter

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(8, 256, generator=gen)
    A = torch.randn(4, 256, generator=gen)
    B = torch.linalg.lstsq(A.t(), W.t()).solution.t()  # B A is the row's projection on A's span
    W = B @ A + torch.randn(8, 256, generator=gen) * torch.logspace(0, -6, 8)[:, None]  # what B A leaves: 1 .. 1e-6
    B = -B  # W + B A keeps only that residual
    std = row_std(W, [Adapter("a", A, B, 1.0)], 0.1)
    exact = 0.1 / 256**0.5 * (W.double() + B.double() @ A.double()).norm(dim=1)
    torch.testing.assert_close(std.double(), exact, rtol=1e-5, atol=0)


def test_bad_restore_and_rho_values_get_clear_errors():
    model = make_mlp(seed=0)
    params = list(lora_parameters(model))
    with pytest.raises(ValueError, match="Invalid restore"):
        FlatLoRA(torch.optim.SGD(params, lr=0.1), model, restore=["exact"])
    with pytest.raises(ValueError, match="Invalid rho"):
        FlatLoRA(torch.optim.SGD(params, lr=0.1), model, rho=10**400, schedule="constant")


def test_lora_layers_with_empty_weights_are_skipped_or_refused():
    from flatlora_optim import inject_lora

    model = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 3))
    inject_lora(model, ["0", "1"], r=2, alpha=4)
    with pytest.warns(UserWarning, match="empty base weights.*'0'"):
        opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.1, schedule="constant")
    assert [t.name for t in opt.targets] == ["1"]
    only_empty = nn.Sequential(nn.Linear(0, 4))
    inject_lora(only_empty, ["0"], r=2, alpha=4)
    with pytest.raises(ValueError, match="empty base weights.*Nothing is left"):
        FlatLoRA(torch.optim.SGD(list(lora_parameters(only_empty)), lr=0.1), only_empty, rho=0.1, schedule="constant")


@pytest.mark.parametrize("restore, mode", [("exact", "inplace"), ("host", "inplace"), ("exact", "virtual")])
@pytest.mark.parametrize("how", ["deepcopy", "torch.save", "deepcopy a layer"])
def test_copying_the_model_while_perturbed_is_refused_with_a_clear_message(restore, mode, how):
    """An EMA or teacher copy taken inside the block once failed with an error about the optimizer (or a weak
    reference); in virtual mode a layer's copy would have shared the original's rerouted forward."""
    import copy

    from flatlora_optim.uncopyable import COPY_REFUSED

    model = make_mlp(seed=2)
    before = frozen_weights(model)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.2, schedule="constant",
                   restore=restore, mode=mode)

    def copy_it():
        if how == "deepcopy":
            copy.deepcopy(model)
        elif how == "torch.save":
            torch.save(model, io.BytesIO())
        else:
            copy.deepcopy(model[0])  # a LoRA layer: its guards (in-place) or its rerouted product (virtual)

    x, y = batch(0)
    with opt.perturbed():
        loss = nn.functional.cross_entropy(model(x), y)
        with pytest.raises(TypeError, match="cannot be copied or pickled now"):
            copy_it()
    with pytest.raises(TypeError) as refused:
        copy_it()  # between forward and backward
    assert str(refused.value) == COPY_REFUSED
    loss.backward()
    opt.step()
    assert_frozen_unchanged(model, before)
    twin = copy.deepcopy(model)  # after the step: a plain copy, with none of the hooks
    assert_frozen_unchanged(twin, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in twin.modules())


def test_conversions_of_the_weights_owner_or_of_their_memory_format_are_refused_too():
    """The probe once used a 1-D tensor (``Module.to`` converts the memory format of 4-D weights only) and guarded the
    LoRA layer but not the module holding the weight (peft's ``base_layer``): both conversions carried the noise in
    and the restore then failed, leaving it there."""
    import peft

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    x, y = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1])
    for convert in (lambda m: m.to(memory_format=torch.channels_last), lambda m: m.base_model.model.conv.base_layer.double(),
                    lambda m: m.to_empty(device="cpu")):
        torch.manual_seed(0)
        model = peft.get_peft_model(ConvNet(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv"], init_lora_weights=False))
        before = frozen_weights(model)
        opt = FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model, rho=0.2,
                       schedule="constant")
        with pytest.raises(RuntimeError, match="memory format"):
            with opt.perturbed():
                nn.functional.cross_entropy(model(x), y)
                convert(model)
        assert not opt.is_perturbed
        assert_frozen_unchanged(model, before)
        weight = model.base_model.model.conv.base_layer.weight
        assert weight.dtype == torch.float32 and weight.is_contiguous()


def test_a_training_loop_inside_one_block_of_a_compiled_model_traces_no_noise_code():
    """The hook that draws the next step's noise runs outside torch.compile's tracing: a loop inside one block compiles
    the graphs a block per step compiles (it once traced the noise code, 27 graphs instead of 3, and failed to compile
    with inductor)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def run(one_block):
        torch._dynamo.reset()
        counters.clear()
        model = make_mlp(seed=0)
        before = frozen_weights(model)
        compiled = torch.compile(model, backend="eager")
        opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.1, schedule="constant")

        def step(s):
            nn.functional.cross_entropy(compiled(batch(s)[0]), batch(s)[1]).backward()
            opt.step()
            opt.zero_grad()

        steps_in_blocks(opt, step, 4, one_block)
        assert_frozen_unchanged(model, before)
        return counters["stats"]["unique_graphs"], [p.detach().clone() for p in lora_parameters(model)]

    graphs, params = run(True)
    reference_graphs, reference = run(False)
    assert graphs == reference_graphs
    assert all(torch.equal(a, b) for a, b in zip(params, reference))
