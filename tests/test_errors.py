"""Bad input gets a clear error that says what was wrong, and never leaves weights perturbed."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_frozen_unchanged, frozen_weights, make_mlp

from flatlora_optim import FlatLoRA, lora_parameters


def _base(model):
    return torch.optim.AdamW(list(lora_parameters(model)), lr=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": -0.1, "total_steps": 10}, "rho"),
        ({"rho": 0.05}, "total_steps"),
        ({"rho": 0.05, "total_steps": 10, "restore": "undo"}, "restore"),
        ({"rho": 0.05, "total_steps": 10, "seed": -1}, "seed"),
        ({"rho": 0.05, "total_steps": 10, "schedule": "step"}, "schedule"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = make_mlp()
    with pytest.raises(ValueError, match=match):
        FlatLoRA(_base(model), model, **kwargs)


def test_wrong_types_and_double_wrapping():
    model = make_mlp()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        FlatLoRA("adamw", model, total_steps=10)
    with pytest.raises(TypeError, match="nn.Module"):
        FlatLoRA(_base(model), "model", total_steps=10)
    opt = FlatLoRA(_base(model), model, total_steps=10)
    with pytest.raises(ValueError, match="already a FlatLoRA"):
        FlatLoRA(opt, model, total_steps=10)


def test_trainable_base_weight_warns():
    model = make_mlp()
    model[0].weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="require grad"):
        FlatLoRA(_base(model), model, total_steps=10)


def test_an_optimizer_holding_none_of_the_adapters_warns(recwarn):
    """An optimizer built for another model (or before the adapters were added) trains nothing Flat-LoRA perturbs for:
    warned, naming a layer. One holding any adapter parameter, or the whole model's trainable ones, is not."""
    model, other = make_mlp(), make_mlp()
    with pytest.warns(UserWarning, match=r"holds none of the trainable parameters of the \d+ LoRA layers .* not trained"):
        FlatLoRA(_base(other), model, total_steps=10)
    recwarn.clear()
    FlatLoRA(_base(model), model, total_steps=10)
    FlatLoRA(torch.optim.SGD([next(lora_parameters(model))], lr=0.1), model, total_steps=10)
    FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model, total_steps=10)
    assert not [w for w in recwarn if "holds none" in str(w.message)]


def test_a_failing_schedule_leaves_weights_clean():
    model = make_mlp()
    before = frozen_weights(model)
    calls = []

    def schedule(step):
        calls.append(step)
        return 1.0 if step == 0 else float("nan")

    opt = FlatLoRA(_base(model), model, rho=0.1, schedule=schedule)
    with opt.perturbed():
        pass
    opt.step()
    with pytest.raises(ValueError, match="callable returned"):
        with opt.perturbed():
            pass
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, before)


def test_regenerate_noise_errors():
    model = make_mlp()
    opt = FlatLoRA(_base(model), model, rho=0.1, schedule="constant")
    with pytest.raises(KeyError, match="not a Flat-LoRA target"):
        opt.regenerate_noise("nope")
    with pytest.raises(RuntimeError, match="inside opt.perturbed"):
        opt.regenerate_noise("0")


def test_not_picklable_with_a_pointer_to_state_dict():
    import pickle

    model = make_mlp()
    opt = FlatLoRA(_base(model), model, rho=0.1, schedule="constant")
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(opt)
