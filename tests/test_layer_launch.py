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
        return jit

    return make


def _launch():
    rows = torch.zeros(96, 40, dtype=torch.bfloat16)[:, :36]  # a strided view: its strides must reach the kernel
    return tn.LayerLaunch(rows, torch.ones(96), torch.arange(3), 32, torch.float32), rows


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
