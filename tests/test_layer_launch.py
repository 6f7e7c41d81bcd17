"""``LayerLaunch``: virtual mode's per-layer launch, first through Triton's launcher, then through the compiled
kernel's runner with the same arguments (the GPU tests check the values; here the hand-over, on CPU)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux x86-64)")

import torch  # noqa: E402

from flatlora_optim.kernels import triton_noise as tn  # noqa: E402


class FakeCompiled:
    """Stands for a CompiledKernel: ``[grid]`` gives a runner taking every parameter in order."""

    def __init__(self, log, refuse: bool = False):
        self.log, self.refuse = log, refuse

    def __getitem__(self, grid):
        def runner(*args):
            if self.refuse:
                raise TypeError("function takes exactly 11 arguments")
            self.log.append(("runner", grid, args))

        return runner


class FakeJit:
    """Stands for the ``_noise_kernel`` JITFunction: ``[grid](*args, **options)`` records and returns a FakeCompiled."""

    arg_names = list(tn._noise_kernel.arg_names)

    def __init__(self, refuse: bool = False, interpreter: bool = False):
        self.log, self.refuse, self.interpreter = [], refuse, interpreter

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.log.append(("jit", grid, args, options))
            return None if self.interpreter else FakeCompiled(self.log, self.refuse)

        return launch


@pytest.fixture
def fake(monkeypatch):
    def make(**kwargs):
        jit = FakeJit(**kwargs)
        monkeypatch.setattr(tn, "_noise_kernel", jit)
        monkeypatch.setattr(tn, "_DIRECT_RUNNER", [True])
        monkeypatch.setattr(tn, "_PLANS", tn._LaunchPlans())  # no plan from another test
        return jit

    return make


def _launch(rows=None, std=None, seeds=None):
    rows = torch.zeros(96, 40, dtype=torch.bfloat16)[:, :36] if rows is None else rows  # a strided view: its strides must reach the kernel
    return tn.LayerLaunch(rows, torch.ones(96) if std is None else std, torch.arange(3) if seeds is None else seeds, 32, torch.float32), rows


def test_later_calls_hand_the_first_calls_arguments_to_the_compiled_runner(fake):
    jit = fake()
    launch, rows = _launch()
    outs = [launch() for _ in range(3)]
    assert [entry[0] for entry in jit.log] == ["jit", "runner", "runner"]
    _, grid, args, options = jit.log[0]
    every = dict(zip(jit.arg_names, args), **options)
    expected = tuple(every[name] for name in jit.arg_names)  # every parameter, constexprs included, in order
    for out, (_, runner_grid, runner_args) in zip(outs[1:], jit.log[1:]):
        assert runner_grid == (grid[0], 1, 1)
        assert runner_args[0] is out  # a new output each call...
        assert runner_args[1:] == expected[1:]  # ...and the rest exactly the first launch's
    assert len({o.data_ptr() for o in outs}) == 3
    assert all(o.shape == rows.shape and o.dtype == rows.dtype for o in outs)
    assert every["w_ptr"] is rows and every["stride_row"] == 40 and every["ADD"] is True


def test_a_runner_that_refuses_the_arguments_falls_back_for_good(fake):
    jit = fake(refuse=True)
    launch, _ = _launch()
    launch()
    with pytest.warns(UserWarning, match="refused virtual mode's launch arguments"):
        launch()  # the runner raises TypeError before launching: this call goes through the launcher again
    other, _ = _launch()
    other()
    other()
    assert [entry[0] for entry in jit.log] == ["jit", "jit", "jit", "jit"]
    assert tn._DIRECT_RUNNER == [False]


def test_the_interpreter_launches_through_the_launcher_every_time(fake):
    jit = fake(interpreter=True)  # the interpreter's launch returns None: no compiled kernel to reuse
    launch, _ = _launch()
    for _ in range(3):
        launch()
    assert [entry[0] for entry in jit.log] == ["jit"] * 3


def test_a_later_steps_launches_reuse_the_plan_with_their_own_tensors(fake):
    """A new step builds new launches (new row stds, new seeds): the first call of each goes straight to the runner
    that the first step's launch compiled, with the new step's tensors; nothing else changes."""
    jit = fake()
    first, rows = _launch()
    first()
    std, seeds = torch.full((96,), 2.0), torch.arange(3) + 10
    later, _ = _launch(rows=rows, std=std, seeds=seeds)
    out = later()
    assert [entry[0] for entry in jit.log] == ["jit", "runner"]
    _, _, args, options = jit.log[0]
    every = dict(zip(jit.arg_names, args), **options)
    runner_args = jit.log[1][2]
    assert runner_args[0] is out
    named = dict(zip(jit.arg_names, runner_args))
    assert named["std_ptr"] is std and named["seeds_ptr"] is seeds and named["w_ptr"] is rows  # this step's tensors
    assert all(named[name] == every[name] for name in jit.arg_names if name not in ("out_ptr", "w_ptr", "std_ptr", "seeds_ptr"))


def test_a_layer_of_another_geometry_or_alignment_gets_its_own_plan(fake):
    jit = fake()
    _launch()[0]()
    wider = torch.zeros(96, 40, dtype=torch.bfloat16)  # another shape and stride
    _launch(rows=wider)[0]()
    shifted = torch.ones(97)[1:]  # the row stds 4 bytes off a 16-byte boundary: Triton specialises on that
    _launch(std=shifted)[0]()
    half = torch.ones(96, dtype=torch.float16)  # row stds that the launch must convert: no reuse
    _launch(std=half)[0]()
    _launch(std=half)[0]()
    assert [entry[0] for entry in jit.log] == ["jit"] * 5
    _launch(rows=wider)[0]()  # its plan is there now
    assert jit.log[-1][0] == "runner"


def test_plans_hold_no_tensor(fake):
    fake()
    _launch()[0]()
    (runner, template), = tn._PLANS._plans.values()
    assert not any(isinstance(value, torch.Tensor) for value in template)
