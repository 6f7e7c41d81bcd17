"""The global RNGs are never touched: dropout masks and user randomness stay reproducible."""

from __future__ import annotations

import random

import numpy as np
import torch
from conftest import make_mlp, train_step
from torch import nn

from flatlora_optim import FlatLoRA, lora_parameters


def test_global_rng_states_unchanged_by_a_training_run():
    model = make_mlp(seed=0)
    opt = FlatLoRA(torch.optim.AdamW(list(lora_parameters(model)), lr=1e-3), model, rho=0.1, total_steps=5)
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()
    python_state = random.getstate()
    for step in range(5):
        train_step(model, opt, step)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert random.getstate() == python_state


def test_dropout_masks_are_the_same_with_and_without_flat_lora():
    def masks(use_flat):
        torch.manual_seed(123)
        model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
        from flatlora_optim import inject_lora

        inject_lora(model, ["0"], r=2, alpha=4)
        opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.1, schedule="constant")
        out = []
        for _ in range(3):
            if use_flat:
                with opt.perturbed():
                    out.append(model(torch.ones(4, 8)) != 0)
            else:
                out.append(model(torch.ones(4, 8)) != 0)
        return torch.stack(out)

    assert torch.equal(masks(True), masks(False))
